"""The modes of a drop plan, one module each, registered here by name: what becomes of the modules the plan drops.

- "share" (`share.py`): dropped modules of one kind share one LoRA (the paper's method);
- "drop" (`drop.py`): dropped modules lose their LoRA;
- "truncate" (`truncate.py`, the default): each dropped module keeps its own LoRA, cut to a lower rank by SVD.

Each mode is a `Mode` (`base.py`). The plan, the re-parameterisation, the callback and the report ask
`mode_of(plan.mode)` and never compare the mode's name; `hub_export.modes` is the export side's counterpart. A new
mode is a module with a `Mode` subclass, passed to `register` (and, to train with it, named in
`LoraDropConfig.mode`'s choices).
"""

from __future__ import annotations

from .base import Mode, Registry, Run
from .drop import Drop
from .share import Share
from .truncate import Truncate

__all__ = ["REGISTRY", "Mode", "Run", "mode_of", "register"]

# `mode_of` raises ValueError for a name no mode has: a corrupt plan, or one of a newer release.
REGISTRY: Registry[Mode] = Registry(
    lambda name, known: ValueError(f"Drop plan mode {name!r} is not one of {known}; the plan is corrupt.")
)
register = REGISTRY.register
mode_of = REGISTRY.find

register(Share())
register(Drop())
register(Truncate())
