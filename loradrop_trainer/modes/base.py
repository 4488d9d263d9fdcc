"""`Mode`: what a drop plan does with the modules it drops, as one object per mode (`loradrop_trainer.modes`).

The plan, the re-parameterisation, the callback and the report ask the plan's mode for everything that differs
between modes, so each mode's rules live in its own module. A mode answers for the plan (which LoRA a dropped module
uses), for the model in training (what the switch does, how a resume applies it again, what the PEFT config records
of it and a best-model restore takes back) and for the report (the words for what a dropped module became).

The plan must be readable without torch or PEFT (`loradrop inspect` shows plans without importing PEFT), and the
modes are part of reading it; so the mode modules import the machinery that changes a model (`reparam`, `truncate`,
`grad_tying`, `saved_form`) inside the methods that change one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from ..config import LoraDropConfig
    from ..grad_tying import GradientTying
    from ..plan import DropPlan


@dataclass(frozen=True)
class Run:
    """How a model in training meets a plan (`reparam.reparameterise`, whose docstring says what each field is)."""

    optimizer: object
    at_switch: bool
    fresh_seed: int | None
    dropped_scaling: str
    input_grams: Mapping[str, Any] | None = None


class Mode:
    """One mode: subclasses set `name` and `dropped_as` and implement `source_of`, `apply` and `reparameterise`; the
    other methods keep the plan as chosen and the PEFT config as it is unless the mode needs otherwise."""

    name: str
    """The mode's name, as plans and `LoraDropConfig.mode` spell it."""
    dropped_as: str
    """One word for what a dropped module became ("shared"): the plan table's column."""
    truncates: bool = False
    """Whether each dropped module keeps a LoRA of its own at the plan's `dropped_rank` (a positive integer in such a
    plan, None in any other)."""

    def source_of(self, plan: DropPlan, name: str) -> str | None:
        """The module whose LoRA the dropped module `name` uses after the switch (None: it has none)."""
        raise NotImplementedError

    def settle(self, kept: set[str], shared: dict[str, list[str]]) -> tuple[set[str], dict[str, list[str]]]:
        """The kept modules and the dropped groups of a new plan, once the mode has its say (`plan_keeping`)."""
        return kept, shared

    def became(self, plan: DropPlan) -> str:
        """What a dropped module became, in a few words (the importance chart's legend)."""
        return self.dropped_as

    def summary(self, plan: DropPlan) -> str:
        """What the modules keep, after "n/m modules keep" (`report.kept_line`)."""
        return "their own LoRA"

    def check_layers(self, layers: dict[str, LoraLayer], config: LoraDropConfig) -> None:
        """Refuse, before the first step, layers the mode cannot re-parameterise under `config`."""

    def apply(self, layers: dict[str, LoraLayer], plan: DropPlan, *, dropped_scaling: str) -> None:
        """Re-parameterise `layers` as `plan` says, in place, on an engine that holds whole LoRA Parameters; idempotent
        (`reparam.apply_plan`, which checks the plan fits the layers first)."""
        raise NotImplementedError

    def reparameterise(self, layers: dict[str, LoraLayer], plan: DropPlan, run: Run) -> GradientTying | None:
        """Apply `plan` to a model in training, on whatever engine holds its LoRA (`reparam.reparameterise`)."""
        raise NotImplementedError

    def record(
        self, model: Any, config: Any, layers: dict[str, LoraLayer], plan: DropPlan, dropped_scaling: str
    ) -> None:
        """Once `plan` is applied to `model` in training: record in its PEFT `config` (and in what its
        `save_pretrained` writes) what the re-parameterisation changed that the config would otherwise not say."""

    def forget(self, model: Any, config: Any, plan: DropPlan, dropped_scaling: str) -> None:
        """Take back what `record` did: the model is plain LoRA again (a best checkpoint from before the switch)."""


M = TypeVar("M")


class Registry(dict[str, M], Generic[M]):
    """Modes by name, in the order they were registered (this package's and `hub_export.modes`'s)."""

    def __init__(self, unknown: Callable[[str, tuple[str, ...]], Exception]) -> None:
        super().__init__()
        self._unknown = unknown

    def register(self, mode: M) -> M:
        """Make `mode` known by its name; return it.

        Args:
            mode: the mode; one registered under the same name before is replaced.
        """
        self[mode.name] = mode
        return mode

    def find(self, name: str) -> M:
        """The mode called `name`; the error `unknown` makes of the name and the known ones if there is none.

        Args:
            name: a plan's `mode`.
        """
        if name not in self:
            raise self._unknown(name, tuple(self))
        return self[name]
