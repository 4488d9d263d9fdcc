"""Re-parameterising a PEFT model according to a drop plan, and undoing it.

What the switch does to the dropped modules is their mode's (`modes`: tied in place or by their gradients in "share",
switched off in "drop", cut to a lower rank in "truncate"); `apply_plan` and `reparameterise` hand the layers to the
plan's mode. Setting new values on any engine (`set_values`) is written once here, for every mode and for
`restart`. `UntiedLora` keeps the layers as they were before the plan, so that a best-model restore to a checkpoint
from before the switch makes them plain LoRA again, whatever the mode did.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .grad_tying import GradientTying, reset_sharded
from .modes import mode_of
from .modes.base import Run
from .plan import DropPlan, attached_plan
from .sharding import is_deepspeed_optimizer, parameter_engine


def apply_plan(layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str = "rank") -> None:
    """Re-parameterise the dropped modules of `plan` in place, as its mode says (`modes`): tie them to one LoRA per
    kind ("share"), switch them off ("drop"), or scale them as their lower rank ("truncate"; their values are the
    model's own, which `reparameterise` sets at the switch, and with `dropped_scaling="keep"` it changes nothing here).

    Idempotent: applying the plan to an already re-parameterised model changes nothing, which is what resuming from
    a checkpoint relies on.

    Args:
        layers: `{module name: LoRA layer}` of the plan's modules.
        plan: the drop plan.
        dropped_scaling: `LoraDropConfig.dropped_scaling`, for a mode that rescales the dropped modules.
    """
    check_plan_matches(layers, plan)
    mode_of(plan.mode).apply(layers, plan, dropped_scaling=dropped_scaling)


def reparameterise(
    layers: dict[str, LoraLayer],
    plan: DropPlan,
    optimizer: object,
    *,
    at_switch: bool,
    fresh_seed: int | None = None,
    dropped_scaling: str = "rank",
    input_grams: Mapping[str, torch.Tensor] | None = None,
) -> GradientTying | None:
    """Apply `plan` to a model in training, on whatever engine holds its LoRA, as its mode says; every rank must call
    it.

    Args:
        layers: `{module name: LoRA layer}` of the plan's modules.
        plan: the drop plan.
        optimizer: the optimizer as the Trainer holds it.
        at_switch: True at the switch (members are made equal, values and optimizer state); False when resuming from
            a checkpoint written after the switch, which already holds them equal (or tied).
        fresh_seed: start the shared LoRA afresh from this seed (`shared_init="fresh"`); None keeps the most
            important dropped module's weights. Only used at the switch.
        dropped_scaling: mode "truncate": "rank" scales truncated modules as a rank-k LoRA, "keep" leaves the
            adapter's scaling (`LoraDropConfig.dropped_scaling`).
        input_grams: mode "truncate" with `truncation="activation"`: each module's r x r token Gram over the
            collection, all-reduced (`ImportanceCollector.input_grams`); None truncates by SVD. Only used at the
            switch.

    Returns:
        The `GradientTying` that keeps sharded members equal (remove it when training ends), or None when the plan
        was applied in place.
    """
    return mode_of(plan.mode).reparameterise(
        layers, plan, Run(optimizer, at_switch, fresh_seed, dropped_scaling, input_grams)
    )


def set_values(values: list[tuple[nn.Parameter, torch.Tensor]], optimizer: object) -> None:
    """Give Parameters new (whole, float32) values and forget their optimizer state, on any engine."""
    if parameter_engine(param for param, _ in values) != "replicated":
        reset_sharded(values, optimizer)
    else:
        _reset_parameters({param: value.to(param.device) for param, value in values}, optimizer)


def check_plan_matches(layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    """Refuse a plan that names modules `layers` does not hold."""
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
    Its step count belongs to a whole partition, though: the moments are zeroed and Adam's bias correction goes on from
    the run's step, where a torch optimizer, forgetting the Parameter's state, starts it again at step 1.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if is_deepspeed_optimizer(inner):
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


_UNTIED_ATTR = "_loradrop_untied"  # where a model keeps the state of its layers before its first plan


def untied_before_plan(model: nn.Module, layers: dict[str, LoraLayer], adapter: str) -> UntiedLora | None:
    """The state of `layers` before any plan was applied to `model`, to undo the plan later; None if unknown.

    A model that carries no plan is captured as it is, and the capture kept on the model. A model that carries one
    (an earlier `train()` in this process re-parameterised it, and this one resumes past the switch) holds tied
    Parameters, truncated scalings or switched-off modules: capturing it would "undo" the plan into the plan, so the
    capture its first run kept is returned, if it covers `layers`.
    """
    if attached_plan(model)[0] is None:
        untied = UntiedLora(layers, adapter)
        setattr(model, _UNTIED_ATTR, untied)
        return untied
    untied = getattr(model, _UNTIED_ATTR, None)
    return untied if untied is not None and untied.covers(layers, adapter) else None


class UntiedLora:
    """The LoRA Parameters, active adapters, scalings and `requires_grad` of layers as they are before the plan is
    applied, to undo the plan later.

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
        self._requires_grad = {
            param: param.requires_grad
            for parts in self._parameters.values()
            for params in parts.values()
            for param in params.values()
        }
        self._active = {name: list(layer.active_adapters) for name, layer in layers.items()}
        self._scaling = {name: layer.scaling[adapter] for name, layer in layers.items()}
        self.engine = parameter_engine(self._requires_grad)

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The layers' own LoRA Parameters, as they were before the plan tied any of them."""
        return list(self._requires_grad)

    def covers(self, layers: dict[str, LoraLayer], adapter: str) -> bool:
        """Whether this is the state of exactly `layers` (the same layer objects) for `adapter`."""
        return (
            adapter == self._adapter
            and self._layers.keys() == layers.keys()
            and all(self._layers[name] is layer for name, layer in layers.items())
        )

    @property
    def reload_needed(self) -> bool:
        """Whether a checkpoint the Trainer loaded into the re-parameterised model must be loaded again once every
        module has its own LoRA back.

        Only where the LoRA is replicated: there members of a shared group were tied in place, so the load wrote all
        of them into one Parameter (the last one wins), and PEFT can load the adapter again into whole Parameters.
        Sharded members (FSDP2, ZeRO-3) keep their own Parameters, which the engine's own load of the checkpoint
        filled one by one; PEFT cannot load into their shards or partitions (a size mismatch), nor need it.
        """
        return self.engine == "replicated"

    def restore(self) -> None:
        """Give every layer its own LoRA Parameters and scaling back, switch dropped LoRA on again and let it train
        again."""
        for name, layer in self._layers.items():
            if self.engine == "replicated":  # sharded members were never tied in place: the engine owns their slots
                for part, parameters in self._parameters[name].items():
                    for pname, param in parameters.items():
                        setattr(getattr(layer, part)[self._adapter], pname, param)
            layer._active_adapter = list(self._active[name])
            layer.scaling[self._adapter] = self._scaling[name]
        for param, requires_grad in self._requires_grad.items():
            param.requires_grad_(requires_grad)
