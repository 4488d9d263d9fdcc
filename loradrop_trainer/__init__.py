"""LoRA-drop for the Hugging Face Trainer: prune a PEFT LoRA adapter by output importance, in the same run.

The public names are imported on first use, so `import loradrop_trainer` (and the `loradrop` command's `--version`
and `--help`) does not pay for importing torch, transformers and PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .callback import LoraDropCallback
    from .config import LoraDropConfig
    from .lora_layers import find_lora_layers, lora_kinds
    from .plan import DropPlan, build_plan, plan_keeping
    from .reparam import apply_plan

_NAMES_IN = {
    "callback": ("LoraDropCallback",),
    "config": ("LoraDropConfig",),
    "lora_layers": ("find_lora_layers", "lora_kinds"),
    "plan": ("DropPlan", "build_plan", "plan_keeping"),
    "reparam": ("apply_plan",),
}

__all__ = sorted(name for names in _NAMES_IN.values() for name in names)
__version__ = "0.1.0"  # the one place the version is written; setup.py reads it from here
__getattr__, __dir__ = lazy_exports(__name__, _NAMES_IN)
