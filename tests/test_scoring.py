"""Each scoring option against an independent reference on padded batches, and the plan options built on them."""

import logging

import pytest
import torch
from helpers import (
    SHARING,
    TokenDataset,
    lora_and_frozen_norms,
    padded_batches,
    random_lora_b,
    record_training_batches,
    tiny_llama,
    training_args,
)
from scipy.stats import rankdata
from transformers import Trainer

from loradrop_trainer import LoraDropCallback, build_plan, find_lora_layers
from loradrop_trainer.importance import ImportanceCollector, mid_ranks
from loradrop_trainer.plan import coverage_warning, layer_of


def _reference(model, batch, score):
    """Per module: the masked squared norm of the LoRA term, or (score "relative") its ratio to the frozen output's."""
    lora, frozen = lora_and_frozen_norms(model, batch)
    return {name: lora[name] / frozen[name] if score == "relative" else lora[name] for name in lora}


@pytest.mark.parametrize("score", ["output", "relative"])
@pytest.mark.parametrize("aggregate", ["sum", "rank"])
def test_importance_matches_reference_on_paddedpadded_batches(score, aggregate):
    model = random_lora_b(tiny_llama())
    batches = padded_batches()
    names = list(find_lora_layers(model))
    expected = dict.fromkeys(names, 0.0)
    for batch in batches:
        per_batch = _reference(model, batch, score)
        values = [per_batch[n] for n in names]
        points = rankdata(values) - 1 if aggregate == "rank" else values  # scipy's average ranks, from 0
        for name, value in zip(names, points):
            expected[name] += float(value)
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model), score=score, aggregate=aggregate)
    for batch in batches:
        model(**batch).loss.backward()
    got = collector.totals()
    collector.remove()
    for name in names:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6)


def test_relative_score_removes_the_scale_of_the_layer():
    """Scaling a layer's frozen weight (a massive activation) scales its LoRA output, not its relative score."""
    model = random_lora_b(tiny_llama())
    batch = padded_batches(1)[0]
    layers = find_lora_layers(model)
    name = next(n for n in layers if n.endswith("layers.1.mlp.down_proj"))
    before = {s: _reference(model, batch, s)[name] for s in ("output", "relative")}
    with torch.no_grad():
        layers[name].base_layer.weight.mul_(10.0)
        layers[name].lora_B["default"].weight.mul_(10.0)
    after = {s: _reference(model, batch, s)[name] for s in ("output", "relative")}
    assert after["output"] == pytest.approx(100 * before["output"], rel=1e-3)
    assert after["relative"] == pytest.approx(before["relative"], rel=1e-3)


def test_mid_ranks_share_ties_and_ignore_order():
    scores = torch.tensor([3.0, 1.0, 3.0, 0.0, 2.0])
    assert mid_ranks(scores).tolist() == [3.5, 1.0, 3.5, 0.0, 2.0]
    assert mid_ranks(torch.zeros(4)).tolist() == [1.5] * 4


def test_rank_ignores_forwards_with_all_zero_scores():
    model = tiny_llama()  # PEFT's B is zero: no module changes anything yet
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model), aggregate="rank")
    model(**padded_batches(1)[0])
    assert set(collector.totals().values()) == {0.0}


def test_base_output_norm_not_counted_under_activation_checkpointing_recompute():
    model = random_lora_b(tiny_llama())
    batch = padded_batches(1)[0]
    expected = _reference(model, batch, "relative")
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    collector = ImportanceCollector(model, find_lora_layers(model), score="relative")
    model(**batch).loss.backward()
    for name, value in collector.totals().items():
        assert value == pytest.approx(expected[name], rel=1e-4)


@pytest.mark.parametrize("config", [{"score": "relative"}, {"aggregate": "rank"}], ids=["relative", "rank"])
def test_trainer_scores_each_micro_batch_once(tmp_path, config):
    """Gradient accumulation with learning rate 0: one score per micro-batch, as the reference computes it for the
    micro-batches the Trainer actually formed."""
    model = random_lora_b(tiny_llama())
    micro_batches = record_training_batches(model)
    callback = LoraDropCallback(alpha=0.5, **config)
    args = training_args(
        tmp_path, max_steps=8, learning_rate=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=32, seed=5), callbacks=[callback]).train()
    raw = {n: v * callback.plan.total for n, v in callback.plan.importance.items()}
    scored = micro_batches[: 2 * callback.plan.step]
    assert len(scored) == 8 and len({len(b["input_ids"]) for b in scored}) == 1
    reference = random_lora_b(tiny_llama())
    names = list(raw)
    expected = dict.fromkeys(names, 0.0)
    for batch in scored:
        per_batch = _reference(reference, batch, config.get("score"))
        values = [per_batch[n] for n in names]
        for name, value in zip(names, rankdata(values) - 1 if "aggregate" in config else values):
            expected[name] += float(value)
    for name in names:
        assert raw[name] == pytest.approx(expected[name], rel=1e-4)


KINDS = {f"m.layers.{i}.{kind}": kind for i in range(3) for kind in ("q", "v")}


def test_layer_normalisation_keeps_each_layers_own_share():
    importance = {name: 1.0 for name in KINDS}
    importance.update({"m.layers.0.q": 100.0, "m.layers.1.v": 50.0, "m.layers.2.q": 10.0})
    plan = build_plan(importance, KINDS, 0.9, normalize="layer", mode="drop")  # drop: no kind keeps a lone module
    assert sorted(plan.kept) == ["m.layers.0.q", "m.layers.1.v", "m.layers.2.q"]
    assert build_plan(importance, KINDS, 0.9, mode="drop").kept == ["m.layers.0.q", "m.layers.1.v"]
    with pytest.raises(ValueError, match="normalize"):
        build_plan(importance, KINDS, 0.9, normalize="block")


def test_layer_of_names_the_block():
    assert layer_of("base_model.model.model.layers.11.mlp.down_proj") == "base_model.model.model.layers.11"
    assert layer_of("encoder.block.3.layer.0.SelfAttention.q") == "encoder.block.3.layer.0"
    assert layer_of("lm_head") == ""


def test_coverage_warning_names_the_dominating_modules():
    importance = {name: 1.0 for name in KINDS} | {"m.layers.1.q": 1000.0}
    warning = coverage_warning(build_plan(importance, KINDS, 0.9))
    assert "no module of kind(s) v" in warning and "m.layers.1.q (99.5%)" in warning and "score='relative'" in warning
    kinds = {f"m.layers.{i}.q": "q" for i in range(20)}
    few = build_plan({name: 1.0 for name in kinds} | {"m.layers.0.q": 1e4}, kinds, 0.9)
    assert "only 1 of 20 modules" in coverage_warning(few)
    assert coverage_warning(build_plan({name: 1.0 for name in KINDS}, KINDS, 0.9)) is None


def test_switch_logs_the_coverage_warning(tmp_path, caplog):
    callback = LoraDropCallback(alpha=0.25, **{**SHARING, "threshold": 0.05})
    args = training_args(tmp_path, max_steps=8)
    with caplog.at_level(logging.WARNING, logger="loradrop_trainer"):
        Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(n=32), callbacks=[callback]).train()
    assert callback.plan is not None
    assert any("keeps its own LoRA" in r.getMessage() and "normalize=" in r.getMessage() for r in caplog.records)
