"""Gradient tying: shared LoRA for sharded Parameters (FSDP2, DeepSpeed ZeRO-3), where tying in place cannot work.

Every member of a shared group keeps its own LoRA Parameters. At the switch all members are made equal to the group's
source (the most important dropped module), values and optimizer state alike, or all are started afresh together.
Then, before every optimizer update, each member's gradient is replaced by the sum of the group's gradients: the
gradient the one shared Parameter of the in-place scheme gets from autograd. Equal values, equal state and equal
gradients make a deterministic optimizer (Adam, AdamW, SGD, ...) give equal updates, so the members stay bit-identical
and the group trains as one LoRA.

Everything happens on each rank's own shard, with no communication: FSDP2 shards every Parameter on dim 0 by itself
(`Shard(0)` over the same mesh), and ZeRO-3 partitions every Parameter by itself, flat and evenly; so members of one
shape are cut at the same places, and the sum of the local shards is the local shard of the sum.

Where the gradient sum happens, and so what gradient clipping sees:

- FSDP2 (a torch optimizer): in a step pre-hook of the optimizer (`Optimizer.register_step_pre_hook`), which fires
  after the Trainer clipped the gradients, right before the update. Clipping therefore sees each member's own
  gradient (the untied model's norm), and scales them all by one factor, which the sum keeps.
- ZeRO-3: DeepSpeed clips inside its own `step()`, and accelerate runs `engine.backward` and `engine.step` back to
  back with no event between them; the sum is taken as that step starts (the ZeRO-3 optimizer's `step` is wrapped on
  the instance; its partitioned gradients are read and written with DeepSpeed's `safe_get/set_local_grad`). Clipping
  therefore sees the tied gradients, the group's sum once per member.

With clipping inactive (a norm below `max_grad_norm`) both are the in-place scheme's arithmetic exactly. When it clips,
the norm it divides by differs from the in-place scheme's (which counts each group's sum once): the update keeps its
direction, and its length may differ. Either way the members stay bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .plan import DropPlan
from .sharding import Engine, parameter_engine


class GradientTying:
    """Keeps the members of every shared group of `plan` equal while an optimizer trains them (see module docstring).

    Args:
        layers: `{module name: LoRA layer}` of the plan's modules.
        plan: a plan in mode "share".
        optimizer: the optimizer as the Trainer holds it (accelerate and DeepSpeed wrappers are looked through).
    """

    def __init__(self, layers: dict[str, LoraLayer], plan: DropPlan, optimizer: object) -> None:
        self._parts = shared_groups(layers, plan)
        self.groups: list[list[nn.Parameter]] = [params for _, params in self._parts]
        self.engine: Engine = parameter_engine(p for group in self.groups for p in group)
        if self.engine == "replicated":
            raise ValueError("The LoRA Parameters are not sharded; tie them in place (reparam.apply_plan) instead.")
        self._given_optimizer = optimizer
        self._optimizer = _innermost(optimizer)
        self._check_layout()
        self._handle: RemovableHandle | _StepWrapper | None = None

    def align(self, fresh_seed: int | None = None) -> None:
        """Make every member equal its group's source, values and optimizer state (`fresh_seed=None`), or start
        every group afresh: A as PEFT initialises it from `fresh_seed`, B zero, optimizer state forgotten.

        Every rank must call it (FSDP2 scatters fresh values from rank 0; ZeRO-3 gathers to write its partitions).
        """
        if fresh_seed is None:
            copy = {p: group[0] for group in self.groups for p in group[1:]}
            (_copy_fsdp2 if self.engine == "fsdp2" else _copy_zero3)(copy, self._optimizer)
        else:
            reset_sharded(fresh_values(self._parts, fresh_seed), self._given_optimizer)

    def attach(self) -> None:
        """Sum the groups' gradients before every optimizer update from now on (idempotent)."""
        if self._handle is not None:
            return
        if self.engine == "fsdp2":
            self._handle = self._optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self.sum_gradients())
        else:
            self._handle = _wrap_step(self._optimizer, self.sum_gradients)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def sum_gradients(self) -> None:
        """Replace each member's (local) gradient by the sum over its group, summed in member order on every call."""
        if self.engine == "fsdp2":
            for group in self.groups:
                if any(p.grad is not None for p in group):
                    grads = [_local(p.grad) if p.grad is not None else None for p in group]
                    total = torch.stack([g for g in grads if g is not None]).sum(dim=0)
                    for p, g in zip(group, grads):
                        if g is None:
                            p.grad = torch.zeros_like(p)
                            g = _local(p.grad)
                        g.copy_(total)
            return
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for group in self.groups:
            grads = [safe_get_local_grad(p) for p in group]
            if any(g is None for g in grads):
                continue
            total = torch.stack(grads).sum(dim=0)
            for p in group:
                safe_set_local_grad(p, total)

    def _check_layout(self) -> None:
        for group in self.groups:
            source = group[0]
            for p in group[1:]:
                if self.engine == "fsdp2":
                    same = (
                        p.device_mesh == source.device_mesh
                        and p.placements == source.placements
                        and _local(p).shape == _local(source).shape
                    )
                else:
                    same = p.ds_shape == source.ds_shape and p.ds_tensor.numel() == source.ds_tensor.numel()
                if not same:
                    raise ValueError(
                        "Members of a shared LoRA group are sharded differently, so their gradients cannot be summed "
                        "shard by shard. Shard every LoRA layer the same way (fully_shard each decoder layer, or the "
                        "whole model, with one mesh)."
                    )


