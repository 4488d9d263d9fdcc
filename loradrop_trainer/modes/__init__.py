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

from .base import Mode
from .drop import Drop
from .share import Share
from .truncate import Truncate

REGISTRY: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Make `mode` known by its name to plans and to the re-parameterisation; return it.

    Args:
        mode: the mode; one registered under the same name before is replaced.
    """
    REGISTRY[mode.name] = mode
    return mode


def mode_of(name: str) -> Mode:
    """The registered mode called `name`; `ValueError` for a name no mode has (a corrupt or newer plan).

    Args:
        name: a plan's `mode`.
    """
    mode = REGISTRY.get(name)
    if mode is None:
        raise ValueError(f"Drop plan mode {name!r} is not one of {tuple(REGISTRY)}; the plan is corrupt.")
    return mode


register(Share())
register(Drop())
register(Truncate())
