"""`ExportMode`: what the compact format, its plain forms, its loader and its card need to know of one mode.

The readers (`validate`, `expand`, `loader`, `from_peft`, `model_card`, `hub`, `cli`) ask the plan's export mode
(`hub_export.modes.export_mode`) for everything that differs between modes. What the plan itself says of a dropped
module (the LoRA it uses, whether it keeps one of its own at a lower rank) is the training side's mode
(`loradrop_trainer.modes`), read through the plan (`DropPlan.source_of`, `DropPlan.truncated`): the tensors a compact
adapter stores, and the keys each one serves, follow from it for every mode alike (`tying.group_by_plan`).

`loradrop inspect` reads adapters without importing PEFT, and the modes are part of reading one; so the mode modules
import PEFT, and what imports it, inside the methods that need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CompactFormatError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from loradrop_trainer import DropPlan


class ExportMode:
    """One mode as the export sees it: subclasses set `name` and implement the three sentences; the checks and the
    config hooks leave an adapter as it is unless the mode needs otherwise."""

    name: str
    """The mode's name, as plans spell it."""
    rank_pattern_form: bool = False
    """Whether the plain PEFT adapter `expand_to_peft` writes (the "peft" form) keeps the compact size through
    `rank_pattern`, where the uniform form has the unpruned size: a Hub repo then carries it in ``rank_pattern/``, and
    the card and `loradrop inspect` say so."""

    def check_config(
        self, config: LoraConfig, plan: DropPlan, where: str, error: type[ValueError] = CompactFormatError
    ) -> None:
        """Refuse a PEFT `config` that does not compute what `plan`'s run computed (`error`, naming `where`)."""

    def check_saved(self, weights: Mapping[str, torch.Tensor], plan: DropPlan) -> None:
        """Refuse the weights of a plain PEFT adapter saved by the plan's run (`compact_peft_adapter`) that show it was
        saved before the switch, or by another run (`PlanError`)."""

    def peft_config(self, peft_config: Mapping[str, Any], plan: DropPlan) -> dict[str, Any]:
        """The PEFT config of the plain adapter `expand_to_peft` writes, from the compact adapter's."""
        return dict(peft_config)

    def loaded(self, config: LoraConfig, layers: dict[str, LoraLayer], plan: DropPlan) -> None:
        """Once `load_compact` applied `plan` to the model it built: put into the model's PEFT `config` what the
        trained model's config held of the plan."""

    def dropped_clause(self, plan: DropPlan) -> str:
        """What became of the dropped modules, after "the other n" (the card's first sentence)."""
        raise NotImplementedError

    def status(self, plan: DropPlan, name: str) -> str:
        """The LoRA of the dropped module `name`, in the card's table of every module."""
        raise NotImplementedError

    def loaded_again(self, plan: DropPlan) -> str:
        """What loading the compact adapter gives back (the card's snippets)."""
        raise NotImplementedError
