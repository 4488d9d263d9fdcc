"""Mode "truncate": dropped modules keep their own LoRA, cut to `dropped_rank` by SVD at the switch."""

import math

import pytest
import torch
from helpers import (
    SHARING,
    LoraDeltas,
    TokenDataset,
    assert_saved_adapter_reloads_exactly,
    tiny_bert,
    tiny_llama,
    training_args,
)
from transformers import Trainer

from loradrop_trainer import DropPlan, LoraDropCallback, LoraDropConfig, find_lora_layers
from loradrop_trainer.truncate import pattern_key, truncated_values

TRUNCATE = {**SHARING, "mode": "truncate"}


def _train(tmp_path, make_model=tiny_llama, task="causal", **config):
    model = make_model()
    callback = LoraDropCallback(alpha=0.2, **{**TRUNCATE, **config})
    before, after = LoraDeltas(4), LoraDeltas(4)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=TokenDataset(task=task),
        callbacks=[before, callback, after],
    )
    trainer.train()
    return model, callback, before.deltas, after.deltas


def test_truncated_values_are_the_best_rank_k_approximation_as_zero_padded_factors():
    torch.manual_seed(0)
    a, b = torch.randn(6, 20), torch.randn(30, 6)
    for rank in (1, 2, 5):
        new_a, new_b = truncated_values(a, b, rank, scale=0.5)
        u, s, vh = torch.linalg.svd(b.double() @ a.double())
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose((new_b @ new_a).double(), 0.5 * best, atol=1e-5)
        assert not new_a[rank:].any() and not new_b[:, rank:].any(), "beyond rank k both factors are zero"
        rms_row = float(a.double().norm() / math.sqrt(6))
        assert torch.allclose(new_a[:rank].double().norm(dim=1), torch.full((rank,), rms_row, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 7"):
        truncated_values(a, b, 7)


@pytest.mark.parametrize("make_model, task", [(tiny_llama, "causal"), (tiny_bert, "classify")], ids=["llama", "bert"])
def test_dropped_modules_keep_their_best_rank_k_lora_and_train_at_that_rank(tmp_path, make_model, task):
    model, callback, before, after = _train(tmp_path, make_model, task)
    plan = callback.plan
    assert plan.mode == "truncate" and plan.dropped_rank == 1 and plan.dropped and plan.kept
    layers = find_lora_layers(model)
    for name in plan.kept:  # untouched at the switch
        assert torch.equal(after[name], before[name])
        assert layers[name].scaling["default"] == 8 / 4
    sizes = 0
    for name in plan.dropped:
        u, s, vh = torch.linalg.svd(before[name])
        assert torch.allclose(after[name], s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5), name
        layer = layers[name]
        assert layer.scaling["default"] == 8 / 1, "a rank-1 LoRA is scaled by lora_alpha / 1, as PEFT scales it"
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not a[1:].any() and not b[:, 1:].any(), f"{name}: the zero block moved during training"
        assert a[0].any() and b[:, 0].any()
        sizes += a.shape[1] + b.shape[0]
    kept = sum(
        p.numel() for n in plan.kept for p in (layers[n].lora_A["default"].weight, layers[n].lora_B["default"].weight)
    )
    assert callback.lora_params_after == kept + sizes < callback.lora_params_before


def test_the_saved_plain_peft_adapter_computes_what_the_truncated_model_computes(tmp_path):
    model, callback, _, _ = _train(tmp_path)
    config = model.peft_config["default"]
    first = pattern_key(callback.plan.dropped[0])
    assert next(iter(config.alpha_pattern)) == first, "loradrop's entries come first: PEFT takes the first match"
    assert_saved_adapter_reloads_exactly(model, tmp_path / "plain")


def test_plan_records_the_dropped_rank_and_round_trips():
    plan_dict = {
        "version": 1,
        "mode": "truncate",
        "dropped_rank": 2,
        "threshold": 0.5,
        "kept": ["a"],
        "shared": {"k": ["b"]},
        "kinds": {"a": "k", "b": "k"},
        "importance": {"a": 0.7, "b": 0.3},
    }
    plan = DropPlan.from_dict(plan_dict)
    assert plan.dropped_rank == 2 and plan.source_of("b") == "b"
    assert DropPlan.from_dict(plan.to_dict()) == plan
    assert plan.kept_fraction({"a": 80, "b": 80}, {"a": 8, "b": 8}) == pytest.approx((80 + 20) / 160)
    for broken in ({"dropped_rank": None}, {"dropped_rank": 0}, {"mode": "share"}):
        with pytest.raises(ValueError, match="dropped_rank"):
            DropPlan.from_dict({**plan_dict, **broken})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropped_rank": 0}, "dropped_rank must be a positive integer"),
        ({"dropped_rank": True}, "dropped_rank must be a positive integer"),
        ({"mode": "truncate", "restart": True}, "restart=True"),
        ({"mode": "truncate", "shared_init": "fresh"}, "shared_init only applies to mode='share'"),
    ],
)
def test_bad_truncate_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraDropConfig(**kwargs)


def test_a_dropped_rank_not_below_r_is_refused_before_the_first_step(tmp_path):
    trainer = Trainer(
        model=tiny_llama(),  # r=4
        args=training_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[LoraDropCallback(alpha=0.2, dropped_rank=4, **TRUNCATE)],
    )
    with pytest.raises(ValueError, match="have rank 4 or less already"):
        trainer.train()
    assert trainer.state.global_step == 0
