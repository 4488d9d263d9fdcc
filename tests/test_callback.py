"""LoraDropCallback end to end in a Trainer: the plan, the tying, and training going on after the switch."""

import copy
import json
import math

import pytest
import torch
from helpers import SHARING, TokenDataset, random_lora_b, tiny_bert, tiny_llama, tiny_llama_base, training_args
from peft import PeftModel
from transformers import Trainer, TrainerCallback

from loradrop_trainer import DropPlan, LoraDropCallback, LoraDropConfig, apply_plan, build_plan, find_lora_layers
from loradrop_trainer.report import PLAN_FILE, PLOT_FILE


class Snapshots(TrainerCallback):
    """Records, after LoraDropCallback has run, the shared LoRA weights and the loss at every step."""

    def __init__(self, drop: LoraDropCallback):
        self.drop = drop
        self.shared_b: dict[int, torch.Tensor] = {}
        self.optimizer_state_at_switch: dict | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        plan = self.drop.plan
        if plan is None or not plan.shared:
            return
        source = self.drop._layers[next(iter(plan.shared.values()))[0]]
        self.shared_b[state.global_step] = source.lora_B["default"].weight.detach().clone()
        if state.global_step == plan.step:
            inner = getattr(optimizer, "optimizer", optimizer)
            self.optimizer_state_at_switch = {
                p: inner.state.get(p) for p in (source.lora_A["default"].weight, source.lora_B["default"].weight)
            }


def _train(model, tmp_path, data=None, **config):
    config.setdefault("alpha", 0.2)
    callback = LoraDropCallback(LoraDropConfig(**{**SHARING, **config}))
    snapshots = Snapshots(callback)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=data or TokenDataset(),
        callbacks=[callback, snapshots],
    )
    trainer.train()
    return trainer, callback, snapshots


def _distinct_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("make_model, task", [(tiny_llama, "causal"), (tiny_bert, "classify")], ids=["llama", "bert"])
def test_plan_and_tying_invariants(tmp_path, make_model, task):
    model = make_model()
    before = _distinct_trainable(model)
    trainer, callback, snapshots = _train(model, tmp_path, TokenDataset(task=task))
    plan = callback.plan
    assert plan is not None and plan.step == 4
    assert math.isclose(sum(plan.importance.values()), 1.0)
    ordered = sorted(plan.importance, key=lambda n: (-plan.importance[n], n))
    reach = next(i for i in range(1, len(ordered) + 1) if sum(plan.importance[n] for n in ordered[:i]) >= 0.9)
    chosen = ordered[:reach]
    assert set(chosen) <= set(plan.kept), "the most important modules, up to the threshold, are kept"
    for name in set(plan.kept) - set(chosen):
        others = [n for n in ordered if n not in chosen and plan.kinds[n] == plan.kinds[name]]
        assert others == [name], "beyond the threshold, only a module left alone in its kind is kept"
    assert plan.shared, "a tiny random model at T=0.9 must drop something"
    assert all(len(members) > 1 for members in plan.shared.values()), "a module alone in its kind keeps its LoRA"

    layers = find_lora_layers(model)
    for members in plan.shared.values():
        a = {id(layers[n].lora_A["default"].weight) for n in members}
        b = {id(layers[n].lora_B["default"].weight) for n in members}
        assert len(a) == len(b) == 1, "every dropped module of a kind must hold the very same Parameters"
    assert _distinct_trainable(model) < before
    assert _distinct_trainable(model) - (before - callback.lora_params_before) == callback.lora_params_after

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    steps = sorted(snapshots.shared_b)
    assert not torch.equal(snapshots.shared_b[steps[0]], snapshots.shared_b[steps[-1]]), "the shared LoRA must train"

    written = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    assert DropPlan.from_dict(written) == plan
    assert (tmp_path / "out" / PLOT_FILE).stat().st_size > 1000
    logged = [h for h in trainer.state.log_history if "loradrop/lora_params" in h]
    assert logged and logged[0]["step"] == plan.step and logged[0]["loradrop/lora_params"] == callback.lora_params_after


def test_gqa_kinds_are_named_by_module_and_shapes_differ():
    model = tiny_llama()
    layers = find_lora_layers(model)
    q = next(layer for name, layer in layers.items() if name.endswith("q_proj"))
    v = next(layer for name, layer in layers.items() if name.endswith("v_proj"))
    assert q.lora_B["default"].weight.shape != v.lora_B["default"].weight.shape
    assert len(layers) == 7 * 4


