"""LoRA-drop for the Hugging Face Trainer: prune a PEFT LoRA adapter by output importance, in the same run."""

from .callback import LoraDropCallback
from .config import LoraDropConfig
from .lora_layers import find_lora_layers, lora_kinds
from .plan import DropPlan, build_plan, plan_keeping
from .reparam import apply_plan

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
