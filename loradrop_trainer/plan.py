"""The drop plan: which LoRA modules keep their own weights and which share one LoRA per kind."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from .modes import mode_of

SCORED_KEYS = ("micro_batches", "tokens")  # how much data the importance rests on (`DropPlan.scored`)

PLAN_FORMAT_VERSION = 1

# Attributes under which a re-parameterised model carries its plan (and the run's settings that go with it), so the
# model can be exported without the callback at hand: see `attach_plan`.
MODEL_PLAN_ATTR = "loradrop_plan"
MODEL_PLAN_EXTRA_ATTR = "loradrop_plan_extra"
MODEL_RESTORED_ATTR = "loradrop_restored_from"


class NoImportanceError(ValueError):
    """Importance is all zero or not finite: there is nothing to rank modules by."""


@dataclass
class DropPlan:
    """The outcome of importance collection.

    `kept` lists the modules that keep their own LoRA, most important first. `shared[kind]` lists the dropped modules
    of one kind, most important first: in mode "share" they all use the LoRA of `shared[kind][0]`; in mode "drop"
    they have no LoRA at all; in mode "truncate" each keeps its own LoRA at rank `dropped_rank`. `importance` is
    normalised to sum to 1 over every module that took part. With alpha="auto", `stability` holds one record per
    scoring window up to the switch (see `stability.py`). `scored` says how much data the importance rests on,
    `{"micro_batches": n, "tokens": n}` (None in plans written before it was recorded).
    """

    importance: dict[str, float]
    kept: list[str]
    shared: dict[str, list[str]]
    kinds: dict[str, str]
    threshold: float
    mode: str = "share"
    adapter_name: str = "default"
    step: int | None = None
    total: float | None = None
    stability: list[dict[str, Any]] | None = None
    dropped_rank: int | None = None
    scored: dict[str, int] | None = None
    version: int = field(default=PLAN_FORMAT_VERSION)

    @property
    def dropped(self) -> list[str]:
        return [name for members in self.shared.values() for name in members]

    @property
    def truncated(self) -> list[str]:
        """The dropped modules that keep a LoRA of their own at rank `dropped_rank` (none unless the mode truncates)."""
        return self.dropped if mode_of(self.mode).truncates else []

    @property
    def owners(self) -> list[str]:
        """The modules whose own LoRA trains at its full rank after the switch: every kept module and every module
        whose LoRA others use (a shared group's source), not the truncated ones nor those whose LoRA was dropped."""
        truncated = set(self.truncated)
        sources = dict.fromkeys(self.source_of(name) for name in self.kinds if name not in truncated)
        return [name for name in sources if name is not None]

    def source_of(self, name: str) -> str | None:
        """The module whose LoRA `name` uses after the switch (itself if kept or truncated, None if its LoRA was
        dropped): a dropped module's is its mode's answer."""
        if name in self.kept or name not in self.kinds:
            return name
        return mode_of(self.mode).source_of(self, name)

    def kept_fraction(self, sizes: Mapping[str, int], ranks: Mapping[str, int] | None = None) -> float:
        """Fraction of the LoRA parameters left after the switch, given each module's LoRA parameter count (and, in
        a mode that truncates, its rank r: a module truncated to rank k keeps k / r of them)."""
        if mode_of(self.mode).truncates and ranks is None:
            raise ValueError(f"kept_fraction of a plan in mode {self.mode!r} needs each module's rank (ranks=...).")
        after = sum(sizes[name] for name in self.owners)
        after += sum(sizes[name] * self.dropped_rank // ranks[name] for name in self.truncated)
        return after / sum(sizes[name] for name in self.kinds)

    def summary(self) -> dict[str, dict[str, int]]:
        """`{kind: {"kept": n, "shared": n}}` in a stable order, for logs and model cards."""
        out: dict[str, dict[str, int]] = {}
        for name, kind in self.kinds.items():
            row = out.setdefault(kind, {"kept": 0, "shared": 0})  # "shared": dropped, whatever the mode does with them
            row["kept" if name in self.kept else "shared"] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "adapter_name": self.adapter_name,
            "mode": self.mode,
            "threshold": self.threshold,
            "step": self.step,
            "total": self.total,
            "kept": list(self.kept),
            "shared": {kind: list(members) for kind, members in self.shared.items()},
            "kinds": dict(self.kinds),
            "importance": dict(self.importance),
            "stability": [dict(record) for record in self.stability] if self.stability is not None else None,
            **({"dropped_rank": self.dropped_rank} if mode_of(self.mode).truncates else {}),
            **({"scored": dict(self.scored)} if self.scored is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DropPlan:
        version = data.get("version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"Drop plan format version {version!r} is not supported (this loradrop reads version "
                f"{PLAN_FORMAT_VERSION}). Upgrade loradrop to read plans written by a newer release."
            )
        missing = {"kept", "shared", "kinds", "importance", "threshold"} - set(data)
        if missing:
            raise ValueError(f"Drop plan is missing {sorted(missing)}; the file is truncated or not a LoRA-drop plan.")
        _check_types(data)
        plan = cls(
            importance={k: float(v) for k, v in data["importance"].items()},
            kept=list(data["kept"]),
            shared={k: list(v) for k, v in data["shared"].items()},
            kinds=dict(data["kinds"]),
            threshold=float(data["threshold"]),
            mode=data.get("mode", "share"),
            adapter_name=data.get("adapter_name", "default"),
            step=data.get("step"),
            total=data.get("total"),
            stability=[dict(record) for record in data["stability"]] if data.get("stability") else None,
            dropped_rank=data.get("dropped_rank"),
            scored=dict(data["scored"]) if data.get("scored") is not None else None,
        )
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check the plan is self-consistent: every module is kept or in its own kind's shared group, exactly once,
        with a finite, non-negative importance, in a mode the re-parameterisation knows (`modes`)."""
        mode = mode_of(self.mode)
        rank = self.dropped_rank
        valid_rank = type(rank) is int and rank >= 1 if mode.truncates else rank is None
        if not valid_rank:
            raise ValueError(
                f"Drop plan dropped_rank {rank!r} does not fit mode {self.mode!r} (a positive integer in mode "
                "'truncate', absent otherwise); the plan is corrupt."
            )
        if set(self.importance) != set(self.kinds) or not all(
            math.isfinite(value) and value >= 0 for value in self.importance.values()
        ):
            raise ValueError("Drop plan importances must be one finite, non-negative number per module.")
        if self.scored is not None and not (
            set(self.scored) == set(SCORED_KEYS)
            and all(type(count) is int and count >= 0 for count in self.scored.values())
        ):
            raise ValueError(
                f"Drop plan 'scored' must give {' and '.join(SCORED_KEYS)} as non-negative integers, got "
                f"{self.scored!r}; the plan is corrupt."
            )
        placed = self.kept + self.dropped
        if sorted(placed) != sorted(self.kinds) or len(set(placed)) != len(placed):
            raise ValueError("Drop plan is inconsistent: every module must be either kept or shared, exactly once.")
        for kind, members in self.shared.items():
            if not members or any(self.kinds[name] != kind for name in members):
                raise ValueError(f"Drop plan is inconsistent: shared group {kind!r} holds modules of another kind.")


def _check_types(data: Mapping[str, Any]) -> None:
    """Refuse a plan file whose fields are not of the JSON types `DropPlan.to_dict` writes: a kind that is a list, an
    importance that is a string, a step that is a float would fail later with a TypeError, or be written on."""
    found = {
        "kept": _names(data["kept"]),
        "shared": isinstance(data["shared"], dict) and all(_names(group) for group in data["shared"].values()),
        "kinds": isinstance(data["kinds"], dict) and all(isinstance(kind, str) for kind in data["kinds"].values()),
        "importance": isinstance(data["importance"], dict) and all(map(_is_number, data["importance"].values())),
        "threshold": _is_number(data["threshold"]),
        "mode": isinstance(data.get("mode", "share"), str),
        "adapter_name": isinstance(data.get("adapter_name", "default"), str),
        "step": data.get("step") is None or type(data["step"]) is int,
        "total": data.get("total") is None or _is_number(data["total"]),
        "stability": data.get("stability") is None
        or (isinstance(data["stability"], list) and all(isinstance(record, dict) for record in data["stability"])),
        "scored": data.get("scored") is None or isinstance(data["scored"], dict),
    }
    wrong = [name for name, ok in found.items() if not ok]
    if wrong:
        raise ValueError(
            f"Drop plan field {wrong[0]!r} is {data.get(wrong[0])!r}, not of the type a plan holds there (module names "
            "are strings, importances, threshold and total numbers, step an integer); the plan is corrupt."
        )


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_plan(
    importance: Mapping[str, float],
    kinds: Mapping[str, str],
    threshold: float,
    *,
    min_kept: int = 0,
    normalize: str = "global",
    mode: str = "share",
    dropped_rank: int | None = None,
    adapter_name: str = "default",
    step: int | None = None,
) -> DropPlan:
    """Keep the most important modules until their normalised importance reaches `threshold`; share the rest.

    Ties are broken by module name so every rank (and every rerun) derives the same plan from the same numbers. The
    module whose importance crosses the threshold is kept. `normalize` says over which modules the threshold applies:
    all of them ("global"), each kind on its own ("kind") or each layer on its own ("layer"), every group keeping
    `threshold` of its own importance. `min_kept` then tops up each kind with its most important dropped modules.
    """
    grouping = {"global": lambda name: "", "kind": kinds.__getitem__, "layer": layer_of}
    if normalize not in grouping:
        raise ValueError(f"normalize must be one of {tuple(grouping)}, got {normalize!r}.")
    group_of = grouping[normalize]
    _, normalised, order = _rank(importance, kinds)
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(group_of(name), []).append(name)
    kept_set = {name for group in groups.values() for name in _prefix_reaching(group, normalised, threshold)}
    for kind in dict.fromkeys(kinds.values()):
        of_kind = [name for name in order if kinds[name] == kind]
        missing = min_kept - sum(name in kept_set for name in of_kind)
        kept_set.update([name for name in of_kind if name not in kept_set][: max(missing, 0)])
    return plan_keeping(
        importance,
        kinds,
        kept_set,
        threshold,
        mode=mode,
        dropped_rank=dropped_rank,
        adapter_name=adapter_name,
        step=step,
    )


def layer_of(name: str) -> str:
    """The block a module belongs to: its name up to the last numeric part (`...layers.3`), "" outside any block."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: indices[-1] + 1]) if indices else ""


def coverage_warning(plan: DropPlan, min_kept_fraction: float = 0.1) -> str | None:
    """Say so when a plan keeps a suspiciously small part of the adapter, naming the modules that dominate.

    A kind left with no kept module, or fewer than `min_kept_fraction` of the modules kept, usually means a few
    modules with outsized outputs (massive activations at their input) carry most of the importance.
    """
    empty_kinds = [kind for kind, counts in plan.summary().items() if counts["kept"] == 0]
    few = len(plan.kept) < min_kept_fraction * len(plan.kinds)
    if not (empty_kinds or few):
        return None
    top = ", ".join(f"{name} ({plan.importance[name]:.1%})" for name in plan.kept[:3])
    reasons = []
    if few:
        reasons.append(f"only {len(plan.kept)} of {len(plan.kinds)} modules keep their own LoRA")
    if empty_kinds:
        reasons.append(f"no module of kind(s) {', '.join(empty_kinds)} keeps its own LoRA")
    return (
        f"LoRA-drop: {' and '.join(reasons)}; the importance is dominated by {top}. If that is not what you want, "
        "measure importance relative to each layer's output (score='relative'), rank it per batch "
        "(aggregate='rank'), apply the threshold within each kind or layer (normalize='kind' or 'layer'), keep "
        "some modules of every kind (min_kept=...), or raise the threshold."
    )


def _prefix_reaching(order: list[str], normalised: Mapping[str, float], threshold: float) -> list[str]:
    """The shortest prefix of `order` holding `threshold` of the group's importance (all with importance at 1.0)."""
    total = math.fsum(normalised[name] for name in order)
    if total <= 0:
        return []
    if threshold >= 1.0:
        return [name for name in order if normalised[name] > 0]
    kept, reached = [], 0.0
    for name in order:
        kept.append(name)
        reached += normalised[name] / total
        if reached >= threshold:
            break
    return kept


def plan_keeping(
    importance: Mapping[str, float],
    kinds: Mapping[str, str],
    kept: Collection[str],
    threshold: float,
    *,
    mode: str = "share",
    dropped_rank: int | None = None,
    adapter_name: str = "default",
    step: int | None = None,
    stability: list[dict[str, Any]] | None = None,
) -> DropPlan:
    """The plan that keeps `kept` and groups every other module by kind, most important first.

    `build_plan` chooses `kept` by importance; ablations (a random choice of the same size) choose it otherwise. The
    mode has its say on both (`Mode.settle`: in mode "share", a module left alone in its kind is kept).
    """
    rules = mode_of(mode)
    total, normalised, order = _rank(importance, kinds)
    shared: dict[str, list[str]] = {}
    for name in order:
        if name not in kept:
            shared.setdefault(kinds[name], []).append(name)
    kept, shared = rules.settle(set(kept), shared)
    return DropPlan(
        importance=normalised,
        kept=[name for name in order if name in kept],
        shared=shared,
        kinds=dict(kinds),
        threshold=float(threshold),
        mode=mode,
        adapter_name=adapter_name,
        step=step,
        total=total,
        stability=stability,
        dropped_rank=dropped_rank if rules.truncates else None,
    )


def _rank(importance: Mapping[str, float], kinds: Mapping[str, str]) -> tuple[float, dict[str, float], list[str]]:
    """Total, normalised importance, and module names most important first (ties by name)."""
    values = [float(importance[name]) for name in kinds]
    total = math.fsum(values)
    if not all(math.isfinite(v) and v >= 0 for v in values) or not math.isfinite(total) or total <= 0:
        raise NoImportanceError(
            "LoRA importance is zero for every module: every LoRA added nothing to its layer in the scored forwards, "
            "as while its B is still at PEFT's zero initialisation (no optimizer update with a non-zero learning "
            "rate has changed it yet)."
            if total == 0
            else f"LoRA importance is not finite (sum={total}): the LoRA outputs overflowed in the scored forwards "
            "(fp16 activations?)."
        )
    normalised = {name: float(importance[name]) / total for name in kinds}
    return total, normalised, sorted(kinds, key=lambda name: (-normalised[name], name))


def attach_plan(model: Any, plan: DropPlan, extra: Mapping[str, Any]) -> None:
    """Record on `model` the plan it was re-parameterised with and the run's facts that travel with it (settings,
    parameter counts), where `attached_plan` finds them: the callback does this at the switch and
    `hub_export.load_compact` on the model it returns, so either model can be exported without a plan argument."""
    setattr(model, MODEL_PLAN_ATTR, plan)
    setattr(model, MODEL_PLAN_EXTRA_ATTR, dict(extra))


def attached_plan(model: Any) -> tuple[DropPlan | None, dict[str, Any]]:
    """The plan `attach_plan` recorded on `model` (None if none) and a copy of its extra fields."""
    return getattr(model, MODEL_PLAN_ATTR, None), dict(getattr(model, MODEL_PLAN_EXTRA_ATTR, None) or {})


def detach_plan(model: Any, restored_from: str | None = None) -> None:
    """Forget the plan recorded on `model` (it is plain LoRA again); `restored_from` names the checkpoint from before
    the switch it was put back to, which `restored_checkpoint` then reports (exporters say so instead of asking for a
    plan that no longer fits the model)."""
    for attribute in (MODEL_PLAN_ATTR, MODEL_PLAN_EXTRA_ATTR):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if restored_from is not None:
        setattr(model, MODEL_RESTORED_ATTR, str(restored_from))


def restored_checkpoint(model: Any) -> str | None:
    """The checkpoint from before the switch that `model` was put back to (`load_best_model_at_end`), if any."""
    return getattr(model, MODEL_RESTORED_ATTR, None)
