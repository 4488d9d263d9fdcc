"""Re-parameterising a PEFT model in place according to a drop plan.

Dropped modules of one kind are tied to the LoRA Parameters of the most important dropped module of that kind.
Those Parameters are already known to the optimizer, to DDP's reducer and to DeepSpeed's flat buffers, so training
goes on with no optimizer surgery: autograd sums the gradients of every user of a shared Parameter, and the
Parameters the dropped modules used to own simply stop receiving gradients (torch optimizers skip them).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .lora_layers import lora_parameters
from .plan import DropPlan


def apply_plan(layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    """Tie (mode "share") or switch off (mode "drop") the dropped modules of `plan`, in place.

    Idempotent: applying the plan to an already re-parameterised model changes nothing, which is what resuming from
    a checkpoint relies on.
    """
    _check_plan_matches(layers, plan)
    adapter = plan.adapter_name
    for members in plan.shared.values():
        if plan.mode == "drop":
            for name in members:
                _deactivate(layers[name], adapter)
            continue
        source = layers[members[0]]
        for name in members[1:]:
            for part in ("lora_A", "lora_B"):
                target_module = getattr(layers[name], part)[adapter]
                for pname, param in getattr(source, part)[adapter].named_parameters(recurse=False):
                    setattr(target_module, pname, param)


def reinit_shared(
    layers: dict[str, LoraLayer], plan: DropPlan, optimizer: torch.optim.Optimizer | None, seed: int
) -> None:
    """Start every shared LoRA afresh (A as PEFT initialises it, B zero) and forget its optimizer state.

    The random A comes from its own generator seeded with `seed`: every rank draws the same values, and the global
    RNG stream (dropout, data order) is left as an uninterrupted run would have it.
    """
    adapter = plan.adapter_name
    generator = torch.Generator().manual_seed(seed)
    for members in plan.shared.values():
        source = layers[members[0]]
        a, b = source.lora_A[adapter], source.lora_B[adapter]
        with torch.no_grad():
            fresh_a = torch.empty(a.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh_a, a=math.sqrt(5), generator=generator)
            fresh_a = fresh_a.to(a.weight.device)
            values = {a.weight: fresh_a, b.weight: torch.zeros_like(b.weight, dtype=torch.float32)}
            if b.bias is not None:
                values[b.bias] = torch.zeros_like(b.bias, dtype=torch.float32)
        _reset_parameters(values, optimizer)


def zero_dropped(layers: dict[str, LoraLayer], plan: DropPlan, optimizer: torch.optim.Optimizer | None) -> None:
    """Set the B of every dropped module (mode "drop") to zero, in the module and in the optimizer's copies.

    A dropped module no longer computes its LoRA, but `save_pretrained` still writes its weights, and plain PEFT
    switches every module on when it loads them: with B at zero that adapter computes what the trained model did.
    """
    adapter = plan.adapter_name
    values = {}
    for name in plan.dropped:
        weight = layers[name].lora_B[adapter].weight
        values[weight] = torch.zeros_like(weight, dtype=torch.float32)
    _reset_parameters(values, optimizer)


def shared_parameters(layers: dict[str, LoraLayer], plan: DropPlan) -> list[nn.Parameter]:
    """The Parameters of every shared LoRA (one pair per kind)."""
    return [p for members in plan.shared.values() for p in lora_parameters(layers[members[0]], plan.adapter_name)]


def _deactivate(layer: LoraLayer, adapter: str) -> None:
    """Stop `layer` from computing its LoRA: it then returns exactly the frozen layer's output, at its cost."""
    layer._active_adapter = [name for name in layer.active_adapters if name != adapter]


def _check_plan_matches(layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    unknown = [name for name in plan.kinds if name not in layers]
    if unknown:
        raise ValueError(
            f"The drop plan names {len(unknown)} LoRA modules the model does not have (first: {unknown[0]!r}). "
            "The plan was made for another model, adapter or target/exclude filter."
        )


def _reset_parameters(values: dict[nn.Parameter, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
    """Set Parameters to new values and drop their optimizer moments, for torch optimizers and DeepSpeed alike.

    DeepSpeed keeps an fp32 master copy and the moments in flat partitions the module never sees, so writing into
    the module's (bf16) weight would be overwritten at the next step; its `safe_set_*` setters write the partitions.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if _is_deepspeed_optimizer(inner):
        from deepspeed.utils import (
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        for param, value in values.items():
            safe_set_full_fp32_param(param, value)
            for key in ("exp_avg", "exp_avg_sq"):
                if safe_get_full_optimizer_state(param, key) is not None:
                    safe_set_full_optimizer_state(param, torch.zeros_like(value), key)
            with torch.no_grad():
                param.copy_(value)
        return
    with torch.no_grad():
        for param, value in values.items():
            param.copy_(value)
            if inner is not None:
                inner.state.pop(param, None)


def _is_deepspeed_optimizer(optimizer: object) -> bool:
    return type(optimizer).__module__.startswith("deepspeed.")


class UntiedLora:
    """The LoRA Parameters and active adapters of layers as they are before `apply_plan`, to undo the plan later.

    The Trainer can put a model back to a checkpoint from before the switch (`load_best_model_at_end`); that
    checkpoint's weights only mean what they meant with every module holding its own LoRA again.
    """

    def __init__(self, layers: dict[str, LoraLayer], adapter: str) -> None:
        self._layers = layers
        self._adapter = adapter
        self._parameters = {
            name: {
                part: dict(getattr(layer, part)[adapter].named_parameters(recurse=False))
                for part in ("lora_A", "lora_B")
            }
            for name, layer in layers.items()
        }
        self._active = {name: list(layer.active_adapters) for name, layer in layers.items()}

    def restore(self) -> None:
        """Give every layer its own LoRA Parameters back and switch dropped LoRA on again."""
        for name, layer in self._layers.items():
            for part, parameters in self._parameters[name].items():
                for pname, param in parameters.items():
                    setattr(getattr(layer, part)[self._adapter], pname, param)
            layer._active_adapter = list(self._active[name])
