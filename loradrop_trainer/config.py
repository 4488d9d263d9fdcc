"""Configuration of a LoRA-drop run: when to switch, how much to keep, and what the dropped modules become."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SHARED_INITS = ("most_important", "fresh")
MODES = ("share", "drop")
NORMALIZE = ("global", "kind")


@dataclass
class LoraDropConfig:
    """Settings of [`LoraDropCallback`].

    The defaults are the paper's (alpha=0.1, threshold=0.9): importance is measured during the first 10% of the
    optimizer steps, then the modules that carry 90% of the LoRA output norm keep their own LoRA and the others share
    one LoRA per kind.
    """

    alpha: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the optimizer steps during which importance is collected, in (0, 1). The switch "
            "happens at the end of step ceil(alpha * max_steps)."
        },
    )
    threshold: float = field(
        default=0.9,
        metadata={
            "help": "Cumulative normalised importance the kept modules must reach, in (0, 1]. 1.0 keeps every module "
            "that had any importance; lower values keep fewer modules."
        },
    )
    adapter_name: str = field(
        default="default", metadata={"help": "Name of the PEFT adapter to prune (the one that is being trained)."}
    )
    target: list[str] | None = field(
        default=None,
        metadata={
            "help": "Only LoRA modules whose name contains one of these substrings take part (e.g. ['self_attn']). "
            "None means every LoRA module of the adapter. Modules left out keep their own LoRA."
        },
    )
    exclude: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA modules whose name contains one of these substrings keep their own LoRA."},
    )
    shared_init: Literal["most_important", "fresh"] = field(
        default="most_important",
        metadata={
            "help": "'most_important': the shared LoRA of a kind starts from the weights (and optimizer state) of the "
            "most important dropped module of that kind. 'fresh': it is re-initialised like PEFT does (A random, "
            "B zero) and its optimizer state is reset."
        },
    )
    mode: Literal["share", "drop"] = field(
        default="share",
        metadata={
            "help": "'share': dropped modules of a kind share one LoRA (the paper's method). 'drop': dropped modules "
            "lose their LoRA entirely and stop computing it (the paper's ablation)."
        },
    )
    normalize: Literal["global", "kind"] = field(
        default="global",
        metadata={
            "help": "'global' (the paper): one ranking of all modules, kept until `threshold` of the total. 'kind': "
            "each kind keeps the modules covering `threshold` of that kind's own importance, so a kind whose output "
            "norms are small (or a model whose few outlier modules dominate the total) is not dropped wholesale."
        },
    )
    min_kept: int = field(
        default=0,
        metadata={"help": "Keep at least this many modules of every kind, whatever their importance."},
    )
    score_every: int = field(
        default=1,
        metadata={
            "help": "Score one training micro-batch in every `score_every` during collection. Values above 1 trade "
            "a noisier estimate for less overhead."
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the plan (loradrop_plan.json) and the importance chart (loradrop_importance.png) are "
            "written at the switch. None means the Trainer's `output_dir`."
        },
    )
    save_plot: bool = field(default=True, metadata={"help": "Write the importance bar chart at the switch."})

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise ValueError(
                f"alpha must be a fraction of the training steps in (0, 1), got {self.alpha!r}. "
                "The paper uses 0.1: importance is measured during the first 10% of the steps."
            )
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ValueError(
                f"threshold must be in (0, 1], got {self.threshold!r}. It is the share of the total importance the "
                "kept modules must cover; 0.9 is the paper's default, 1.0 keeps every module with any importance."
            )
        if self.shared_init not in SHARED_INITS:
            raise ValueError(f"shared_init must be one of {SHARED_INITS}, got {self.shared_init!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.mode == "drop" and self.shared_init != "most_important":
            raise ValueError("shared_init only applies to mode='share'; leave it at its default with mode='drop'.")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}.")
        if not isinstance(self.min_kept, int) or self.min_kept < 0:
            raise ValueError(f"min_kept must be a non-negative integer, got {self.min_kept!r}.")
        if not isinstance(self.score_every, int) or self.score_every < 1:
            raise ValueError(f"score_every must be a positive integer, got {self.score_every!r}.")
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {self.adapter_name!r}.")
        self.target = _as_name_list(self.target, "target")
        self.exclude = _as_name_list(self.exclude, "exclude")

    def switch_step(self, max_steps: int) -> int:
        """The optimizer step at whose end the model is re-parameterised."""
        return math.ceil(self.alpha * max_steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_name_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty module-name substrings, got {value!r}.")
    return list(value)
