"""What a run shows about its plan: a summary table, the plan file and the importance bar chart."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .plan import DropPlan

PLAN_FILE = "loradrop_plan.json"
PLOT_FILE = "loradrop_importance.png"

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def summary_table(plan: DropPlan, params_before: int, params_after: int) -> str:
    """A plain-text table of kept/shared modules per kind and the LoRA parameter count before and after."""
    verb = "shared" if plan.mode == "share" else "dropped"
    rows = [f"{'kind':<24}{'kept':>6}{verb:>9}{'importance':>12}"]
    for kind, counts in plan.summary().items():
        weight = sum(v for name, v in plan.importance.items() if plan.kinds[name] == kind)
        rows.append(f"{kind:<24}{counts['kept']:>6}{counts['shared']:>9}{weight:>12.3f}")
    ratio = params_after / params_before if params_before else 0.0
    rows.append(
        f"LoRA parameters {params_before:,} -> {params_after:,} ({ratio:.1%}); "
        f"{len(plan.kept)}/{len(plan.kinds)} modules keep their own LoRA (threshold {plan.threshold})"
    )
    return "\n".join(rows)


def write_plan(plan: DropPlan, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `loradrop_plan.json` atomically (a reader never sees half a plan)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**plan.to_dict(), **(extra or {})}
    path = directory / PLAN_FILE
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
        json.dump(payload, tmp, indent=2)
    os.replace(tmp.name, path)
    return path


def plot_importance(plan: DropPlan, path: str | os.PathLike) -> Path:
    """One bar chart per kind: importance by layer, kept modules in colour, dropped ones in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(plan.kinds.values()))
    kept = set(plan.kept)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 1.6 * len(kinds) + 1), sharex=True, sharey=True, squeeze=False)
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
    verb = "shared" if plan.mode == "share" else "dropped"
    fig.suptitle(f"LoRA-drop importance (blue: kept, grey: {verb}; threshold {plan.threshold})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_index(name: str, fallback: int) -> int:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else fallback
