"""The modes of a compact adapter's plan as the export sees them, one module each, registered here by name.

- "share" (`share.py`): one LoRA per kind stored for the dropped modules of that kind, copied to each on expansion;
- "drop" (`drop.py`): nothing stored; expansion gives them B = 0;
- "truncate" (`truncate.py`): each stored at its rank k; the PEFT config says how PEFT scales it.

Each is an `ExportMode` (`base.py`); the training side's counterpart is `loradrop_trainer.modes`. A new mode is a
module per side, each registered by the mode's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loradrop_trainer.modes.base import Registry

from ..errors import PlanError
from .base import ExportMode
from .drop import Drop
from .share import Share
from .truncate import Truncate

if TYPE_CHECKING:
    from loradrop_trainer import DropPlan

__all__ = ["REGISTRY", "ExportMode", "export_mode", "register"]

REGISTRY: Registry[ExportMode] = Registry(
    lambda name, known: PlanError(f"Plans in mode {name!r} cannot be exported: hub_export knows modes {known}.")
)
register = REGISTRY.register


def export_mode(plan: DropPlan) -> ExportMode:
    """The export side of `plan`'s mode; `PlanError` for a mode the training side knows and the export does not.

    Args:
        plan: a checked plan (its mode is one `loradrop_trainer.modes` knows).
    """
    return REGISTRY.find(plan.mode)


register(Share())
register(Drop())
register(Truncate())
