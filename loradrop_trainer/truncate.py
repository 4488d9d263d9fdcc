"""Mode "truncate": each dropped module keeps a LoRA of its own, cut to a lower rank by SVD at the switch.

Sharing one LoRA per kind (the paper's method) takes every dropped module's own adaptation away, and on the tasks we
measured that costs more than lowering the rank of every module (README, Results). Truncation keeps each dropped
module's best rank-k approximation of what it has learnt and lets it go on learning at rank k, while the modules the
importance ranking keeps go on at the adapter's rank r: an importance-guided rank allocation, decided once.

The Parameters keep their shapes, which the optimizer, DDP's reducer and DeepSpeed's flat buffers depend on: a
truncated module's `lora_A` holds its k rows followed by zero rows, its `lora_B` its k columns followed by zero
columns. That zero block stays exactly zero: its gradient is zero (each zero row of A only meets zero columns of B),
and the module's optimizer state is reset at the switch, so Adam, AdamW, SGD and the like never move it. A module
truncated to rank k then computes exactly what a rank-k LoRA computes, and exports as one (`rank_pattern`).

Scaling follows PEFT by default (`dropped_scaling="rank"`): a rank-k LoRA is scaled by `lora_alpha / k`
(`lora_alpha / sqrt(k)` with rsLoRA), so from the switch on a truncated module learns as a plain rank-k LoRA with the
same `lora_alpha` does; its values are rescaled so that its output is unchanged at the switch. The PEFT config records
that scaling (`record_truncation`), so the adapter `save_pretrained` and the Trainer's checkpoints write computes what
the model computes. With `dropped_scaling="keep"` a truncated module keeps the adapter's `lora_alpha / r`: its values
are not rescaled, the config records nothing, and the saved adapter is a plain uniform LoRA. The two differ only in
the step size a truncated module learns with after the switch (`lora_alpha / k` is r / k times larger), which is what
the benchmarks separate with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from .peft_keys import pattern_key
from .plan import DropPlan
from .sharding import is_deepspeed_optimizer, parameter_engine, whole_tensors


def rank_scaling(layer: LoraLayer, adapter: str, rank: int) -> float:
    """The scaling PEFT gives `layer`'s LoRA at rank `rank`, with the layer's own `lora_alpha` and rsLoRA setting."""
    return scaling_at_rank(layer.lora_alpha[adapter], rank, layer.use_rslora.get(adapter, False))


def scaling_at_rank(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling of a rank-`rank` LoRA: `lora_alpha / rank`, or `lora_alpha / sqrt(rank)` with rsLoRA."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


@torch.no_grad()
def truncated_values(
    a: torch.Tensor, b: torch.Tensor, rank: int, scale: float = 1.0, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of `b @ a`, as zero-padded float32 factors of the same shapes.

    Returns `(a', b')` with `b' @ a' = scale * P b a`, where `P` projects on `rank` output directions: the top left
    singular vectors of `b @ a` (the truncated SVD, least Frobenius error), or with `gram` those of
    `b @ a @ X` for the inputs `X` whose `a`-projections have the Gram `gram = sum_t (a x_t)(a x_t)^T`, which gives the
    rank-`rank` matrix with the least output error `sum_t ||(b a - M) x_t||^2` on those inputs
    (`kept_directions`). `a'`'s first `rank` rows are unit directions scaled to the root-mean-square row norm of `a`
    (so `a` keeps the magnitude PEFT's initialisation gave it, and the learning signal `b` gets stays what it was),
    and the rest of each factor is zero. Computed in float64 from thin QR factors, so the cost is O((in + out) r^2)
    and the full matrix `b @ a` is never formed.

    Args:
        a: `lora_A` weight, shape (r, in_features).
        b: `lora_B` weight, shape (out_features, r).
        rank: the rank to keep, 1 <= rank <= r.
        scale: factor for the product (the ratio of the old scaling to the new one).
        gram: the r x r token Gram of `lora_B`'s inputs (`LoraDropConfig(truncation="activation")`); None for the
            truncated SVD.
    """
    r = a.shape[0]
    if not 1 <= rank <= r or b.shape[1] != r:
        raise ValueError(f"Cannot truncate a rank-{r} LoRA (A {tuple(a.shape)}, B {tuple(b.shape)}) to rank {rank}.")
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    row_norm = a64.norm() / math.sqrt(r)
    row_norm = row_norm if row_norm > 0 else a64.new_tensor(1.0)
    new_a, new_b = torch.zeros_like(a64), torch.zeros_like(b64)
    if gram is not None:
        left = kept_directions(a64, b64, rank, gram)
        rows = (left.T @ b64) @ a64  # (rank, in): what each kept output direction reads from the input
        norms = rows.norm(dim=1)
        if bool((norms > 0).all()):
            new_a[:rank] = rows / norms[:, None] * row_norm
            new_b[:, :rank] = left * (norms * scale / row_norm)
            return new_a.float(), new_b.float()
        # b @ a itself has rank below `rank`: the truncated SVD keeps all of it, and is well defined.
    q_b, r_b = torch.linalg.qr(b64)
    q_a, r_a = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    left = q_b @ u[:, :rank]  # (out, rank)
    right = q_a @ vh[:rank].T  # (in, rank)
    new_a[:rank] = right.T * row_norm
    new_b[:, :rank] = left * (s[:rank] * scale / row_norm)
    return new_a.float(), new_b.float()


