"""alpha="auto": switch as soon as the plan the importance gives has stopped changing.

Every scoring window (a fixed number of optimizer steps) the plan is derived again from the importance collected so
far. A window is *stable* when its kept set is (nearly) the one of the window before, their Jaccard overlap
|A & B| / |A | B| at least `min_overlap` (1.0: identical), and the two importance vectors rank the modules alike:
Kendall's tau-b between them at least `min_tau`. After `patience` stable windows in a row, more collection would
not change the plan much, so the switch comes then. (A module right at the threshold can enter and leave the kept
set from one window to the next while nothing else moves; `min_overlap` below 1 lets such a plan count as stable.)

Everything here is a plain function of the (all-reduced) numbers it is given, so every rank of a distributed run
takes the same decision at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors over the same modules: 1 for the same order, -1 for the reverse.

    Ties are handled as tau-b does (scipy.stats.kendalltau's default). 0.0 when either vector is constant.
    """
    if len(a) != len(b):
        raise ValueError(f"kendall_tau needs two vectors of one length, got {len(a)} and {len(b)}.")
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    rows, cols = torch.triu_indices(len(a), len(a), offset=1)
    dx, dy = torch.sign(x[rows] - x[cols]), torch.sign(y[rows] - y[cols])
    pairs = rows.numel()
    untied_x, untied_y = pairs - int((dx == 0).sum()), pairs - int((dy == 0).sum())
    if untied_x == 0 or untied_y == 0:
        return 0.0
    return float((dx * dy).sum()) / math.sqrt(untied_x * untied_y)


class StabilityTracker:
    """Decides when the plan of alpha="auto" is stable; keeps one record per window for the logs and the plan.

    Args:
        patience: stable windows in a row needed to switch.
        min_tau: Kendall tau-b against the window before at or above which the ranking counts as unchanged.
        min_overlap: Jaccard overlap with the window before's kept set at or above which it counts as unchanged.
    """

    def __init__(self, patience: int, min_tau: float, min_overlap: float = 1.0) -> None:
        self.patience = patience
        self.min_tau = min_tau
        self.min_overlap = min_overlap
        self.history: list[dict[str, Any]] = []
        self._previous: dict[str, float] | None = None
        self._previous_kept: list[str] | None = None

    def update(self, step: int, importance: Mapping[str, float], kept: Collection[str] | None) -> bool:
        """Record the window that ends at `step`; True when the last `patience` windows were all stable.

        Args:
            step: the optimizer step at whose end the window closes.
            importance: every module's importance collected so far (all-reduced over the ranks).
            kept: the modules the plan of that importance keeps; None when no plan could be made (all zero).
        """
        record: dict[str, Any] = {"step": step, "kept": None if kept is None else len(kept), "tau": None}
        record["overlap"] = None
        stable = False
        if kept is not None and self._previous is not None:
            names = list(importance)
            record["tau"] = kendall_tau([self._previous[n] for n in names], [importance[n] for n in names])
            now, before = set(kept), set(self._previous_kept)
            record["overlap"] = len(now & before) / len(now | before) if now | before else 1.0
            stable = record["overlap"] >= self.min_overlap and record["tau"] >= self.min_tau
        record["stable"] = stable
        self.history.append(record)
        self._previous = None if kept is None else dict(importance)
        self._previous_kept = None if kept is None else sorted(kept)
        return self.settled

    @property
    def settled(self) -> bool:
        """Whether the last `patience` windows were all stable."""
        recent = self.history[-self.patience :]
        return len(recent) == self.patience and all(r["stable"] for r in recent)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to take the same decisions after a resume (JSON-serialisable)."""
        return {"history": self.history, "previous": self._previous, "previous_kept": self._previous_kept}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(record) for record in state.get("history") or []]
        self._previous = dict(state["previous"]) if state.get("previous") is not None else None
        self._previous_kept = list(state["previous_kept"]) if state.get("previous_kept") is not None else None

    def describe(self) -> str:
        """The stability curve as one line per window, for the log at the switch."""
        lines = [f"{'step':>6}{'kept':>6}{'tau':>8}{'overlap':>9}  stable"]
        for r in self.history:
            tau = "-" if r["tau"] is None else f"{r['tau']:.3f}"
            kept = "-" if r["kept"] is None else r["kept"]
            overlap = "-" if r["overlap"] is None else f"{r['overlap']:.3f}"
            lines.append(f"{r['step']:>6}{kept:>6}{tau:>8}{overlap:>9}  {'yes' if r['stable'] else 'no'}")
        return "\n".join(lines)