def test_shared_gradient_is_the_sum_of_member_gradients():
    tied, untied = random_lora_b(tiny_llama(), seed=2), random_lora_b(tiny_llama(), seed=2)
    layers_t, layers_u = find_lora_layers(tied), find_lora_layers(untied)
    kinds = {name: name.rsplit(".", 1)[-1] for name in layers_t}
    importance = {name: float(i + 1) for i, name in enumerate(layers_t)}
    plan = build_plan(importance, kinds, 0.5)
    apply_plan(layers_t, plan)
    for members in plan.shared.values():
        for name in members[1:]:
            for part in ("lora_A", "lora_B"):
                getattr(layers_u[name], part)["default"].weight.data.copy_(
                    getattr(layers_u[members[0]], part)["default"].weight.data
                )
    batch = TokenDataset(n=4).rows
    inputs = {k: torch.stack([r[k] for r in batch]) for k in batch[0]}
    tied(**inputs).loss.backward()
    untied(**inputs).loss.backward()
    for members in plan.shared.values():
        for part in ("lora_A", "lora_B"):
            shared_grad = getattr(layers_t[members[0]], part)["default"].weight.grad
            summed = sum(getattr(layers_u[n], part)["default"].weight.grad for n in members)
            torch.testing.assert_close(shared_grad, summed, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """One run of the tiny Llama with the default schedule, for the tests that only read what it left."""
    model = tiny_llama()
    return model, *_train(model, tmp_path_factory.mktemp("llama_run"))


def test_save_model_writes_a_plain_peft_adapter(llama_run, tmp_path):
    model, trainer, _, _ = llama_run
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama_base(seed=0), str(tmp_path / "adapter"))
    inputs = {"input_ids": torch.randint(1, 90, (2, 12))}
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_fresh_shared_init_zeroes_b_and_resets_optimizer_state(tmp_path):
    _, callback, snapshots = _train(tiny_llama(), tmp_path, shared_init="fresh")
    switch = callback.plan.step
    assert torch.count_nonzero(snapshots.shared_b[switch]) == 0
    assert all(state is None for state in snapshots.optimizer_state_at_switch.values())
    assert torch.count_nonzero(snapshots.shared_b[max(snapshots.shared_b)]) > 0, "the fresh LoRA must then train"


def test_most_important_init_keeps_the_optimizer_moments(llama_run):
    _, _, _, snapshots = llama_run
    assert all(state for state in snapshots.optimizer_state_at_switch.values())


def test_drop_mode_stops_the_dropped_modules_computing(tmp_path):
    model = tiny_llama()
    _, callback, _ = _train(model, tmp_path, mode="drop")
    layers = find_lora_layers(model)
    dropped = callback.plan.dropped
    calls = []
    for name in dropped:
        layers[name].lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 5, layers[dropped[0]].in_features)
    layer = layers[dropped[0]]
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    model(input_ids=torch.randint(1, 90, (2, 8)))
    assert calls == []
    assert callback.lora_params_after < callback.lora_params_before * 0.9


def test_22_4_all_zero_importance_keeps_plain_lora_and_names_the_cause(tmp_path, caplog):
    """Issue 22, item 4: a switch at which every module scored zero says why (LoRA's B still at PEFT's zero start,
    updates at learning rate 0) and that no plan file was written, instead of a bare "check the learning rate"."""
    model = tiny_llama()
    callback = LoraDropCallback(alpha=0.2)
    args = training_args(tmp_path, learning_rate=0.0)
    from transformers.utils import logging

    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    logging.disable_propagation()
    assert callback.plan is None and not (tmp_path / "out" / PLAN_FILE).exists()
    assert "not pruning at step 4" in caplog.text and f"no {PLAN_FILE} is written" in caplog.text
    assert "PEFT's zero initialisation" in caplog.text and "3 optimizer updates" in caplog.text
    assert "learning_rate=0.0" in caplog.text


@pytest.mark.parametrize(
    "settings, step, advice",
    [
        ({"max_steps": 10}, 1, "raise alpha to 0.2, or train for at least 11 steps"),
        ({"max_steps": 20, "warmup_steps": 2}, 2, "raise alpha to 0.15, or train for at least 21 steps, or start"),
    ],
    ids=["step-1", "warm-up"],
)
def test_22_4_a_switch_before_any_update_moves_lora_is_refused_before_training(tmp_path, settings, step, advice):
    """Issue 22, item 4: with max_steps <= 10 at the default alpha the switch would land on step 1, whose forwards
    see PEFT's zero-initialised B (and after a warm-up, on step 2, whose forwards follow an update at learning rate
    0): every module would score zero. That is refused in on_train_begin, with the settings that fix it."""
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, **settings),
        train_dataset=TokenDataset(),
        callbacks=[LoraDropCallback()],
    )
    with pytest.raises(
        ValueError, match=rf"alpha=0.1 of max_steps=\d+ puts the switch at the end of step {step}, "
    ) as err:
        trainer.train()
    assert "PEFT starts every LoRA's B at zero" in str(err.value) and advice in str(err.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)


