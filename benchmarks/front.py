"""Quality per parameter: every method against plain LoRA's front, the baseline a user gets for free by lowering `r`.

Reads the runs `benchmarks/quality.py run` appends (one JSON line per task, variant and seed; `gpu_batch.py --part
front` makes them on a GPU) and writes, for each task:

- the front: plain LoRA at ranks 1-16 with lora_alpha fixed at 16 (`lora@r<r>`, `lora` being r=8), and the same with
  lora_alpha = 2r for reference (`lora@r<r>a<2r>`);
- every other variant (LoRA-drop settings, AdaLoRA, VeRA) set against the front point it must beat: plain LoRA at the
  largest rank with no more adapter parameters. The verdict is "above" when the variant is better by more than one
  seed spread (the larger standard deviation over seeds of the two), "on" within it, "below" otherwise;
- whether rank matters on the task: how far r=1 and r=2 fall behind r=8, in seed spreads;
- a plot of quality against adapter parameters (log scale, seed spread as error bars).

    python benchmarks/front.py                      # results/front.md, results/front.png, the README's section
    python benchmarks/front.py --runs other.jsonl --no_readme
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from readme import replace_section  # benchmarks/ is on the path of a script run from it
from variants import DEFAULT_ALPHA, Variant

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "front_runs.jsonl"
TASK_ORDER = ["gsm", "gsm_qv", "sarcasm", "polarity"]
LOWER_IS_BETTER = {"eval_loss"}
FRONT_ALPHA = DEFAULT_ALPHA  # the front: plain LoRA with lora_alpha fixed, whatever the rank
DEFAULT = "kind+T0.5+trunc1"  # LoraDropConfig()'s settings, in benchmarks/quality.py's variant names


@dataclass
class Point:
    """One variant on one task: its mean quality and spread over seeds, and its adapter parameters."""

    variant: str
    seeds: int
    params: float
    mean: float
    spread: float

    @cached_property
    def parsed(self) -> Variant:
        return Variant.parse(self.variant)

    @property
    def lr(self) -> float:
        """The factor on the task's learning rate its name asks for."""
        return self.parsed.lr_factor

    @property
    def rank(self) -> int | None:
        """Plain LoRA's rank (None for every other method)."""
        return self.parsed.r if self.parsed.is_plain_lora else None

    @property
    def alpha(self) -> int | None:
        """Plain LoRA's lora_alpha (None for every other method)."""
        return self.parsed.lora_alpha if self.parsed.is_plain_lora else None

    @property
    def on_front(self) -> bool:
        return self.rank is not None and self.alpha == FRONT_ALPHA


def metric_of(task: str) -> str:
    return "eval_loss" if task.startswith("gsm") else "accuracy"


def points(rows: list[dict]) -> dict[str, list[Point]]:
    """`{task: [Point]}` from run rows; every row must carry `adapter_params`."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["variant"])].append(row)
    out: dict[str, list[Point]] = defaultdict(list)
    for (task, variant), runs in groups.items():
        values = [run[metric_of(task)] for run in runs]
        out[task].append(
            Point(
                variant=variant,
                seeds=len(runs),
                params=statistics.mean(run["adapter_params"] for run in runs),
                mean=statistics.mean(values),
                spread=statistics.stdev(values) if len(values) > 1 else 0.0,
            )
        )
    return out


def better(task: str, a: float, b: float) -> float:
    """How much better `a` is than `b` (positive: better), whichever way the task's metric points."""
    return b - a if metric_of(task) in LOWER_IS_BETTER else a - b


def baseline_of(point: Point, front: list[Point]) -> Point | None:
    """Plain LoRA at the largest rank with no more adapter parameters than `point`, trained at the same learning rate
    (None if even r=1 has more, or the front was not run at that learning rate)."""
    fitting = [p for p in front if p.lr == point.lr and p.params <= point.params * (1 + 1e-9)]
    return max(fitting, key=lambda p: p.params) if fitting else None


def verdict(task: str, point: Point, baseline: Point) -> tuple[float, float, str]:
    """(difference, seed spread, "above" | "on" | "below") of `point` against `baseline`."""
    difference = better(task, point.mean, baseline.mean)
    spread = max(point.spread, baseline.spread)
    if difference > spread:
        return difference, spread, "above"
    return difference, spread, "on" if difference >= -spread else "below"


