"""Runs that must do what their settings say: resuming with changed settings, restored or reused callbacks, the best
checkpoint loaded at the end, an inactive adapter, and non-finite importance (issue 9, items 10 to 15)."""

import math

import pytest
import torch
from helpers import (
    EARLIEST_IS_BEST,
    SHARING,
    EarliestIsBest,
    TokenDataset,
    random_lora_b,
    tiny_llama,
    tiny_llama_base,
    training_args,
)
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainerCallback

from hub_export import PlanError, save_compact
from loradrop_trainer import LoraDropCallback, find_lora_layers
from loradrop_trainer.importance import ImportanceCollector
from loradrop_trainer.plan import MODEL_PLAN_ATTR, MODEL_PLAN_EXTRA_ATTR
from loradrop_trainer.report import PLAN_FILE


def _trainer(tmp_path, callback, model=None, max_steps=20, save_steps=None, eval_dataset=None, **args):
    args = training_args(
        tmp_path,
        max_steps=max_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        **args,
    )
    return Trainer(
        model=model or tiny_llama(),
        args=args,
        train_dataset=TokenDataset(n=40),
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )


def _best_is_earliest_trainer(tmp_path, callback) -> Trainer:
    """12 steps, a checkpoint every 2 and an evaluation at each, the earliest checkpoint the best one."""
    trainer = _trainer(
        tmp_path,
        callback,
        model=random_lora_b(tiny_llama()),
        max_steps=12,
        save_steps=2,
        eval_dataset=TokenDataset(n=8, seed=9),
        **EARLIEST_IS_BEST,
    )
    trainer.add_callback(EarliestIsBest())
    return trainer


def _callback(**settings) -> LoraDropCallback:
    return LoraDropCallback(**{**SHARING, **settings})


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _tied(model, plan) -> bool:
    layers = find_lora_layers(model)
    members = next(iter(plan.shared.values()))
    return len({id(layers[n].lora_A["default"].weight) for n in members}) == 1


# Item 10: a new alpha or max_steps that puts the switch at or before the resumed step must not skip pruning.


def test_resume_before_switch_with_the_switch_now_behind_switches_at_once(tmp_path, warnings_log):
    _trainer(tmp_path / "full", _callback(alpha=0.25), save_steps=3).train()  # switch at 5, checkpoint at 3
    checkpoint = tmp_path / "full" / "out" / "checkpoint-3"
    reference = _callback(alpha=0.15)  # a fresh run whose switch is at step 3, with the same importance
    _trainer(tmp_path / "reference", reference).train()

    resumed = _callback(alpha=0.1)  # switch at step 2, behind the checkpoint
    _trainer(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.plan is not None and resumed.plan.step == 3
    assert resumed.plan.total == pytest.approx(reference.plan.total, rel=1e-6)
    assert resumed.plan.kept == reference.plan.kept
    assert "switching now" in warnings_log.text


def test_resume_past_the_switch_without_collected_importance_is_refused(tmp_path):
    plain = _trainer(tmp_path / "plain", TrainerCallback(), save_steps=4)
    plain.train()
    trainer = _trainer(tmp_path / "resumed", _callback(alpha=0.1))
    with pytest.raises(ValueError, match=r"step 4.*no LoRA-drop importance"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "out" / "checkpoint-4"))


# Issue 21, item 9: importance collected under another score or aggregate is never added to this run's.


def test_21_9_resume_before_switch_with_another_score_collects_again(tmp_path, warnings_log):
    checkpoint = "out/checkpoint-3"
    for score in ("output", "relative"):  # score does not change training: both checkpoints hold the same weights
        _trainer(tmp_path / score, _callback(alpha=0.25, score=score), save_steps=3).train()  # switch at step 5
    continued = _callback(alpha=0.25, score="relative")
    _trainer(tmp_path / "continued", continued).train(resume_from_checkpoint=str(tmp_path / "relative" / checkpoint))
    assert "measured with" not in warnings_log.text
    switched = _callback(alpha=0.25, score="relative")
    _trainer(tmp_path / "switched", switched).train(resume_from_checkpoint=str(tmp_path / "output" / checkpoint))
    assert (
        "measured with score='output' (now 'relative')" in warnings_log.text
        and "starts again at step 3" in warnings_log.text
    )
    # Steps 4-5 only, on the same weights: less than steps 1-5 of the same measure (the output norms of steps 1-3,
    # orders of magnitude larger than the relative ones, would have made it far more).
    assert 0 < switched.plan.total < continued.plan.total
    past = _callback(alpha=0.1, score="relative")  # the switch (step 2) is behind the checkpoint: nothing to measure
    with pytest.raises(ValueError, match=r"measured with score='output'.*no steps left"):
        _trainer(tmp_path / "past", past).train(resume_from_checkpoint=str(tmp_path / "output" / checkpoint))


