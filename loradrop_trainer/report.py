"""What a run shows about its plan: the per-kind table, the plan file and the importance bar chart.

The callback writes these into the Trainer's output directory and `hub_export` puts them into compact adapters and
their model cards, so each exists once, here.
"""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .modes import mode_of
from .plan import DropPlan

PLAN_FILE = "loradrop_plan.json"
PLOT_FILE = "loradrop_importance.png"

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# The LoraDropConfig fields that decide which modules a plan keeps (the same run prunes to 100% or 64.5% of its
# modules by `normalize` alone), in the order `plan_settings` shows them.
PLAN_SETTINGS = ("normalize", "score", "aggregate", "restart", "alpha", "mode", "threshold", "dropped_rank")
_SHOWN_CHARS = 40  # of one recorded setting: they come from files anyone may have written


def plan_table(plan: DropPlan) -> str:
    """Modules per kind, how many keep their own LoRA, and the kind's share of the importance, as a Markdown table
    whose columns line up, so it reads the same on a console and in a model card."""
    rows = [("kind", "modules", "kept", mode_of(plan.mode).dropped_as, "importance")]
    for kind, counts in plan.summary().items():
        weight = sum(value for name, value in plan.importance.items() if plan.kinds[name] == kind)
        total = counts["kept"] + counts["shared"]
        rows.append((kind, str(total), str(counts["kept"]), str(counts["shared"]), f"{weight:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: tuple[str, ...]) -> str:  # the kind left-aligned, the numbers right-aligned
        padded = [cells[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2), *("-" * (width + 1) + ":" for width in widths[1:])]) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])])


def summary_table(plan: DropPlan, params_before: int, params_after: int) -> str:
    """`plan_table` and a line with the LoRA parameter count before and after the switch."""
    ratio = params_after / params_before if params_before else 0.0
    return (
        f"{plan_table(plan)}\nLoRA parameters {params_before:,} -> {params_after:,} ({ratio:.1%}); {kept_line(plan)} "
        f"(threshold {plan.threshold})"
    )


def kept_line(plan: DropPlan) -> str:
    """How many modules kept what, as the plan's mode says it (`Mode.summary`)."""
    return f"{len(plan.kept)}/{len(plan.kinds)} modules keep {mode_of(plan.mode).summary(plan)}"


def plan_settings(plan: DropPlan, config: Mapping[str, Any] | None) -> str:
    """The settings that decided `plan`, its switch step and how much data it rests on, on one line, for every place
    the plan is shown (console, chart, model card, `loradrop inspect`).

    `config` is the run's LoraDropConfig as recorded next to the plan (`extra["config"]`); the plan's own fields
    (mode, threshold, dropped_rank) are shown as the plan has them.
    """
    recorded = dict(config) if isinstance(config, Mapping) else {}
    recorded.update(mode=plan.mode, threshold=plan.threshold, dropped_rank=plan.dropped_rank)
    shown = [
        f"{key}={_setting(recorded[key])}"
        for key in PLAN_SETTINGS
        if key in recorded and (key != "dropped_rank" or mode_of(plan.mode).truncates)
    ]
    if not isinstance(config, Mapping):
        shown.append("other settings not recorded")
    if plan.scored is None:
        data = "amount of scored data not recorded"
    else:
        data = (
            f"importance from {plan.scored['micro_batches']:,} scored micro-batches ({plan.scored['tokens']:,} tokens)"
        )
    switch = "switch step not recorded" if plan.step is None else f"switch at step {plan.step}"
    return f"{', '.join(shown)}; {switch}, {data}"


def _setting(value: Any) -> str:
    return str(value)[:_SHOWN_CHARS] if value is None or isinstance(value, (str, int, float, bool)) else "?"


def write_plan(plan: DropPlan, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `loradrop_plan.json` (the plan and the `extra` fields of the run) into `directory`, atomically."""
    payload = {**plan.to_dict(), **(extra or {})}
    return atomic_write(Path(directory) / PLAN_FILE, json.dumps(payload, indent=2))


def plot_importance(plan: DropPlan, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> Path:
    """One bar chart per kind: importance by layer, kept modules in colour, dropped ones in grey; the subtitle (and
    the PNG's "Description" text) is `plan_settings(plan, config)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(plan.kinds.values()))
    kept = set(plan.kept)
    # Each kind on its own scale: one shared scale hid every kind but the largest (a decoder's down_proj can carry
    # most of the importance), while the plan compares modules within their kind (normalize="kind", the default).
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 1.6 * len(kinds) + 1.4), sharex=True, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        names = [name for name in plan.kinds if plan.kinds[name] == kind]
        xs = [_layer_index(name, i) for i, name in enumerate(names)]
        ax.bar(
            xs,
            [plan.importance[name] for name in names],
            color=["tab:blue" if name in kept else "tab:gray" for name in names],
        )
        ax.set_ylabel(kind, rotation=0, ha="right", va="center")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("layer")
    settings = plan_settings(plan, config)
    became = mode_of(plan.mode).became(plan)
    fig.suptitle(f"LoRA-drop importance (blue: kept, grey: {became}; threshold {plan.threshold})")
    axes[0, 0].set_title(textwrap.fill(settings, 150), fontsize=8)  # one line of it was clipped at the figure's width
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Description": settings})
    plt.close(fig)
    return atomic_write(path, png.getvalue())


def _layer_index(name: str, fallback: int) -> int:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else fallback