def shared_groups(layers: dict[str, LoraLayer], plan: DropPlan) -> list[tuple[str, list[nn.Parameter]]]:
    """`(part, Parameters)` of every shared group, part "lora_A" then "lora_B" per kind, members in plan order.

    Before tying in place these are each member's own Parameters; the first is the group's source.
    """
    adapter = plan.adapter_name
    return [
        (part, [getattr(layers[name], part)[adapter].weight for name in members])
        for members in plan.shared.values()
        for part in ("lora_A", "lora_B")
    ]


def fresh_values(groups: list[tuple[str, list[nn.Parameter]]], seed: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """`(Parameter, float32 value)` for every Parameter of `groups`: one value per group, A as PEFT initialises it
    (kaiming-uniform, drawn in group order from a generator seeded with `seed`), B zero."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for part, params in groups:
        shape = tuple(getattr(params[0], "ds_shape", None) or params[0].shape)  # ZeRO-3 keeps the shape aside
        value = torch.zeros(shape, dtype=torch.float32)
        if part == "lora_A":
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        out += [(param, value) for param in params]
    return out


def reset_sharded(values: list[tuple[nn.Parameter, torch.Tensor]], optimizer: object) -> None:
    """Give sharded Parameters new whole values (float32, the same on every rank) and forget their optimizer state.

    Every rank must call it: FSDP2 scatters the values from rank 0, ZeRO-3 gathers to write its partitions.
    `optimizer` is the optimizer as the Trainer holds it (its wrappers are looked through here).
    """
    engine = parameter_engine(param for param, _ in values)
    (_reset_fsdp2 if engine == "fsdp2" else _reset_zero3)(values, _innermost(optimizer))


def _innermost(optimizer: object) -> object:
    """The optimizer that updates the Parameters: through accelerate's wrapper (and DeepSpeed's, which is ZeRO's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None:
        raise ValueError("Gradient tying needs the optimizer; the Trainer passes it to callbacks as `optimizer`.")
    return inner


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view: writing into it writes the DTensor)."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


@torch.no_grad()
def _copy_fsdp2(copy: dict[nn.Parameter, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    for target, source in copy.items():
        _local(target).copy_(_local(source))
        state = optimizer.state.get(source)
        if state:
            optimizer.state[target] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
        else:
            optimizer.state.pop(target, None)


@torch.no_grad()
def _reset_fsdp2(values: list[tuple[nn.Parameter, torch.Tensor]], optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.tensor import distribute_tensor

    for param, value in values:
        value = value.to(device=_local(param).device, dtype=param.dtype)
        param.copy_(distribute_tensor(value, param.device_mesh, param.placements))
        optimizer.state.pop(param, None)


def _zero3_state_keys(optimizer: object) -> list[str]:
    """The per-element optimizer state ZeRO-3 keeps for its flat fp32 partitions (Adam: exp_avg, exp_avg_sq)."""
    basic = getattr(optimizer, "optimizer", None)
    for state in getattr(basic, "state", {}).values():
        return [key for key, value in state.items() if torch.is_tensor(value) and value.dim() > 0]
    return []


@torch.no_grad()
def _copy_zero3(copy: dict[nn.Parameter, nn.Parameter], optimizer: object) -> None:
    import deepspeed
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_get_local_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    keys = _zero3_state_keys(optimizer)
    for target, source in copy.items():
        safe_set_local_fp32_param(target, safe_get_local_fp32_param(source))
        for key in keys:
            safe_set_local_optimizer_state(target, safe_get_local_optimizer_state(source, key), key)
    # The forward uses the low-precision partitions, which the optimizer refreshes from fp32 only at its next step.
    params = list({id(p): p for pair in copy.items() for p in pair}.values())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        for target, source in copy.items():
            target.data.copy_(source.data)


@torch.no_grad()
def _reset_zero3(values: list[tuple[nn.Parameter, torch.Tensor]], optimizer: object) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    keys = _zero3_state_keys(optimizer)
    params = [param for param, _ in values]
    device = params[0].ds_tensor.device
    for param, value in values:
        safe_set_full_fp32_param(param, value.to(device))
        for key in keys:
            safe_set_full_optimizer_state(param, torch.zeros_like(value, device=device), key)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        for param, value in values:
            param.data.copy_(value)


class _StepWrapper:
    """Undoes `_wrap_step`: the instance's own `step` attribute goes, and the class's method is seen again."""

    def __init__(self, optimizer: object) -> None:
        self.optimizer = optimizer

    def remove(self) -> None:
        self.optimizer.__dict__.pop("step", None)


def _wrap_step(optimizer: object, before: Callable[[], None]) -> _StepWrapper:
    """Run `before()` at the start of `optimizer.step()`, on this instance only."""
    step = optimizer.step

    def step_after_tying(*args, **kwargs):
        before()
        return step(*args, **kwargs)

    optimizer.step = step_after_tying
    return _StepWrapper(optimizer)