def rank_matters(task: str, front: list[Point]) -> str:
    """How far r=1 and r=2 fall behind r=8 on `task`, in seed spreads (the larger of the two standard deviations), at
    each learning rate the front was run at."""
    parts = []
    for lr in sorted({p.lr for p in front}):
        by_rank = {p.rank: p for p in front if p.lr == lr}
        if 8 not in by_rank:
            continue
        at = "" if lr == 1 else f" at {lr:g}x the learning rate"
        for r in (1, 2):
            if r in by_rank:
                low, top = by_rank[r], by_rank[8]
                spread = max(low.spread, top.spread)
                gap = better(task, top.mean, low.mean)
                ratio = f" ({gap / spread:.1f} seed spreads)" if spread else ""
                parts.append(f"r={r} is {_fmt(metric_of(task), gap, signed=True)} behind r=8{ratio}{at}")
    return "; ".join(parts) or "no r=8 run"


def markdown(by_task: dict[str, list[Point]]) -> str:
    lines = []
    for task in sorted(by_task, key=_task_order):
        metric = metric_of(task)
        task_points = by_task[task]
        front = sorted((p for p in task_points if p.on_front), key=lambda p: p.params)
        reference = max((p.params for p in front if p.rank == 8), default=None)
        lines += [
            f"**{task}** ({metric.replace('_', ' ')}, {'lower' if metric in LOWER_IS_BETTER else 'higher'} is better; "
            f"{rank_matters(task, front)})",
            "",
            "| variant | seeds | adapter params | of r=8 | quality | plain LoRA with no more params | difference "
            "| spread | verdict |",
            "|---|---:|---:|---:|---|---|---:|---:|---|",
        ]
        for point in sorted(task_points, key=lambda p: (p.lr, not p.on_front, p.params, p.variant)):
            share = f"{point.params / reference:.1%}" if reference else ""
            quality = f"{_fmt(metric, point.mean)} ± {_fmt(metric, point.spread)}"
            cells = ["", "", "", "front" if point.on_front else ""]
            baseline = None if point.on_front else baseline_of(point, front)
            if baseline is not None:
                difference, spread, word = verdict(task, point, baseline)
                base = f"r={baseline.rank}: {_fmt(metric, baseline.mean)}"
                cells = [base, f"{_fmt(metric, difference, signed=True)}", _fmt(metric, spread), f"**{word}**"]
            elif not point.on_front:
                cells = ["(none: fewer params than r=1, or no front at its learning rate)", "", "", ""]
            lines.append(
                f"| {point.variant} | {point.seeds} | {point.params:,.0f} | {share} | {quality} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    lines.append(
        "Mean ± standard deviation over seeds; adapter parameters are what the method trains and exports at the end "
        "(LoRA's A and B; LoRA-drop's after the switch; AdaLoRA's unpruned triplets; VeRA's vectors; a classifier "
        "head trained in full is left out). Verdict: against plain LoRA (lora_alpha 16) at the largest rank with no "
        "more parameters; above/below means better/worse by more than the larger seed spread of the two. Made by "
        "`python benchmarks/front.py` from `benchmarks/results/front_runs.jsonl`."
    )
    return "\n".join(lines)


