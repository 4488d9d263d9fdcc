"""Mode "share" in the export: each shared group's LoRA is stored once, under its source's keys, and every member's
keys map to it (`tying`); expansion copies it to each member, and the loader ties the members again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loradrop_trainer.peft_keys import PEFT_PREFIX

from .base import ExportMode

if TYPE_CHECKING:
    from loradrop_trainer import DropPlan


class Share(ExportMode):
    name = "share"

    def dropped_clause(self, plan: DropPlan) -> str:
        return "share one LoRA per kind"

    def status(self, plan: DropPlan, name: str) -> str:
        source = plan.source_of(name)
        if source == name:
            return f"shared: its LoRA serves the {len(plan.shared[plan.kinds[name]])} modules of its group"
        return f"shared: uses the LoRA of `{source.removeprefix(PEFT_PREFIX)}`"

    def loaded_again(self, plan: DropPlan) -> str:
        return "ties the shared modules again; `is_trainable=True` continues training with the same tying"