# Issue 21, item 5: a notebook resumes, in the same process, from before the switch into the re-parameterised model.


def test_21_5_resuming_from_before_the_switch_into_a_model_pruned_in_this_process_is_refused(tmp_path):
    callback = _callback(alpha=0.25)  # switch at step 5, checkpoints at 3 (before) and 6 (after)
    trainer = _trainer(tmp_path, callback, save_steps=3)
    trainer.train()
    with pytest.raises(ValueError, match=r"step 3 from a checkpoint saved before the LoRA-drop switch.*afresh"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))  # after the switch: the plan fits
    assert callback.plan.step == 5


# Item 11: resuming after the switch with other settings re-applies the saved plan and records ITS settings.


def test_21_19_resume_after_switch_with_another_target_re_applies_the_plan_to_its_own_modules(tmp_path, warnings_log):
    """Issue 21, item 19: a new `target` used to give a warning that the plan is re-applied, then a bare KeyError."""
    full = _callback(alpha=0.25)
    full_trainer = _trainer(tmp_path / "full", full, save_steps=8)
    full_trainer.train()
    resumed = _callback(alpha=0.25, target=["self_attn"])
    trainer = _trainer(tmp_path / "resumed", resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-8"))
    assert "target=['self_attn'] (plan: None)" in warnings_log.text
    assert resumed.plan == full.plan
    assert (resumed.lora_params_before, resumed.lora_params_after) == (full.lora_params_before, full.lora_params_after)
    assert _tied(trainer.model, resumed.plan)
    final, expected = _lora(trainer.model), _lora(full_trainer.model)
    assert final.keys() == expected.keys() and all(torch.equal(final[n], expected[n]) for n in final)


def test_resume_after_switch_with_other_settings_warns_and_records_the_plans_settings(tmp_path, warnings_log):
    full = _callback(alpha=0.25, threshold=0.9)
    _trainer(tmp_path / "full", full, save_steps=8).train()
    resumed = _callback(alpha=0.1, threshold=0.5, mode="drop")
    trainer = _trainer(tmp_path / "resumed", resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-8"))
    assert resumed.plan == full.plan
    assert "threshold" in warnings_log.text and "mode" in warnings_log.text
    recorded = getattr(trainer.model, MODEL_PLAN_EXTRA_ATTR)["config"]
    assert (recorded["alpha"], recorded["threshold"], recorded["mode"]) == (0.25, 0.9, "share")
    assert _tied(trainer.model, resumed.plan), "the saved plan (mode share) is what the model must follow"


# Item 12: restore_callback_states_from_checkpoint=True swaps in a new callback instance; the user's one must see it.


def test_restored_callback_reports_to_the_instance_the_user_holds(tmp_path):
    full = _callback(alpha=0.25)
    _trainer(tmp_path / "full", full, save_steps=8).train()
    mine = _callback(alpha=0.25)
    trainer = _trainer(tmp_path / "resumed", mine, restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-8"))
    assert not any(cb is mine for cb in trainer.callback_handler.callbacks), "the Trainer did swap the instance"
    assert mine.plan == full.plan
    assert mine.lora_params_after == full.lora_params_after
    assert LoraDropCallback.of(trainer).plan == full.plan


# Item 13: a callback reused for a fresh run starts fresh.


class TiedAtFirstStep(TrainerCallback):
    def __init__(self, drop: LoraDropCallback):
        self.drop, self.tied = drop, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.tied = getattr(model, MODEL_PLAN_ATTR, None) is not None


def test_callback_reused_for_a_fresh_run_collects_again(tmp_path):
    callback = _callback(alpha=0.25)
    _trainer(tmp_path / "first", callback).train()
    first = callback.plan
    probe = TiedAtFirstStep(callback)
    trainer = _trainer(tmp_path / "second", callback, model=tiny_llama(seed=5))
    trainer.add_callback(probe)
    trainer.train()
    assert probe.tied is False, "the second run must not start from the first run's plan"
    assert callback.plan is not None and callback.plan.step == 5 and callback.plan != first
    assert (tmp_path / "second" / "out" / PLAN_FILE).is_file()


def test_an_already_pruned_model_is_refused_for_a_fresh_run(tmp_path):
    trainer = _trainer(tmp_path / "first", _callback(alpha=0.25))
    trainer.train()
    again = _trainer(tmp_path / "again", _callback(alpha=0.25), model=trainer.model)
    with pytest.raises(ValueError, match="already re-parameterised"):
        again.train()


# Item 14: load_best_model_at_end with a best checkpoint from before the switch.


def test_best_checkpoint_before_the_switch_is_restored_untied(tmp_path, warnings_log):
    callback = _callback(alpha=0.5)  # switch at step 6 of 12
    trainer = _best_is_earliest_trainer(tmp_path, callback)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and int(best.rsplit("-", 1)[1]) < callback.plan.step
    model = trainer.model
    assert getattr(model, MODEL_PLAN_ATTR, None) is None, "a model restored to before the switch carries no plan"
    layers = find_lora_layers(model)
    assert len({id(layer.lora_A["default"].weight) for layer in layers.values()}) == len(layers), "untied"
    expected = PeftModel.from_pretrained(random_lora_b(tiny_llama_base()), best)
    inputs = {"input_ids": torch.randint(1, 90, (2, 12))}
    model.eval()
    expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)
    assert "predates the LoRA-drop switch" in warnings_log.text
    # Issue 21, item 21: the exporters say what the model is, rather than ask for a plan that then fails.
    for plan in (None, callback.plan):
        with pytest.raises(PlanError, match=r"checkpoint from before the LoRA-drop switch.*trainer\.save_model\(\)"):
            save_compact(model, tmp_path / "compact", plan=plan)
    assert not (tmp_path / "compact").exists()


# Item 15: an adapter that is not the one being trained; one non-finite micro-batch.


class FailOnStep(LoraDropCallback):
    def on_step_begin(self, *args, **kwargs):
        raise AssertionError("training started before the error was raised")


def test_inactive_adapter_is_refused_before_the_first_step(tmp_path):
    model = tiny_llama()
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = _trainer(tmp_path, FailOnStep(adapter_name="other"), model=model)
    with pytest.raises(ValueError, match=r"'other' is not active.*set_adapter"):
        trainer.train()


def test_a_non_finite_score_is_skipped_and_counted(tmp_path):
    model = random_lora_b(tiny_llama())
    layers = find_lora_layers(model)
    victim = list(layers)[-1]  # the last LoRA module to run: its NaN output reaches no other LoRA module
    collector = ImportanceCollector(model, layers)
    batch = {k: torch.stack([r[k] for r in TokenDataset(n=4).rows]) for k in ("input_ids", "attention_mask")}
    poison = layers[victim].lora_A["default"].register_forward_hook(lambda module, args, out: out * math.inf)
    model.train()
    model(**batch)  # the victim's score is not finite in this micro-batch only
    poison.remove()
    first = collector.totals()
    model(**batch)
    second = collector.totals()
    collector.remove()
    assert all(math.isfinite(v) for v in second.values())
    assert first[victim] == 0.0 and second[victim] > 0.0
    others = [n for n in layers if n != victim]
    assert all(second[n] == pytest.approx(2 * first[n], rel=1e-5) for n in others)
    assert collector.skipped() == {victim: 1}


class InterruptedAt(TrainerCallback):
    """Raises once, at the start of step `step + 1` (after checkpoint-`step` is written): a Ctrl-C in a notebook."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.step is not None:
            self.step = None
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["truncate", "share"])
def test_28_1_same_process_resume_past_the_switch_restores_the_best_checkpoint_before_it(tmp_path, mode):
    """Issue 28, item 1: a run interrupted after the switch and resumed on the same trainer, whose best checkpoint
    predates the switch, ended with a model 0.19 logits off that checkpoint (0.075 in mode "share"): the untied state
    used to undo the plan was captured from the model the first train() had re-parameterised (and the LoRA parameters
    before the switch were counted on it, tied Parameters once)."""
    callback = _callback(alpha=0.5, mode=mode)  # switch at step 6 of 12; the best checkpoint is step 2
    trainer = _best_is_earliest_trainer(tmp_path, callback)
    trainer.add_callback(InterruptedAt(8))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert callback.plan.step == 6
    before, after = callback.lora_params_before, callback.lora_params_after
    untied = trainer.model.__dict__.pop("_loradrop_untied")  # a model re-parameterised elsewhere has no such record
    with pytest.raises(ValueError, match=r"already re-parameterised.*without its state from before the plan.*afresh"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8"))
    trainer.model._loradrop_untied = untied
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8"))
    assert (callback.lora_params_before, callback.lora_params_after) == (before, after), "counted as it was"
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2") and getattr(trainer.model, MODEL_PLAN_ATTR, None) is None
    expected = PeftModel.from_pretrained(random_lora_b(tiny_llama_base()), best)
    inputs = {"input_ids": torch.randint(1, 90, (2, 12))}
    trainer.model.eval()
    expected.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)