def plot(by_task: dict[str, list[Point]], path: Path, default: str) -> None:
    """One panel per task and learning rate: plain LoRA's front as a line (lora_alpha = 2r dashed), the other variants
    as points with their seed spread, the default as a star. The y range follows the front; points far off it are
    listed in the panel's corner instead of squashing the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (task, lr)
        for task in sorted(by_task, key=_task_order)
        for lr in sorted({p.lr for p in by_task[task]})
        if sum(p.on_front and p.lr == lr for p in by_task[task]) >= 2  # a front needs two ranks
    ]
    columns = 3
    rows = -(-(len(panels) + 1) // columns)  # one more panel for the legend
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.8 * rows), squeeze=False)
    others = sorted({p.variant for points_ in by_task.values() for p in points_ if p.rank is None and p.lr == 1.0})
    colours = {variant: plt.cm.tab10(i % 10) for i, variant in enumerate(Variant.parse(v).settings for v in others)}
    for ax, (task, lr) in zip(axes.flat, panels):
        task_points = [p for p in by_task[task] if p.lr == lr]
        front = sorted((p for p in task_points if p.on_front), key=lambda p: p.params)
        reference = sorted(
            (p for p in task_points if p.rank and p.alpha == 2 * p.rank != FRONT_ALPHA), key=lambda p: p.params
        )
        low, high = _y_range(task, front, task_points)
        off_chart = []
        for line, style, colour, label in ((front, "-o", "black", "plain LoRA, lora_alpha 16"),
                                           (reference, "--s", "gray", "plain LoRA, lora_alpha = 2r")):  # fmt: skip
            shown = [p for p in line if low <= p.mean <= high]
            off_chart += [p for p in line if p not in shown]
            if shown:
                ax.errorbar([p.params for p in shown], [p.mean for p in shown], yerr=[p.spread for p in shown],
                            fmt=style, color=colour, label=label, capsize=3, zorder=2)  # fmt: skip
                for p in shown:
                    ax.annotate(f"r={p.rank}", (p.params, p.mean), textcoords="offset points", xytext=(4, -11),
                                fontsize=8, color=colour)  # fmt: skip
        for p in sorted((p for p in task_points if p.rank is None), key=lambda p: p.variant):
            if not low <= p.mean <= high:
                off_chart.append(p)
                continue
            base = p.parsed.settings
            is_default = base == default
            ax.errorbar(
                [p.params], [p.mean], yerr=[p.spread], capsize=3, zorder=4 if is_default else 3,
                fmt="*" if is_default else {"adalora": "D", "vera": "v"}.get(base, "o"),
                markersize=15 if is_default else 6, color="crimson" if is_default else colours.get(base, "tab:gray"),
                label=f"{p.variant} (default)" if is_default else p.variant,
            )  # fmt: skip
        if off_chart:
            text = "off the chart:\n" + "\n".join(f"{p.variant}: {_fmt(metric_of(task), p.mean)}" for p in off_chart)
            ax.text(0.99, 0.99 if metric_of(task) in LOWER_IS_BETTER else 0.02, text, transform=ax.transAxes,
                    fontsize=7, ha="right", va="top" if metric_of(task) in LOWER_IS_BETTER else "bottom",
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})  # fmt: skip
        ax.set_ylim(low, high)
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters (log)")
        metric = metric_of(task)
        ax.set_ylabel(f"{metric.replace('_', ' ')} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
        ax.set_title(task if lr == 1 else f"{task}, {lr:g}x the learning rate")
        ax.grid(alpha=0.3)
    legend: dict[str, object] = {}
    for ax in list(axes.flat)[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    list(axes.flat)[len(panels)].legend(legend.values(), legend.keys(), loc="center", fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _y_range(task: str, front: list[Point], points_: list[Point]) -> tuple[float, float]:
    """A y range that holds the front and the points near it (within three times the front's span, at least 2% of
    its level), with a margin; farther points are listed, not drawn."""
    level = [p.mean for p in front] or [p.mean for p in points_]
    span = max(max(level) - min(level), 0.02 * abs(statistics.mean(level)))
    near = [p.mean for p in points_ if min(level) - 3 * span <= p.mean <= max(level) + 3 * span] + level
    margin = 0.15 * (max(near) - min(near) or span)
    return min(near) - margin, max(near) + margin


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if metric in LOWER_IS_BETTER:
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _task_order(task: str) -> tuple[int, str]:
    return (TASK_ORDER.index(task), "") if task in TASK_ORDER else (len(TASK_ORDER), task)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(RUNS_FILE))
    parser.add_argument("--results", default=str(RESULTS), help="where front.md and front.png go")
    parser.add_argument("--no_readme", dest="readme", action="store_false", help="leave README.md as it is")
    parser.add_argument("--default", default=DEFAULT, help="the variant that stands for the library's defaults")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    by_task = points(rows)
    table = markdown(by_task)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "front.md").write_text(table + "\n")
    plot(by_task, results / "front.png", args.default)
    if args.readme:
        replace_section("front", f"{table}\n\n![front](benchmarks/results/front.png)")
    print(table)


if __name__ == "__main__":
    main()
