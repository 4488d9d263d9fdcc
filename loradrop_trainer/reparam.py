"""Re-parameterising a PEFT model according to a drop plan.

Where the LoRA Parameters are whole on every rank (one process, DDP, DeepSpeed ZeRO-1/2), dropped modules of one kind
are tied in place to the LoRA Parameters of the most important dropped module of that kind. Those Parameters are
already known to the optimizer, to DDP's reducer and to DeepSpeed's flat buffers, so training goes on with no
optimizer surgery: autograd sums the gradients of every user of a shared Parameter, and the Parameters the dropped
modules used to own simply stop receiving gradients (torch optimizers skip them).

Where they are sharded (FSDP2, ZeRO-3), tying in place cannot survive the engine's own handling of Parameters, and
`reparameterise` ties their gradients instead (`grad_tying`). Mode "drop" only switches modules off, and mode
"truncate" only sets values and scalings (`truncate`), on any engine.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .grad_tying import GradientTying, fresh_values, reset_sharded, shared_groups
from .lora_layers import lora_parameters
from .plan import DropPlan, attached_plan
from .sharding import is_deepspeed_optimizer, parameter_engine
from .truncate import set_truncated_scaling, truncated_dropped_values


def apply_plan(layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str = "rank") -> None:
    """Tie (mode "share"), switch off (mode "drop") or scale as their lower rank (mode "truncate") the dropped modules
    of `plan`, in place. The values of truncated modules are the model's own (`reparameterise` sets them at the
    switch); with `dropped_scaling="keep"` their scaling stays the adapter's, so mode "truncate" changes nothing here.

    Idempotent: applying the plan to an already re-parameterised model changes nothing, which is what resuming from
    a checkpoint relies on.
    """
    _check_plan_matches(layers, plan)
    if plan.mode == "share" and parameter_engine(p for _, group in shared_groups(layers, plan) for p in group) != (
        "replicated"
    ):
        raise ValueError(
            "The LoRA Parameters are sharded (FSDP2 or DeepSpeed ZeRO-3): tying them in place would not survive the "
            "engine. Use reparameterise(..., optimizer), which ties their gradients instead."
        )
    if plan.mode == "truncate":
        if dropped_scaling == "rank":
            set_truncated_scaling(layers, plan)
        return
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


def reparameterise(
    layers: dict[str, LoraLayer],
    plan: DropPlan,
    optimizer: object,
    *,
    at_switch: bool,
    fresh_seed: int | None = None,
    dropped_scaling: str = "rank",
) -> GradientTying | None:
    """Apply `plan` to a model in training, on whatever engine holds its LoRA; every rank must call it.

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

    Returns:
        The `GradientTying` that keeps sharded members equal (remove it when training ends), or None when the plan
        was applied in place.
    """
    if plan.mode == "truncate":
        _check_plan_matches(layers, plan)
        if at_switch:
            set_values(truncated_dropped_values(layers, plan, optimizer, dropped_scaling), optimizer)
        apply_plan(layers, plan, dropped_scaling=dropped_scaling)
        return None
    if plan.mode == "drop":
        apply_plan(layers, plan)
        if at_switch:
            zero_dropped(layers, plan, optimizer)
        dropped = [p for name in plan.dropped for p in lora_parameters(layers[name], plan.adapter_name)]
        if parameter_engine(dropped) == "zero3":
            # ZeRO-3 steps every partition with the gradient it last reduced for it, also for a Parameter that got
            # none since; it steps those that do not require gradients with zeros (and DDP must not see this change).
            for param in dropped:
                param.requires_grad_(False)
        return None
    if parameter_engine(p for _, group in shared_groups(layers, plan) for p in group) == "replicated":
        apply_plan(layers, plan)
        if at_switch and fresh_seed is not None:
            reinit_shared(layers, plan, optimizer, fresh_seed)
        return None
    _check_plan_matches(layers, plan)
    tying = GradientTying(layers, plan, optimizer)
    if at_switch:
        tying.align(fresh_seed)
    tying.attach()
    return tying


def reinit_shared(
    layers: dict[str, LoraLayer], plan: DropPlan, optimizer: torch.optim.Optimizer | None, seed: int
) -> None:
    """Start every shared LoRA afresh (A as PEFT initialises it, B zero) and forget its optimizer state.

    The random A comes from its own generator seeded with `seed`: every rank draws the same values, and the global
    RNG stream (dropout, data order) is left as an uninterrupted run would have it.
    """
    sources = [(part, params[:1]) for part, params in shared_groups(layers, plan)]
    set_values(fresh_values(sources, seed), optimizer)


def zero_dropped(layers: dict[str, LoraLayer], plan: DropPlan, optimizer: object) -> None:
    """Set the B of every dropped module (mode "drop") to zero, in the module and in the optimizer's copies.

    A dropped module no longer computes its LoRA, but `save_pretrained` still writes its weights, and plain PEFT
    switches every module on when it loads them: with B at zero that adapter computes what the trained model did.
    """
    weights = [layers[name].lora_B[plan.adapter_name].weight for name in plan.dropped]
    set_values([(w, torch.zeros(getattr(w, "ds_shape", None) or w.shape)) for w in weights], optimizer)


def set_values(values: list[tuple[nn.Parameter, torch.Tensor]], optimizer: object) -> None:
    """Give Parameters new (whole, float32) values and forget their optimizer state, on any engine."""
    if parameter_engine(param for param, _ in values) != "replicated":
        reset_sharded(values, optimizer)
    else:
        _reset_parameters({param: value.to(param.device) for param, value in values}, optimizer)


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
