"""Mode "drop": the dropped modules lose their LoRA; they compute exactly the frozen layer's output, at its cost.

At the switch their LoRA B is set to zero, in the module and in the optimizer's copies: `save_pretrained` still writes
their weights, and plain PEFT switches every module on when it loads them, so with B at zero that adapter computes
what the trained model did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Mode, Run

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from ..plan import DropPlan


class Drop(Mode):
    name = "drop"
    dropped_as = "dropped"

    def source_of(self, plan: DropPlan, name: str) -> str | None:
        """None: a dropped module uses no LoRA."""
        return None

    def apply(self, layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str) -> None:
        """Switch the dropped modules' LoRA off."""
        for name in plan.dropped:
            layer = layers[name]
            layer._active_adapter = [active for active in layer.active_adapters if active != plan.adapter_name]

    def reparameterise(self, layers: dict[str, LoraLayer], plan: DropPlan, run: Run) -> None:
        """Switch the dropped modules off on any engine; at the switch, zero their B (module docstring)."""
        from ..lora_layers import lora_parameters
        from ..reparam import apply_plan
        from ..sharding import parameter_engine

        apply_plan(layers, plan)
        if run.at_switch:
            zero_dropped(layers, plan, run.optimizer)
        dropped = [p for name in plan.dropped for p in lora_parameters(layers[name], plan.adapter_name)]
        if parameter_engine(dropped) == "zero3":
            # ZeRO-3 steps every partition with the gradient it last reduced for it, also for a Parameter that got
            # none since; it steps those that do not require gradients with zeros (and DDP must not see this change).
            for param in dropped:
                param.requires_grad_(False)
        return None


def zero_dropped(layers: dict[str, LoraLayer], plan: DropPlan, optimizer: object) -> None:
    """Set the B of every dropped module to zero, in the module and in the optimizer's copies (module docstring)."""
    import torch

    from ..reparam import set_values

    weights = [layers[name].lora_B[plan.adapter_name].weight for name in plan.dropped]
    set_values([(w, torch.zeros(getattr(w, "ds_shape", None) or w.shape)) for w in weights], optimizer)
