"""LoRA-drop for the Hugging Face Trainer: prune a PEFT LoRA adapter by output importance, in the same run.

The public names are imported on first use, so `import loradrop_trainer` (and the `loradrop` command's `--version`
and `--help`) does not pay for importing torch, transformers and PEFT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callback import LoraDropCallback
    from .config import LoraDropConfig
    from .lora_layers import find_lora_layers, lora_kinds
    from .plan import DropPlan, build_plan, plan_keeping
    from .reparam import apply_plan

_SUBMODULE_OF = {
    "DropPlan": "plan",
    "LoraDropCallback": "callback",
    "LoraDropConfig": "config",
    "apply_plan": "reparam",
    "build_plan": "plan",
    "find_lora_layers": "lora_layers",
    "lora_kinds": "lora_layers",
    "plan_keeping": "plan",
}

__all__ = [
    "DropPlan",
    "LoraDropCallback",
    "LoraDropConfig",
    "apply_plan",
    "build_plan",
    "find_lora_layers",
    "lora_kinds",
    "plan_keeping",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