def test_callback_accepts_config_or_keywords_not_both():
    assert LoraDropCallback(alpha=0.3).config.alpha == 0.3
    assert LoraDropCallback(LoraDropConfig(threshold=0.8)).config.threshold == 0.8
    with pytest.raises(TypeError, match="either"):
        LoraDropCallback(LoraDropConfig(), alpha=0.3)


def test_untouched_copy_is_not_affected(tmp_path):
    """Tying happens on the model the Trainer trains, never on a copy made before."""
    model = tiny_llama()
    twin = copy.deepcopy(model)
    _train(model, tmp_path)
    layers = find_lora_layers(twin)
    ids = {id(layer.lora_A["default"].weight) for layer in layers.values()}
    assert len(ids) == len(layers)


def test_kinds_name_the_role_when_the_leaf_is_ambiguous_and_the_shape_when_ranks_differ():
    from loradrop_trainer import lora_kinds

    bert_kinds = set(lora_kinds(find_lora_layers(tiny_bert())).values())
    roles = {"attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"}
    assert bert_kinds == {"query", "key", "value", *roles}
    llama = tiny_llama(rank_pattern={"layers.0.self_attn.q_proj": 2})
    kinds = lora_kinds(find_lora_layers(llama))
    assert {k for k in kinds.values() if k.startswith("q_proj")} == {"q_proj[32x32r2]", "q_proj[32x32r4]"}
    assert kinds["base_model.model.model.layers.1.self_attn.v_proj"] == "v_proj"


def test_switch_metrics_reach_callbacks_listed_after_it(tmp_path):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    recorder = Recorder()
    drop = LoraDropCallback(alpha=0.2)
    Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[drop, recorder],
    ).train()
    seen = [logs["loradrop/kept_modules"] for logs in recorder.seen if "loradrop/kept_modules" in logs]
    assert seen == [len(drop.plan.kept)]


@pytest.mark.parametrize("progress_bar", [False, True], ids=["printed", "above-the-bar"])
def test_plan_table_reaches_the_console_once_at_default_verbosity(tmp_path, capsys, progress_bar):
    from transformers.utils import logging

    assert logging.get_verbosity() == logging.WARNING, "the test must run at the library's default verbosity"
    callback = LoraDropCallback(alpha=0.2)
    args = training_args(tmp_path, disable_tqdm=not progress_bar)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    console = capsys.readouterr()
    shown = console.out + console.err
    assert shown.count(f"LoRA-drop plan at step {callback.plan.step}:") == 1
    assert f"{callback.lora_params_before:,} -> {callback.lora_params_after:,}" in shown
    assert "down_proj" in shown


def test_22_5_the_plan_file_and_chart_paths_reach_the_console(tmp_path, capsys):
    """Issue 22, item 5: where the plan file and the chart went is shown with the plan, at default verbosity."""
    Trainer(
        model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[LoraDropCallback()]
    ).train()
    shown = capsys.readouterr().out
    out = tmp_path / "out"
    assert f"plan written to {out / PLAN_FILE}" in shown and f"chart written to {out / PLOT_FILE}" in shown


def test_every_checkpoint_after_the_switch_holds_the_plan(tmp_path):
    callback = LoraDropCallback(alpha=0.2)
    args = training_args(tmp_path, save_strategy="steps", save_steps=2)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    out = tmp_path / "out"
    assert not (out / "checkpoint-2" / PLAN_FILE).exists(), "no plan exists before the switch"
    for step in (4, 6, 20):
        written = json.loads((out / f"checkpoint-{step}" / PLAN_FILE).read_text())
        assert DropPlan.from_dict(written) == callback.plan


def test_22_3_the_plan_records_how_much_data_it_rests_on(tmp_path):
    """`DropPlan.scored` counts the micro-batches scored before the switch and their real tokens (the attention
    mask's), and the plan file records it."""
    model = tiny_llama()
    seen: list[int] = []  # real tokens of each training forward, in order
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int(kwargs["attention_mask"].sum())) if module.training else None,
        with_kwargs=True,
    )
    callback = LoraDropCallback(alpha=0.2, **SHARING)
    args = training_args(tmp_path, max_steps=10, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    plan = callback.plan
    assert plan.step == 2
    assert plan.scored == {"micro_batches": 4, "tokens": sum(seen[:4])}
    assert sum(seen[:4]) < 4 * 4 * 16, "padding does not count"
    assert json.loads((tmp_path / "out" / PLAN_FILE).read_text())["scored"] == plan.scored
    assert DropPlan.from_dict(plan.to_dict()) == plan
    for bad in ({"micro_batches": -1, "tokens": 3}, {"micro_batches": "4"}, {"micro_batches": 4, "tokens": True}):
        with pytest.raises(ValueError, match="'scored' must give micro_batches and tokens"):
            DropPlan.from_dict({**plan.to_dict(), "scored": bad})
