"""score="residual": what truncation to rank k takes from each module's output, against independent references, and
the setting end to end (Trainer, export, resume; DDP, ZeRO-3 and FSDP2 are in test_distributed.py's `resid` runs)."""

import pytest
import torch
from helpers import (
    TokenDataset,
    assert_saved_adapter_reloads_exactly,
    lora_state,
    model_logits,
    padded_batches,
    random_lora_b,
    record_training_batches,
    tiny_llama,
    tiny_llama_base,
    train_tiny_llama,
    training_args,
)
from transformers import Trainer

from hub_export import load_compact, save_compact
from loradrop_trainer import LoraDropCallback, LoraDropConfig, find_lora_layers
from loradrop_trainer.importance import ImportanceCollector, truncation_residual

RESIDUAL = {"mode": "truncate", "dropped_rank": 1, "score": "residual", "normalize": "global", "threshold": 0.6}


def _residual_reference(model, batches, rank=1):
    """Per module: `sum_t m_t ||scaling (B A - [B A]_rank) x_t||^2` over the batches, with `[B A]_rank` from a full
    SVD of the product and `x_t` the layer's input as a forward hook sees it."""
    layers = find_lora_layers(model)
    inputs = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda module, args, out, name=name: inputs[name].append(args[0].detach()))
        for name, layer in layers.items()
    ]
    model.eval()
    masks = []
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            masks.append(batch["attention_mask"].reshape(-1, 1).double())
    for handle in handles:
        handle.remove()
    expected = {}
    for name, layer in layers.items():
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        residual = (delta - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]) * layer.scaling["default"]
        total = 0.0
        for x, mask in zip(inputs[name], masks):
            out = x.reshape(-1, x.shape[-1]).double() @ residual.T
            total += float((out.square() * mask).sum())
        expected[name] = total
    return expected


def test_truncation_residual_matches_a_full_svd():
    torch.manual_seed(0)
    a, b, x = torch.randn(6, 20), torch.randn(12, 6), torch.randn(50, 20)
    u, s, vh = torch.linalg.svd((b @ a).double(), full_matrices=False)
    for rank in (1, 3, 5):
        residual = (b @ a).double() - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        expected = float((x.double() @ residual.T).square().sum()) * 0.25
        gram = (x @ a.T).T @ (x @ a.T)
        assert truncation_residual(a, b, gram, rank, 0.5) == pytest.approx(expected, rel=1e-5)
    assert truncation_residual(a, b, gram, 6, 0.5) == 0.0


def test_a_rank_one_update_loses_nothing_and_a_large_output_does_not_make_it_important():
    """The point of the score: a module whose update is already rank 1 loses nothing to truncation, however large its
    output; one whose output is spread over several directions loses what lies beyond the first."""
    torch.manual_seed(0)
    a, x = torch.randn(4, 16), torch.randn(40, 16)
    gram = (x @ a.T).T @ (x @ a.T)
    rank_one = 100.0 * torch.randn(8, 1) @ torch.randn(1, 4)
    spread = torch.randn(8, 4)
    assert truncation_residual(a, rank_one, gram, 1, 1.0) < 1e-6 * float((x @ (rank_one @ a).T).square().sum())
    assert truncation_residual(a, spread, gram, 1, 1.0) > 0.1 * float((x @ (spread @ a).T).square().sum())


def test_collector_sums_the_residual_over_the_real_tokens_of_paddedpadded_batches():
    model = random_lora_b(tiny_llama())
    batches = padded_batches()
    expected = _residual_reference(model, batches)
    model.train()
    layers = find_lora_layers(model)
    collector = ImportanceCollector(model, layers, score="residual")
    for batch in batches:
        model(**batch).loss.backward()
    got = collector.residual_totals(layers, "default", rank=1)
    collector.remove()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name


def test_trainer_plans_by_the_residual_of_the_micro_batches_it_scored(tmp_path):
    """Learning rate 0: the plan's importance is the reference residual over the micro-batches the Trainer formed,
    and the kept modules are those that lose the most (the output score keeps others)."""
    model = random_lora_b(tiny_llama())
    micro_batches = record_training_batches(model)
    callback = LoraDropCallback(alpha=0.5, **RESIDUAL)
    args = training_args(tmp_path, max_steps=8, learning_rate=0.0, per_device_train_batch_size=4)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=32, seed=5), callbacks=[callback]).train()
    expected = _residual_reference(random_lora_b(tiny_llama()), micro_batches[: callback.plan.step])
    raw = {n: v * callback.plan.total for n, v in callback.plan.importance.items()}
    for name, value in expected.items():
        assert raw[name] == pytest.approx(value, rel=1e-4), name
    ranked = sorted(expected, key=lambda n: (-expected[n], n))
    assert callback.plan.kept == ranked[: len(callback.plan.kept)]


def test_residual_run_exports_and_reloads_exactly(tmp_path):
    model = tiny_llama()
    callback = LoraDropCallback(alpha=0.25, **RESIDUAL)
    args = training_args(tmp_path, max_steps=12, learning_rate=5e-3)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[callback]).train()
    assert callback.plan.kept and callback.plan.dropped
    assert_saved_adapter_reloads_exactly(model, tmp_path / "peft")
    compact = save_compact(model, tmp_path / "compact")
    assert torch.equal(model_logits(load_compact(tiny_llama_base(), compact)), model_logits(model))


def _run(tmp_path, resume_from=None, save_steps=None):
    callback = LoraDropCallback(alpha=0.25, **RESIDUAL)
    return callback, lora_state(train_tiny_llama(tmp_path, callback, resume_from, save_steps))


@pytest.mark.parametrize("checkpoint", [3, 8], ids=["before-switch", "after-switch"])
def test_resume_gives_the_same_plan_and_weights(tmp_path, checkpoint):
    full, full_lora = _run(tmp_path / "full", save_steps=checkpoint)
    assert full.plan.step == 5
    resumed, resumed_lora = _run(
        tmp_path / "resumed", resume_from=str(tmp_path / "full/out" / f"checkpoint-{checkpoint}")
    )
    assert resumed.plan == full.plan
    for name, value in full_lora.items():
        assert torch.equal(resumed_lora[name], value), name


@pytest.mark.parametrize(
    "settings", [{"mode": "share"}, {"mode": "drop"}, {"mode": "truncate", "aggregate": "rank"}], ids=str
)
def test_residual_needs_truncate_and_sum(settings):
    with pytest.raises(ValueError, match="score='residual' measures what truncation"):
        LoraDropConfig(score="residual", **settings)
