"""`dropped_scaling="keep"`: truncated modules keep the adapter's lora_alpha / r, and the saved adapter is a plain
uniform LoRA (no alpha_pattern) that vanilla PEFT reloads exactly; resuming past the switch continues bit for bit."""

import pytest
import torch
from helpers import (
    SHARING,
    LoraDeltas,
    TokenDataset,
    assert_saved_adapter_reloads_exactly,
    tiny_llama,
    training_args,
)
from transformers import Trainer

from loradrop_trainer import LoraDropCallback, LoraDropConfig, find_lora_layers

KEEP = {**SHARING, "mode": "truncate", "dropped_scaling": "keep"}


def _run(tmp_path, resume_from=None, save_steps=None, **config):
    model = tiny_llama()  # r=4, lora_alpha=8
    callback = LoraDropCallback(alpha=0.25, **{**KEEP, **config})
    args = training_args(
        tmp_path,
        max_steps=12,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume_from)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return model, callback, lora


def test_keep_trains_at_the_adapters_scaling_and_saves_a_uniform_lora(tmp_path):
    model, callback, _ = _run(tmp_path)
    plan = callback.plan
    assert plan.mode == "truncate" and plan.dropped and plan.kept
    layers = find_lora_layers(model)
    for name in plan.dropped:
        layer = layers[name]
        assert layer.scaling["default"] == 8 / 4, "keep: lora_alpha / r, as before the switch"
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not a[1:].any() and not b[:, 1:].any(), f"{name}: the zero block moved during training"
        assert a[0].any() and b[:, 0].any(), f"{name}: its rank-1 LoRA did not survive"
    assert model.peft_config["default"].alpha_pattern == {}, "keep records no alpha_pattern entries"

    reloaded = assert_saved_adapter_reloads_exactly(model, tmp_path / "plain")
    assert reloaded.peft_config["default"].alpha_pattern == {}


def test_the_compact_format_refuses_a_keep_model_rather_than_reload_it_at_the_rank_scaling(tmp_path):
    """hub_export's compact adapter rebuilds truncated modules with the rank-k scaling; until it records the scaling
    a 'keep' run used, exporting one must fail, never write an adapter that computes something else."""
    from hub_export import PlanError, save_compact

    model, callback, _ = _run(tmp_path)
    with pytest.raises(PlanError, match=r"This model was trained with LoraDropConfig\(dropped_scaling='keep'\)"):
        save_compact(model, tmp_path / "compact", plan=callback.plan)
    assert not (tmp_path / "compact").exists()


def test_keep_and_rank_give_the_same_lora_term_at_the_switch_and_differ_in_scaling_only(tmp_path):
    """Up to the switch the two runs are one run; right after it each truncated module adds the same rank-1 term
    (the values are rescaled for "rank", not for "keep"); the factor it then learns with differs by r / k."""
    terms = {}
    for scaling in ("keep", "rank"):
        model = tiny_llama()
        callback = LoraDropCallback(alpha=0.25, **{**KEEP, "dropped_scaling": scaling})
        after = LoraDeltas(step=3)  # ceil(0.25 * 12): the switch step; placed after the callback, it sees the switch
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path / scaling, max_steps=12, lr_scheduler_type="linear", warmup_steps=2),
            train_dataset=TokenDataset(n=40),
            callbacks=[callback, after],
        )
        trainer.train()
        assert callback.plan.step == 3
        layers = find_lora_layers(model)
        factor = 8 / 4 if scaling == "keep" else 8 / 1
        assert all(layers[n].scaling["default"] == factor for n in callback.plan.dropped)
        terms[scaling] = after.deltas
    for name in terms["keep"]:
        assert torch.allclose(terms["keep"][name], terms["rank"][name], atol=1e-6), name


def test_resume_past_the_switch_continues_bit_identically_with_keep(tmp_path):
    _, full, full_lora = _run(tmp_path / "full", save_steps=6)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-6"
    assert full.plan.step < 6, "the checkpoint must come after the switch"
    model, resumed, resumed_lora = _run(tmp_path / "resumed", resume_from=str(checkpoint))
    assert resumed.plan == full.plan
    assert full_lora.keys() == resumed_lora.keys()
    for name in full_lora:
        assert torch.equal(resumed_lora[name], full_lora[name]), name
    assert model.peft_config["default"].alpha_pattern == {}
    assert all(find_lora_layers(model)[n].scaling["default"] == 8 / 4 for n in resumed.plan.dropped)


def test_a_resume_with_another_dropped_scaling_applies_the_checkpoints(tmp_path):
    """The plan is re-applied under the settings it was made with (the callback's rule for every setting)."""
    _run(tmp_path / "full", save_steps=6)
    checkpoint = tmp_path / "full" / "out" / "checkpoint-6"
    model, resumed, _ = _run(tmp_path / "resumed", resume_from=str(checkpoint), dropped_scaling="rank")
    assert all(find_lora_layers(model)[n].scaling["default"] == 8 / 4 for n in resumed.plan.dropped)
    assert model.peft_config["default"].alpha_pattern == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropped_scaling": "alpha"}, "dropped_scaling must be one of"),
        ({"mode": "share", "dropped_scaling": "keep"}, "dropped_scaling only applies to mode='truncate'"),
    ],
)
def test_bad_dropped_scaling_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraDropConfig(**kwargs)
