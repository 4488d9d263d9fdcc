"""truncation="activation": each dropped module keeps the rank-k LoRA with the least output error on the inputs it saw
during the collection. Checked against an independent reference (the full input covariance, not the r x r Gram the
library sums), against the SVD it replaces, and end to end (Trainer, export, resume; DDP, ZeRO-3 and FSDP2 are in
test_distributed.py's `act` runs)."""

import pytest
import torch
from helpers import (
    TokenDataset,
    assert_saved_adapter_reloads_exactly,
    lora_state,
    model_logits,
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
from loradrop_trainer.importance import truncation_residual
from loradrop_trainer.truncate import truncated_values

ACTIVATION = {"mode": "truncate", "dropped_rank": 1, "truncation": "activation", "normalize": "global"}


def _best_on_inputs(delta: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` matrix M with the least `sum_t ||(delta - M) x_t||^2` over the rows x_t of `x`, from the full
    input covariance S = X^T X (Eckart-Young in the metric S: M = [delta S^1/2]_rank S^-1/2), in float64."""
    values, vectors = torch.linalg.eigh(x.double().T @ x.double())
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    inverse_root = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(delta.double() @ root)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ inverse_root


def _output_error(delta: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float((x.double() @ (delta.double() - approx.double()).T).square().sum().detach())


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_activation_truncation_is_the_best_rank_k_on_the_inputs(rank):
    """On correlated inputs (most of their energy in a few directions), the factors' product is the reference optimum,
    its output error is the residual score's, and it is well below the truncated SVD's."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 20), torch.randn(12, 6)
    x = torch.randn(200, 20) @ torch.diag(torch.logspace(1, -1, 20))  # anisotropic inputs
    gram = (x @ a.T).T @ (x @ a.T)
    new_a, new_b = truncated_values(a, b, rank, scale=0.5, gram=gram)
    assert not new_a[rank:].any() and not new_b[:, rank:].any()  # the zero block mode "truncate" relies on
    delta = b @ a
    best = _best_on_inputs(delta, x, rank)
    assert torch.allclose((new_b @ new_a).double(), 0.5 * best, atol=1e-4 * float(best.abs().max()))
    error = _output_error(delta, best, x)
    assert truncation_residual(a, b, gram, rank, 1.0, activation=True) == pytest.approx(error, rel=1e-5)
    svd_a, svd_b = truncated_values(a, b, rank)
    assert error < 0.9 * _output_error(delta, svd_b @ svd_a, x)
    assert truncation_residual(a, b, gram, rank, 1.0) == pytest.approx(_output_error(delta, svd_b @ svd_a, x), rel=1e-5)
    # A's rows keep the magnitude they had (the learning signal B gets stays what it was).
    assert new_a[:rank].norm(dim=1) == pytest.approx([float(a.norm() / 6**0.5)] * rank, rel=1e-5)


def test_without_input_energy_the_truncation_is_the_svd():
    """A module that saw no input (a zero Gram) has no output to keep: it gets the truncated SVD, not NaNs."""
    torch.manual_seed(1)
    a, b = torch.randn(4, 10), torch.randn(8, 4)
    got = truncated_values(a, b, 1, gram=torch.zeros(4, 4))
    expected = truncated_values(a, b, 1)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def _input_covariances(model, batches) -> dict[str, torch.Tensor]:
    """Per LoRA layer: `sum_t m_t x_t x_t^T` of its input over the real tokens of `batches` (a forward hook's view)."""
    layers = find_lora_layers(model)
    covariance = {name: 0.0 for name in layers}
    mask: list[torch.Tensor] = []

    def hook(module, args, out, name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double() * mask[0]
        covariance[name] = covariance[name] + x.T @ x

    handles = [
        layer.register_forward_hook(lambda m, args, out, name=name: hook(m, args, out, name))
        for name, layer in layers.items()
    ]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            mask[:] = [batch["attention_mask"].reshape(-1, 1).double()]
            model(**batch)
    for handle in handles:
        handle.remove()
    return covariance


def test_trainer_truncates_each_dropped_module_to_its_best_rank_one_on_the_scored_tokens(tmp_path):
    """Learning rate 0 (the weights at the switch are the initial ones): every dropped module's LoRA after the switch
    is the reference optimum over the real tokens of the micro-batches the Trainer scored, and loses less of its
    output on them than the SVD would."""
    model = random_lora_b(tiny_llama())
    before = {name: layer.scaling["default"] for name, layer in find_lora_layers(model).items()}
    deltas = {
        name: (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        for name, layer in find_lora_layers(model).items()
    }
    micro_batches = record_training_batches(model)
    callback = LoraDropCallback(alpha=0.5, threshold=0.6, **ACTIVATION)
    args = training_args(tmp_path, max_steps=8, learning_rate=0.0, per_device_train_batch_size=4)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=32, seed=5), callbacks=[callback]).train()
    plan = callback.plan
    assert plan.kept and plan.dropped
    covariance = _input_covariances(random_lora_b(tiny_llama()), micro_batches[: plan.step])
    layers = find_lora_layers(model)
    gains = []
    for name in plan.dropped:
        layer = layers[name]
        got = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
        values, vectors = torch.linalg.eigh(covariance[name])
        x = vectors * values.clamp_min(0).sqrt()  # X^T X = covariance: the same errors as the tokens themselves
        expected = before[name] * _best_on_inputs(deltas[name], x.T, 1)
        assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max())), name
        svd = before[name] * (deltas[name] - _svd_tail(deltas[name], 1))
        gains.append(
            _output_error(before[name] * deltas[name], svd, x.T) - _output_error(before[name] * deltas[name], got, x.T)
        )
    assert min(gains) > -1e-6 and max(gains) > 0


def _svd_tail(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, rank:] @ torch.diag(s[rank:]) @ vh[rank:]


def _run(tmp_path, resume_from=None, save_steps=None, **settings):
    callback = LoraDropCallback(**{"alpha": 0.25, "threshold": 0.6, **ACTIVATION, **settings})
    model = train_tiny_llama(tmp_path, callback, resume_from, save_steps)
    return model, callback, lora_state(model)


@pytest.mark.parametrize("score", ["output", "residual"])
def test_activation_run_exports_and_reloads_exactly(tmp_path, score):
    model, callback, _ = _run(tmp_path, score=score)
    assert callback.plan.kept and callback.plan.dropped
    assert_saved_adapter_reloads_exactly(model, tmp_path / "peft")
    compact = save_compact(model, tmp_path / "compact")
    assert torch.equal(model_logits(load_compact(tiny_llama_base(), compact)), model_logits(model))


@pytest.mark.parametrize("checkpoint", [3, 8], ids=["before-switch", "after-switch"])
def test_resume_gives_the_same_plan_and_weights(tmp_path, checkpoint):
    """Before the switch the checkpoint carries the token Grams summed so far; after it, the truncated weights."""
    _, full, full_lora = _run(tmp_path / "full", save_steps=checkpoint)
    assert full.plan.step == 5
    _, resumed, resumed_lora = _run(
        tmp_path / "resumed", resume_from=str(tmp_path / "full/out" / f"checkpoint-{checkpoint}")
    )
    assert resumed.plan == full.plan
    for name, value in full_lora.items():
        assert torch.equal(resumed_lora[name], value), name


def test_resuming_a_run_that_summed_no_grams_measures_again(tmp_path, warnings_log):
    """A checkpoint from before the switch of a run with the truncated SVD holds no token Grams: resumed with
    truncation="activation", its importance is left out and the collection starts again, rather than truncating by
    the Grams of the last steps only; past the switch there is nothing left to measure, and that is refused."""
    _run(tmp_path / "svd", save_steps=3, truncation="svd")
    _, resumed, _ = _run(tmp_path / "resumed", resume_from=str(tmp_path / "svd/out/checkpoint-3"))
    assert "no token Grams (now truncation='activation')" in warnings_log.text
    assert "starts again at step 3" in warnings_log.text and resumed.plan.step == 5
    with pytest.raises(ValueError, match=r"no token Grams.*no steps left"):
        _run(tmp_path / "past", resume_from=str(tmp_path / "svd/out/checkpoint-3"), alpha=0.1)


@pytest.mark.parametrize("settings", [{"mode": "share"}, {"mode": "drop"}], ids=str)
def test_activation_truncation_needs_mode_truncate(settings):
    with pytest.raises(ValueError, match="truncation only applies to mode='truncate'"):
        LoraDropConfig(truncation="activation", **settings)


def test_unknown_truncation_is_refused():
    with pytest.raises(ValueError, match=r"truncation must be one of \('svd', 'activation'\)"):
        LoraDropConfig(truncation="frobenius")
