"""Mode "drop" in the export: nothing is stored of a dropped module, only its weights' shapes and dtypes (`dropped`
in the manifest); expansion gives it B = 0 and a freshly drawn A, and the loader switches its LoRA off again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import PlanError
from .base import ExportMode

if TYPE_CHECKING:
    import torch

    from loradrop_trainer import DropPlan


class Drop(ExportMode):
    name = "drop"

    def check_saved(self, weights: Mapping[str, torch.Tensor], plan: DropPlan) -> None:
        """Refuse an adapter in which a module the plan drops has a LoRA B that is not zero.

        The compact adapter stores nothing for dropped modules, which is exact only when their saved LoRA adds
        nothing: the callback zeroes their B at the switch, and they get no update after it. A non-zero B means the
        adapter was saved before the switch (a checkpoint from before it, `load_best_model_at_end` going back to one)
        or by another run than the plan's; compacting it would silently change what it computes.
        """
        keys = [f"{name}.lora_B.weight" for name in plan.dropped]
        moved = [key for key in keys if key in weights and weights[key].any()]
        if moved:
            raise PlanError(
                f"The adapter does not match the plan (mode 'drop'): {moved[0]!r} is not zero, yet the plan "
                f"drops that module ({len(moved)} of {len(plan.dropped)} dropped modules have a non-zero LoRA B). "
                f"LoraDropCallback zeroes it at the switch (step {plan.step}), so the adapter was saved before the "
                "switch (or by another run than the plan's) and dropping those modules would change what it computes. "
                "Compact a checkpoint saved after the switch, with the plan of the same run; an adapter from before "
                "the switch is a plain LoRA adapter, to use as it is."
            )

    def dropped_clause(self, plan: DropPlan) -> str:
        return "have their LoRA removed"

    def status(self, plan: DropPlan, name: str) -> str:
        return "dropped"

    def loaded_again(self, plan: DropPlan) -> str:
        return (
            "the model as trained, dropped modules without LoRA; `is_trainable=True` continues training with them "
            "switched off"
        )