def kept_directions(a: torch.Tensor, b: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """The `rank` orthonormal output directions (out_features x rank, float64) a truncation of `b @ a` keeps: the top
    left singular vectors of `b @ a`, or with `gram` (the r x r Gram of `a x` over some inputs) those of `b @ a @ X`,
    the eigenvectors of `b gram b^T`. Either way the truncation is `P b a` with `P` the projection on them, and what it
    takes from an input's output is `(I - P) b a x`.

    Args:
        a: `lora_A` weight, shape (r, in_features), float64.
        b: `lora_B` weight, shape (out_features, r), float64.
        rank: how many directions.
        gram: the token Gram (a larger zero-padded one is cut to r x r); None for the SVD of `b @ a`.
    """
    r = a.shape[0]
    q_b, r_b = torch.linalg.qr(b)
    if gram is not None:
        # gram^(1/2) by eigendecomposition (a Gram is symmetric positive semi-definite; rounding can make tiny
        # eigenvalues negative, which clamp to zero).
        values, vectors = torch.linalg.eigh(gram[:r, :r].to(b))
        u, s, _ = torch.linalg.svd(r_b @ (vectors * values.clamp_min(0).sqrt()) @ vectors.T)
        if s[rank - 1] > s[0] * r * torch.finfo(s.dtype).eps:
            return q_b @ u[:, :rank]
        # Fewer than `rank` output directions carry any of these inputs' energy (a module that saw no input): any
        # rank-k matrix with them is as good there, and the truncated SVD is the one that is well defined.
    _, r_a = torch.linalg.qr(a.T)
    u, _, _ = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u[:, :rank]


def truncated_dropped_values(
    layers: dict[str, LoraLayer],
    plan: DropPlan,
    optimizer: object = None,
    dropped_scaling: str = "rank",
    input_grams: Mapping[str, torch.Tensor] | None = None,
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """`(Parameter, new whole float32 value)` for the A and B of every dropped module, cut to `plan.dropped_rank` and,
    with `dropped_scaling="rank"`, rescaled for the scaling `set_truncated_scaling` then gives it (`reparam.set_values`
    writes them on any engine); with "keep" the module's scaling stays, and so do the values' magnitudes.

    The SVD is taken of what the optimizer trains: under DeepSpeed its fp32 master weights (the module's bf16 or fp16
    weights are their rounding, and the truncated values become the new masters), otherwise the Parameters. Sharded
    weights are gathered to compute it (every rank must call it). Replicated weights are truncated from rank 0's
    values, broadcast, so every rank of a DDP or ZeRO-1/2 run ends with the very same numbers.

    Args:
        layers: `{module name: LoRA layer}` of the plan's modules.
        plan: a plan in mode "truncate".
        optimizer: the optimizer as the Trainer holds it (None: the Parameters' own values).
        dropped_scaling: "rank" or "keep" (`LoraDropConfig.dropped_scaling`).
        input_grams: `{module name: r x r token Gram of lora_B's inputs}` over the collection, the same on every
            rank (`LoraDropConfig(truncation="activation")`: each module keeps the rank-k approximation with the least
            output error on those inputs); None for the truncated SVD.
    """
    adapter, rank = plan.adapter_name, plan.dropped_rank
    weights = [(layers[name].lora_A[adapter].weight, layers[name].lora_B[adapter].weight) for name in plan.dropped]
    whole = trained_values([p for pair in weights for p in pair], optimizer)
    values: list[tuple[nn.Parameter, torch.Tensor]] = []
    for index, (name, (a, b)) in enumerate(zip(plan.dropped, weights)):
        layer = layers[name]
        scale = 1.0 if dropped_scaling == "keep" else layer.scaling[adapter] / rank_scaling(layer, adapter, rank)
        gram = input_grams[name] if input_grams is not None else None
        new_a, new_b = truncated_values(whole[2 * index], whole[2 * index + 1], rank, scale, gram)
        values += [(a, new_a), (b, new_b)]
    if parameter_engine(p for pair in weights for p in pair) == "replicated":
        _broadcast_from_first_rank([value for _, value in values])
    return values


def trained_values(params: list[nn.Parameter], optimizer: object = None) -> list[torch.Tensor]:
    """The whole values the optimizer trains for `params`: DeepSpeed's fp32 masters when `optimizer` is DeepSpeed's
    (a collective under every ZeRO stage), else the Parameters (gathered when sharded: `whole_tensors`)."""
    if not is_deepspeed_optimizer(getattr(optimizer, "optimizer", optimizer)):
        return whole_tensors(params)
    from deepspeed.utils import safe_get_full_fp32_param

    values = [safe_get_full_fp32_param(param) for param in params]
    if any(value is None for value in values):  # Parameters DeepSpeed does not optimise (not expected here)
        return whole_tensors(params)
    return [value.detach() for value in values]


def set_truncated_scaling(layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    """Give every dropped module the scaling of a rank-`plan.dropped_rank` LoRA (idempotent; resuming needs it)."""
    adapter = plan.adapter_name
    for name in plan.dropped:
        layer = layers[name]
        layer.scaling[adapter] = rank_scaling(layer, adapter, plan.dropped_rank)


def truncated_alpha(layer: LoraLayer, adapter: str, rank: int) -> float:
    """The `lora_alpha` that makes PEFT give a rank-r LoRA the scaling of a rank-`rank` one (`rank_scaling`): what a
    plain PEFT adapter saved with every module at rank r (`save_pretrained`, the Trainer's checkpoints) needs in its
    `alpha_pattern` to compute what the truncated module computes. Exact when r is a power of two."""
    return alpha_at_rank(layer.lora_alpha[adapter], layer.r[adapter], rank, layer.use_rslora.get(adapter, False))


def alpha_at_rank(lora_alpha: float, r: int, rank: int, use_rslora: bool) -> float:
    """`truncated_alpha` from plain numbers: the `lora_alpha` with which PEFT scales a rank-`r` LoRA as it scales a
    rank-`rank` one with `lora_alpha` (exporters check a saved config's `alpha_pattern` with it)."""
    return scaling_at_rank(lora_alpha, rank, use_rslora) * (math.sqrt(r) if use_rslora else r)


def record_truncation(config: LoraConfig, layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    """Put the truncated modules' scaling into the PEFT config, as `alpha_pattern` entries ahead of the user's own
    (PEFT takes the first key that matches), so that `save_pretrained` writes an adapter that computes what the
    model computes. Idempotent."""
    ours = {
        pattern_key(name): truncated_alpha(layers[name], plan.adapter_name, plan.dropped_rank) for name in plan.dropped
    }
    theirs = {key: value for key, value in config.alpha_pattern.items() if key not in ours}
    config.alpha_pattern = {**ours, **theirs}


def forget_truncation(config: LoraConfig, plan: DropPlan) -> None:
    """Take `record_truncation`'s entries out of the PEFT config again (the user's own `alpha_pattern` stays)."""
    ours = {pattern_key(name) for name in plan.dropped}
    config.alpha_pattern = {key: value for key, value in config.alpha_pattern.items() if key not in ours}


def check_truncatable(layers: dict[str, LoraLayer], adapter: str, rank: int) -> None:
    """Refuse, before the first step, a `dropped_rank` that is not below every participating module's rank."""
    too_small = {name: layer.r[adapter] for name, layer in layers.items() if layer.r[adapter] <= rank}
    if too_small:
        name, r = next(iter(too_small.items()))
        raise ValueError(
            f"LoraDropConfig(mode='truncate', dropped_rank={rank}) cuts dropped modules to rank {rank}, but "
            f"{len(too_small)} LoRA modules have rank {rank} or less already (first: {name}, r={r}). Choose a "
            "dropped_rank below the adapter's r (LoraConfig(r=...)), or exclude those modules."
        )


def _broadcast_from_first_rank(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` (on their Parameters' device) with rank 0's values (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
