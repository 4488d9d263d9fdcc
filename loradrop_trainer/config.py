"""Configuration of a LoRA-drop run: when to switch, how much to keep, and what the dropped modules become."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SCORES = ("output", "relative", "residual")
AGGREGATES = ("sum", "rank")
SHARED_INITS = ("most_important", "fresh")
MODES = ("share", "drop", "truncate")
DROPPED_SCALINGS = ("rank", "keep")
TRUNCATIONS = ("svd", "activation")
NORMALIZE = ("global", "kind", "layer")
AUTO = "auto"


@dataclass
class LoraDropConfig:
    """Settings of [`LoraDropCallback`].

    The defaults are chosen by measurements against plain LoRA at a lower rank, the alternative a user has for
    free (README, Results): importance is measured as the paper does during the first 10% of the optimizer steps;
    then, in every kind, the modules carrying half of that kind's importance keep their rank-r LoRA and every other
    module keeps a LoRA of its own cut by SVD to rank 1 (`mode="truncate"`). On the two decoder tasks measured this
    keeps 27-36% of the LoRA parameters at a lower held-out loss than plain LoRA at any rank, and on the two encoder
    tasks 42-43% within one seed spread of it. At a four times larger learning rate, where plain LoRA is not
    under-trained, a lower rank was better on the decoder measured. The paper's sharing of one LoRA per kind
    (`mode="share"`) was far below plain LoRA's front on the decoders and no better than it on the encoders. The
    paper's own settings are `mode="share", threshold=0.9, normalize="global"`.

    Three settings say how importance is measured and read, and compose freely: `score` (what one micro-batch
    measures per module), `aggregate` (how micro-batches add up) and `normalize` (over which group of modules the
    threshold applies). The paper's scoring is `score="output", aggregate="sum", normalize="global"`.
    """

    alpha: float | Literal["auto"] = field(
        default=0.1,
        metadata={
            "help": "Fraction of the optimizer steps during which importance is collected, in (0, 1). The switch "
            "happens at the end of step ceil(alpha * max_steps). 'auto': switch as soon as the plan is stable "
            "(see `auto_window`, `auto_patience`, `auto_min_tau`), at the latest at ceil(max_alpha * max_steps)."
        },
    )
    max_alpha: float = field(
        default=0.3,
        metadata={"help": "With alpha='auto': the latest switch, as a fraction of the optimizer steps, in (0, 1)."},
    )
    auto_window: float = field(
        default=0.02,
        metadata={
            "help": "With alpha='auto': the plan is re-derived from the importance so far every "
            "ceil(auto_window * max_steps) optimizer steps (a scoring window), in (0, 1)."
        },
    )
    auto_patience: int = field(
        default=3,
        metadata={
            "help": "With alpha='auto': switch after this many consecutive stable windows: the kept set changed "
            "little (Jaccard overlap >= auto_min_overlap) and so did the ranking (Kendall tau >= auto_min_tau), both "
            "against the window before."
        },
    )
    auto_min_tau: float = field(
        default=0.9,
        metadata={
            "help": "With alpha='auto': the Kendall rank correlation, in (0, 1], between the importance at the end "
            "of two consecutive windows above which the ranking counts as unchanged."
        },
    )
    auto_min_overlap: float = field(
        default=0.95,
        metadata={
            "help": "With alpha='auto': the Jaccard overlap, in (0, 1], between the kept sets at the end of two "
            "consecutive windows above which the kept set counts as unchanged (1.0: identical; a module right at "
            "the threshold may enter and leave it from one window to the next while nothing else moves)."
        },
    )
    threshold: float = field(
        default=0.5,
        metadata={
            "help": "Cumulative normalised importance the kept modules must reach, in (0, 1]. 1.0 keeps every module "
            "that had any importance; lower values keep fewer modules. The paper uses 0.9 with mode='share'; with "
            "mode='truncate' the others keep a rank-`dropped_rank` LoRA, and 0.5 measured best (README, Results)."
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
    mode: Literal["share", "drop", "truncate"] = field(
        default="truncate",
        metadata={
            "help": "What the dropped modules become. 'truncate' (the default): each keeps a LoRA of its own, cut "
            "by SVD to rank `dropped_rank` (its best approximation of what it has learnt) and scaled as PEFT scales "
            "that rank, while kept modules stay at the adapter's r: an importance-guided rank allocation, which "
            "exports as a plain PEFT adapter with a `rank_pattern`. 'share': dropped modules of a kind share one "
            "LoRA (the paper's method). 'drop': they lose their LoRA entirely and stop computing it (the paper's "
            "ablation)."
        },
    )
    dropped_rank: int = field(
        default=1,
        metadata={
            "help": "With mode='truncate': the rank each dropped module keeps, below the adapter's r. A module "
            "truncated to rank k costs k / r of its LoRA parameters."
        },
    )
    dropped_scaling: Literal["rank", "keep"] = field(
        default="rank",
        metadata={
            "help": "With mode='truncate': how a truncated module is scaled from the switch on. 'rank' (the "
            "default): as PEFT scales a rank-`dropped_rank` LoRA, lora_alpha / dropped_rank (/ sqrt with rsLoRA), so "
            "it learns as a plain rank-k LoRA with the same lora_alpha would, a larger step than before the switch; "
            "the PEFT config records it in `alpha_pattern`. 'keep': it keeps the adapter's own scaling, lora_alpha "
            "/ r, so the switch changes the module's rank and nothing else (its update per step stays the size it "
            "was), and the saved adapter is a plain uniform LoRA with zero-padded rows and columns and no "
            "`alpha_pattern`, which servers that ignore `alpha_pattern` (vLLM, llama.cpp) compute correctly. Export "
            "a 'keep' run with `save_pretrained`: hub_export's compact format expects the 'rank' scaling."
        },
    )
    truncation: Literal["svd", "activation"] = field(
        default="svd",
        metadata={
            "help": "With mode='truncate': which rank-`dropped_rank` approximation a dropped module keeps. 'svd' (the "
            "default): the best one of its update B A (the truncated SVD, least Frobenius error). 'activation': the "
            "best one on the inputs the module saw while importance was collected, the rank-k M with the least "
            "sum over real tokens of ||scaling * (B A - M) x||^2, from the r x r Gram of A x the collector sums (no "
            "cost per step beyond the Gram). SVD treats every input direction alike; activation-aware truncation "
            "keeps what the module does on the inputs it gets, so less of its output on training data is lost at "
            "the switch. With score='residual' the score is then what this truncation takes away."
        },
    )
    score: Literal["output", "relative", "residual"] = field(
        default="output",
        metadata={
            "help": "What a scored micro-batch measures per module. 'output' (the paper): the squared norm of the "
            "LoRA term, sum over real tokens of ||scaling * B A x||^2. 'relative': that norm divided by the squared "
            "norm of the frozen layer's output on the same tokens, ||scaling * B A x||^2 / ||W0 x||^2, so modules "
            "behind massive activations (a few down_proj of most decoders) do not dominate by their scale alone. "
            "'residual' (mode='truncate' only): what the truncation would take away, sum over real tokens of "
            "||scaling * (B A - [B A]_k) x||^2 with [B A]_k the rank-`dropped_rank` SVD truncation, so the modules "
            "kept at full rank are those whose update needs more than rank k, not those with the largest output."
        },
    )
    aggregate: Literal["sum", "rank"] = field(
        default="sum",
        metadata={
            "help": "How scored micro-batches add up. 'sum' (the paper): scores are summed. 'rank': every scored "
            "micro-batch ranks the modules and the ranks are summed (Borda points), so no single batch or module "
            "dominates; `threshold` then covers a share of the rank points (0.9 keeps about two thirds of the "
            "modules when the ranking is stable, 0.8 about 55%)."
        },
    )
    normalize: Literal["global", "kind", "layer"] = field(
        default="kind",
        metadata={
            "help": "Over which modules `threshold` applies. 'kind' (the default): each kind keeps the modules "
            "covering `threshold` of that kind's own importance, so a kind whose output norms are small (or a model "
            "whose few outlier modules dominate the total) is not dropped wholesale. 'global' (the paper): one "
            "ranking of all modules, kept until `threshold` of the total; on decoders with LoRA on every linear "
            "layer it keeps a handful of modules (README, Results). 'layer': the same within each layer (block)."
        },
    )
    restart: bool = field(
        default=False,
        metadata={
            "help": "The paper's two-stage protocol: at the switch every LoRA is re-initialised as PEFT does (A "
            "random, B zero; PEFT's modules_to_save copies go back to the base model's weights), its optimizer "
            "state is reset, and the learning-rate schedule starts again (warm-up and decay) over the remaining "
            "steps. The first alpha of the steps then only measure importance, as the paper's separate pass does."
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
        if self.alpha != AUTO and not (_is_number(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(
                f"alpha must be a fraction of the training steps in (0, 1) or 'auto', got {self.alpha!r}. "
                "The paper uses 0.1: importance is measured during the first 10% of the steps."
            )
        for name, value in (("max_alpha", self.max_alpha), ("auto_window", self.auto_window)):
            if not (_is_number(value) and 0 < value < 1):
                raise ValueError(f"{name} must be a fraction of the training steps in (0, 1), got {value!r}.")
        if not (_is_number(self.auto_min_tau) and 0 < self.auto_min_tau <= 1):
            raise ValueError(f"auto_min_tau must be a Kendall tau in (0, 1], got {self.auto_min_tau!r}.")
        if not (_is_number(self.auto_min_overlap) and 0 < self.auto_min_overlap <= 1):
            raise ValueError(f"auto_min_overlap must be a Jaccard overlap in (0, 1], got {self.auto_min_overlap!r}.")
        if not isinstance(self.auto_patience, int) or isinstance(self.auto_patience, bool) or self.auto_patience < 1:
            raise ValueError(f"auto_patience must be a positive number of windows, got {self.auto_patience!r}.")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}.")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}.")
        if self.score == "residual" and (self.mode != "truncate" or self.aggregate != "sum"):
            raise ValueError(
                f"score='residual' measures what truncation to dropped_rank takes away, so it needs mode='truncate' "
                f"and aggregate='sum' (got mode={self.mode!r}, aggregate={self.aggregate!r}); use score='output' "
                "otherwise."
            )
        if not isinstance(self.restart, bool):
            raise ValueError(f"restart must be True or False, got {self.restart!r}.")
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ValueError(
                f"threshold must be in (0, 1], got {self.threshold!r}. It is the share of the total importance the "
                "kept modules must cover; 0.9 is the paper's default, 1.0 keeps every module with any importance."
            )
        if self.shared_init not in SHARED_INITS:
            raise ValueError(f"shared_init must be one of {SHARED_INITS}, got {self.shared_init!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.mode != "share" and self.shared_init != "most_important":
            raise ValueError(
                f"shared_init only applies to mode='share'; leave it at its default with mode={self.mode!r}."
            )
        if not isinstance(self.dropped_rank, int) or isinstance(self.dropped_rank, bool) or self.dropped_rank < 1:
            raise ValueError(
                f"dropped_rank must be a positive integer (the rank dropped modules keep with mode='truncate'), got "
                f"{self.dropped_rank!r}. For no LoRA at all on dropped modules use mode='drop'."
            )
        if self.dropped_scaling not in DROPPED_SCALINGS:
            raise ValueError(
                f"dropped_scaling must be one of {DROPPED_SCALINGS}, got {self.dropped_scaling!r}: 'rank' scales a "
                "truncated module as a rank-`dropped_rank` LoRA, 'keep' keeps the adapter's lora_alpha / r."
            )
        if self.mode != "truncate" and self.dropped_scaling != "rank":
            raise ValueError(
                f"dropped_scaling only applies to mode='truncate'; leave it at its default with mode={self.mode!r}."
            )
        if self.truncation not in TRUNCATIONS:
            raise ValueError(
                f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}: 'svd' keeps the best rank-k "
                "approximation of B A, 'activation' the best one on the inputs seen during the collection."
            )
        if self.mode != "truncate" and self.truncation != "svd":
            raise ValueError(
                f"truncation only applies to mode='truncate'; leave it at its default with mode={self.mode!r}."
            )
        if self.mode == "truncate" and self.restart:
            raise ValueError(
                "restart=True draws every LoRA afresh at the switch, which would throw away what mode='truncate' (the "
                "default) keeps of each dropped module. For the paper's two stages set mode='share' with it (its "
                "method), or leave restart=False."
            )
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

    @property
    def auto(self) -> bool:
        return self.alpha == AUTO

    def switch_step(self, max_steps: int) -> int:
        """The optimizer step at whose end the model is re-parameterised (with alpha='auto', at the latest)."""
        return math.ceil((self.max_alpha if self.auto else self.alpha) * max_steps)

    def steps_for_switch_at(self, step: int) -> int:
        """The fewest optimizer steps that put the switch at step `step` or later, with training left after it."""
        steps = step + 1
        while not step <= self.switch_step(steps) < steps:
            steps += 1
        return steps

    def window_steps(self, max_steps: int) -> int:
        """Optimizer steps per scoring window of alpha='auto'."""
        return max(1, math.ceil(self.auto_window * max_steps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_name_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty module-name substrings, got {value!r}.")
    return list(value)
