"""The fair protocol of issue 29: every method at its own best learning rate, against plain LoRA at a lower rank.

A user who wants a smaller adapter can lower `r` and tune the learning rate, as every recipe they copy does. So each
method here gets its own rate from one grid per task (GSM: x1, x2, x4, x8, x16 of the task's base rate; encoders:
x0.5, x1, x2, x4), chosen with seed 0 by the score on a validation split held out from the training data (the lowest
answer loss for GSM, the highest accuracy for the encoders: `gpu_batch.TUNED_SCORES`), and is reported on the test
split with three seeds at that rate (`benchmarks/gpu_batch.py --part tuned` runs them; the rows are
`benchmarks/quality.py`'s, with `val_loss`/`test_loss` or `val_accuracy`/`test_accuracy`, and the validation curve).
The report says, per task:

- the learning-rate grid (validation loss per method and rate) and the rate each method got; a rate at the edge of
  the grid is flagged, since a larger or smaller one might have been better still;
- every method against the plain-LoRA front at the tuned rates: plain LoRA (lora_alpha 16) at the largest rank with no
  more adapter parameters, each at its own best rate; "above"/"below" when better/worse by more than the larger seed
  spread (standard deviation over the three seeds) of the two, "on" otherwise;
- the questions of the issue: does the default beat the front, does output importance beat a random choice of the
  same size, does keeping lora_alpha / r (`+keep`) do as well as the rank-k scaling, does a late switch compress
  what a rank-8 run learnt, and does rank matter at all at the tuned rate (r=1 against r=8, in seed spreads);
- whether plain LoRA r=8 at its best rate has flattened: its validation score over the last third of the steps.

    python benchmarks/tuned.py            # results/tuned.md and results/tuned.png from results/tuned_runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gpu_batch import GSM_TASKS, TUNED_ARMS, TUNED_SCORES, Score
from variants import DEFAULT_ALPHA, Variant

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "tuned_runs.jsonl"
BASE_RATE = {"gsm": 5e-4, "gsm_qv": 5e-4, "sarcasm": 1e-3, "polarity": 1e-3}  # quality.py's rate of each task (x1)
TASK_ORDER = ["gsm", "gsm_qv", "sarcasm", "polarity"]
DEFAULT = "kind+T0.5+trunc1"  # LoraDropConfig()'s settings, in benchmarks/quality.py's variant names
RANDOM, KEEP, LATE = f"random:{DEFAULT}", f"{DEFAULT}+keep", f"{DEFAULT}+alpha0.8"
RESID, RESID_LATE, RANDOM_LATE = f"{DEFAULT}+resid", f"{DEFAULT}+resid+alpha0.8", f"random:{LATE}"
ACT, ACT_LATE, RESID_ACT = f"{DEFAULT}+act", f"{DEFAULT}+act+alpha0.8", f"{DEFAULT}+resid+act"
RANK_MATTERS_SPREADS = 3.0  # issue 29: rank matters where r=1 trails r=8 by more than three seed spreads


@dataclass(frozen=True)
class Shown:
    """How the report writes a score: scale and digits, and the words for it."""

    scale: float
    digits: int
    test: str  # the section title's
    column: str  # the verdict table's
    validation: str  # the grid's, the curve's and the plot's titles
    axis: str  # the plot's axes

    def value(self, x: float) -> str:
        return f"{x * self.scale:.{self.digits}f}"

    def signed(self, x: float) -> str:
        return f"{x * self.scale:+.{self.digits}f}"


SHOWN = {
    "loss": Shown(1, 3, "test answer loss, lower is better", "test loss", "validation loss", "validation answer loss"),
    "accuracy": Shown(
        100,
        1,
        "test accuracy in %, higher is better",
        "test accuracy %",
        "validation accuracy",
        "validation accuracy %",
    ),
}


@dataclass
class Arm:
    """One method on one task under the protocol: its grid (seed 0) and its runs at the chosen rate."""

    task: str
    name: str
    grid: dict[float, float]  # learning-rate factor -> validation score (loss or accuracy), seed 0
    runs: dict[float, list[dict]]  # learning-rate factor -> rows (every seed)

    @property
    def score(self) -> Score:
        return TUNED_SCORES[self.task]

    @property
    def shown(self) -> Shown:
        return SHOWN[self.score.metric]

    @property
    def complete(self) -> bool:
        return len(self.grid) >= 2

    @property
    def rate(self) -> float:
        """The factor with the best seed-0 validation score."""
        return self.score.best(self.grid)

    @property
    def at_rate(self) -> list[dict]:
        return sorted(self.runs.get(self.rate, []), key=lambda row: row["seed"])

    @property
    def seeds(self) -> int:
        return len(self.at_rate)

    def _values(self, metric: str) -> list[float]:
        return [row[metric] for row in self.at_rate if metric in row]

    @property
    def mean(self) -> float:
        return statistics.mean(self._values(f"test_{self.score.metric}"))

    @property
    def spread(self) -> float:
        values = self._values(f"test_{self.score.metric}")
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def params(self) -> float:
        return statistics.mean(row["adapter_params"] for row in self.at_rate)

    @property
    def parsed(self) -> Variant:
        return Variant.parse(self.name)

    @property
    def front_rank(self) -> int | None:
        """The rank of a plain LoRA on the front (lora_alpha 16), None for every other method."""
        parsed = self.parsed
        return parsed.r if parsed.is_plain_lora and parsed.lora_alpha == DEFAULT_ALPHA else None

    @property
    def edge(self) -> bool:
        return self.rate in (min(self.grid), max(self.grid))

    def curve(self) -> list[tuple[int, float, float]]:
        """(step, mean, spread) of the validation score over the seeds at the chosen rate."""
        by_step: dict[int, list[float]] = defaultdict(list)
        for row in self.at_rate:
            for step, loss in row.get("val_curve") or []:
                by_step[step].append(loss)
        return [
            (step, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for step, v in sorted(by_step.items())
        ]


def arms(rows: list[dict]) -> dict[str, dict[str, Arm]]:
    """`{task: {method: Arm}}` from the run rows that carry a test score (the task's: TUNED_SCORES)."""
    out: dict[str, dict[str, Arm]] = defaultdict(dict)
    for row in rows:
        score = TUNED_SCORES.get(row["task"])
        if score is None or f"test_{score.metric}" not in row:
            continue
        parsed = Variant.parse(row["variant"])
        arm = out[row["task"]].setdefault(parsed.arm, Arm(row["task"], parsed.arm, {}, {}))
        arm.runs.setdefault(parsed.lr_factor, []).append(row)
        if row["seed"] == 0:
            arm.grid[parsed.lr_factor] = row[f"val_{score.metric}"]
    return {task: {name: arm for name, arm in by.items() if arm.complete} for task, by in out.items()}


def baseline_of(arm: Arm, front: list[Arm]) -> Arm | None:
    """Plain LoRA at the largest rank with no more adapter parameters than `arm` (None on the front, or below r=1)."""
    if arm.front_rank is not None:
        return None
    fitting = [point for point in front if point.params <= arm.params * 1.0001]
    return max(fitting, key=lambda point: point.params) if fitting else None


def next_above(arm: Arm, front: list[Arm], margin: float = 0.10) -> Arm | None:
    """Plain LoRA at the smallest rank with more adapter parameters than `arm`, if at most `margin` more: the
    comparison a reader makes when a method lands just below a rank's size (24% against r=2's 25%)."""
    if arm.front_rank is not None:
        return None
    larger = [point for point in front if arm.params * 1.0001 < point.params <= arm.params * (1 + margin)]
    return min(larger, key=lambda point: point.params) if larger else None


def compare(a: Arm, b: Arm) -> tuple[float, float, str]:
    """How much better `a` is than `b` (test score, positive: better), the larger seed spread, and the verdict."""
    gain, spread = a.score.gain(a.mean, b.mean), max(a.spread, b.spread)
    return gain, spread, "above" if gain > spread else "below" if gain < -spread else "on"


def mean_spread(arm: Arm) -> str:
    """`mean ± spread` of the test score at the chosen rate, as the task writes it."""
    return f"{arm.shown.value(arm.mean)} ± {arm.shown.value(arm.spread)}"


def in_spreads(gain: float, spread: float) -> str:
    return f"{abs(gain) / spread:.1f} seed spreads" if spread > 0 else "no seed spread"


def flattened(arm: Arm) -> str:
    """What the validation curve of `arm` at its rate did over the last third of the steps, against its spread."""
    curve = arm.curve()
    if len(curve) < 3:
        return "no validation curve recorded"
    last_step = curve[-1][0]
    start = min(curve, key=lambda point: abs(point[0] - 2 * last_step / 3))
    change, show = curve[-1][1] - start[1], arm.shown
    moving = ("still rising", "falling (over-fitting)") if arm.score.higher_is_better else None
    moving = moving or ("still falling", "rising (over-fitting)")
    state = "flattened" if abs(change) <= arm.spread else moving[0] if arm.score.gain(change, 0) > 0 else moving[1]
    return (
        f"{show.validation} {show.value(start[1])} at step {start[0]} -> {show.value(curve[-1][1])} at step "
        f"{last_step} ({show.signed(change)}; test seed spread {show.value(arm.spread)}): {state}"
    )


def rate_label(task: str, factor: float) -> str:
    return f"x{factor:g} ({BASE_RATE[task] * factor:.0e})"


def shown(task: str) -> Shown:
    return SHOWN[TUNED_SCORES[task].metric]


def grid_table(task: str, by_name: dict[str, Arm]) -> list[str]:
    factors = sorted({factor for arm in by_name.values() for factor in arm.grid})
    lines = ["| method | " + " | ".join(f"x{f:g}" for f in factors) + " | chosen |"]
    lines.append("|---|" + "---:|" * len(factors) + "---|")
    for arm in sorted(by_name.values(), key=_order):
        cells = []
        for factor in factors:
            value = arm.grid.get(factor)
            cell = "" if value is None else shown(task).value(value)
            cells.append(f"**{cell}**" if factor == arm.rate else cell)
        edge = " (edge of the grid)" if arm.edge else ""
        lines.append(f"| {arm.name} | " + " | ".join(cells) + f" | {rate_label(task, arm.rate)}{edge} |")
    return lines


def verdict_table(task: str, by_name: dict[str, Arm]) -> list[str]:
    front = sorted((arm for arm in by_name.values() if arm.front_rank is not None), key=lambda arm: arm.params)
    r8 = next((arm for arm in front if arm.front_rank == 8), None)
    show = shown(task)
    lines = [
        f"| method | lr | seeds | adapter params | of r=8 | {show.column} | plain LoRA with no more params (its lr) "
        "| difference | spread | verdict | min/run | peak GiB |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for arm in sorted(by_name.values(), key=lambda arm: (arm.params, _order(arm))):
        of_r8 = f"{arm.params / r8.params:.1%}" if r8 else ""
        base = baseline_of(arm, front)
        cells = ["", "", "", "front" if arm.front_rank is not None else "(no plain LoRA this small)"]
        if base is not None:
            gain, spread, word = compare(arm, base)
            base_name = f"r={base.front_rank}: {show.value(base.mean)} ({rate_label(task, base.rate)})"
            cells = [base_name, show.signed(gain), show.value(spread), f"**{word}**"]
        minutes = statistics.mean(row.get("train_minutes", row["wall_minutes"]) for row in arm.at_rate)
        peaks = [row["peak_gib"] for row in arm.at_rate if "peak_gib" in row]
        peak = f"{max(peaks):.1f}" if peaks else ""
        lines.append(
            f"| {arm.name} | {rate_label(task, arm.rate)} | {arm.seeds} | {arm.params:,.0f} | {of_r8} | "
            f"{mean_spread(arm)} | " + " | ".join(cells) + f" | {minutes:.2f} | {peak} |"
        )
    return lines


def findings(task: str, by_name: dict[str, Arm]) -> list[str]:
    """The issue's questions, answered in words from the numbers (only those whose arms have three seeds)."""
    front = sorted((arm for arm in by_name.values() if arm.front_rank is not None), key=lambda arm: arm.params)
    ranks = {arm.front_rank: arm for arm in front}
    done = {name: arm for name, arm in by_name.items() if arm.seeds >= 3}
    show, out = shown(task), []

    def line(text: str) -> None:
        out.append(f"- {text}")

    if 1 in ranks and 8 in ranks and ranks[1].seeds >= 3 and ranks[8].seeds >= 3:
        gain, spread, _ = compare(ranks[8], ranks[1])
        matters = gain > RANK_MATTERS_SPREADS * spread  # r=1 trails r=8 (a lead of r=1 is no sign that rank matters)
        line(
            f"**Rank {'matters' if matters else 'does not matter'} at the tuned rate.** Plain LoRA r=8 "
            f"({rate_label(task, ranks[8].rate)}) {mean_spread(ranks[8])} against r=1 "
            f"({rate_label(task, ranks[1].rate)}) {mean_spread(ranks[1])}: r=8 is {show.signed(gain)} "
            f"better, {in_spreads(gain, spread)} (the issue's bar: {RANK_MATTERS_SPREADS:g})."
        )
    for name, question in (
        (DEFAULT, "The default (per-kind T 0.5, dropped modules truncated to rank 1)"),
        (KEEP, "The default with `dropped_scaling='keep'`"),
        (LATE, "A late switch (alpha 0.8: rank 8 for 80% of the steps, then truncated)"),
        (RESID, "The default scored by the truncation residual (`score='residual'`)"),
        (RESID_LATE, "A late switch scored by the truncation residual"),
        (ACT, "The default with activation-aware truncation (`truncation='activation'`)"),
        (ACT_LATE, "A late switch with activation-aware truncation"),
        (RESID_ACT, "Activation-aware truncation scored by what it leaves (`score='residual'`)"),
        ("lora@r1a128", "Plain LoRA r=1 with lora_alpha 128 (the default's rank-1 step size on every module)"),
    ):
        arm = done.get(name)
        base = baseline_of(arm, front) if arm is not None else None
        if base is None or base.seeds < 3:
            continue
        gain, spread, word = compare(arm, base)
        text = (
            f"{question}: {mean_spread(arm)} at {rate_label(task, arm.rate)} with "
            f"{arm.params:,.0f} adapter parameters, against plain LoRA r={base.front_rank} {mean_spread(base)} at "
            f"{rate_label(task, base.rate)}: **{word}** the front ({show.signed(gain)}, "
            f"{in_spreads(gain, spread)})"
        )
        above = next_above(arm, front)
        if above is not None and above.seeds >= 3:
            gain, spread, word = compare(arm, above)
            word = {"above": "better", "below": "worse", "on": "no different"}[word]
            text += (
                f"; plain LoRA r={above.front_rank}, {above.params / arm.params - 1:.0%} more parameters, "
                f"{mean_spread(above)} at {rate_label(task, above.rate)}: {word} ({show.signed(gain)}, "
                f"{in_spreads(gain, spread)})"
            )
        line(text + ".")
    pairs = (
        (DEFAULT, RANDOM, "Output importance against a random choice of the same size"),
        (KEEP, DEFAULT, "`keep` (lora_alpha / r) against the default's `rank` scaling (lora_alpha / 1)"),
        (LATE, DEFAULT, "The late switch against the default's switch at 10%"),
        (LATE, RANDOM_LATE, "Output importance against a random choice of the same size, at the late switch"),
        (RESID, RANDOM, "The truncation residual against a random choice of the default's size"),
        (RESID_LATE, RANDOM_LATE, "The truncation residual against a random choice, at the late switch"),
        (RESID, DEFAULT, "The truncation residual against output importance"),
        (ACT, DEFAULT, "Activation-aware truncation against the SVD, the same modules kept"),
        (ACT_LATE, LATE, "Activation-aware truncation against the SVD, at the late switch"),
        (RESID_ACT, RANDOM, "The activation-aware residual against a random choice of the default's size"),
    )
    for first, second, question in pairs:
        if first in done and second in done:
            gain, spread, word = compare(done[first], done[second])
            word = {"above": "better", "below": "worse", "on": "no different"}[word]
            line(
                f"{question}: {mean_spread(done[first])} ({rate_label(task, done[first].rate)}) "
                f"against {mean_spread(done[second])} "
                f"({rate_label(task, done[second].rate)}): **{word}** ({show.signed(gain)}, "
                f"{in_spreads(gain, spread)})."
            )
    if 8 in ranks:
        line(f"Plain LoRA r=8 at its rate, {flattened(ranks[8])}.")
    edges = [arm.name for arm in by_name.values() if arm.edge]
    if edges:
        line(f"Chosen at the edge of the grid (a rate beyond it might be better still): {', '.join(edges)}.")
    missing = [arm.name for arm in by_name.values() if arm.seeds < 3]
    if missing:
        line(f"Fewer than three seeds at the chosen rate (no verdict drawn from them): {', '.join(missing)}.")
    not_run = [name for name in TUNED_ARMS if name not in by_name]
    if not_run:
        line(f"Methods of the protocol not run on this task (no complete grid): {', '.join(not_run)}.")
    return out


def curve_table(by_name: dict[str, Arm]) -> list[str]:
    """Validation score over the steps (mean over the seeds at each method's chosen rate)."""
    shown = [arm for arm in sorted(by_name.values(), key=_order) if arm.curve()]
    steps = sorted({step for arm in shown for step, _, _ in arm.curve()})
    if not shown:
        return []
    lines = ["| method (its lr) | " + " | ".join(f"step {step}" for step in steps) + " |"]
    lines.append("|---|" + "---:|" * len(steps))
    for arm in shown:
        values = {step: mean for step, mean, _ in arm.curve()}
        cells = [arm.shown.value(values[step]) if step in values else "" for step in steps]
        lines.append(f"| {arm.name} (x{arm.rate:g}) | " + " | ".join(cells) + " |")
    return lines


def update_table(by_name: dict[str, Arm]) -> list[str]:
    """How far one optimizer step moves a module's `s B A` (benchmarks/quality.py's UpdateSizes), mean over the seeds
    at each method's chosen rate, for the rows that recorded it: the step size a method trains with, apart from which
    modules it chose."""
    groups = ("all", "before", "kept", "dropped")
    shown = []
    for arm in sorted(by_name.values(), key=_order):
        recorded = [row["step_update"] for row in arm.at_rate if row.get("step_update")]
        if recorded:
            means = {
                g: statistics.mean(r[g] for r in recorded if g in r) for g in groups if any(g in r for r in recorded)
            }
            shown.append((arm, means))
    if not shown:
        return []
    lines = ["", "Size of one optimizer step's move of a module's `s B A` (Frobenius norm, mean over modules, sampled "]
    lines[-1] += (
        "steps and seeds at the chosen rate): plain LoRA's modules, or LoRA-drop's before the switch and after it."
    )
    lines += ["", "| method (its lr) | all | before the switch | kept | dropped |", "|---|---:|---:|---:|---:|"]
    for arm, means in shown:
        cells = [f"{means[g]:.2e}" if g in means else "" for g in groups]
        lines.append(f"| {arm.name} (x{arm.rate:g}) | " + " | ".join(cells) + " |")
    return lines


def rows_of(by_name: dict[str, Arm]) -> list[dict]:
    """Every run row of a task's methods."""
    return [row for arm in by_name.values() for rows in arm.runs.values() for row in rows]


def _order(arm: Arm) -> tuple[int, str]:
    rank = arm.front_rank
    return (0, f"{rank:03d}") if rank is not None else (1, arm.name)


def markdown(by_task: dict[str, dict[str, Arm]], source: str) -> str:
    gsm = {task: by_name for task, by_name in by_task.items() if task in GSM_TASKS}
    encoders = {task: by_name for task, by_name in by_task.items() if task not in GSM_TASKS and by_name}
    lines = ["# Every method at its own best learning rate (issue 29's protocol)"]
    if gsm or not encoders:
        lines += ["", gsm_protocol(gsm, source)]
    if encoders:
        lines += ["", encoder_protocol(encoders, source)]
    for task in sorted(by_task, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER)):
        by_name = by_task[task]
        if not by_name:
            continue
        show = shown(task)
        validation = show.validation.capitalize()
        hardware = sorted({row["hardware"] for row in rows_of(by_name)})
        steps = sorted({row["steps"] for row in rows_of(by_name)})
        lines += ["", f"## {task} ({show.test}; {', '.join(hardware)}; steps {steps})", ""]
        lines += ["**Verdict at the tuned rates**", "", *findings(task, by_name), ""]
        lines += verdict_table(task, by_name)
        lines += ["", f"{validation} (seed 0) per learning-rate factor; bold: the chosen rate.", ""]
        lines += grid_table(task, by_name)
        lines += ["", f"{validation} over training, mean over the seeds at each method's chosen rate.", ""]
        lines += curve_table(by_name)
        lines += update_table(by_name)
    absent = [task for task in TASK_ORDER if not by_task.get(task)]
    if absent:
        lines += ["", f"Tasks of the protocol with no complete grid yet: {', '.join(absent)}."]
    lines += [
        "",
        "Mean ± standard deviation over the seeds at the chosen rate; adapter parameters are what the method exports "
        "(LoRA-drop's after the switch). Verdict against plain LoRA (lora_alpha 16) at the largest rank with no more "
        "parameters, each at its own chosen rate: above/below means better/worse by more than the larger seed spread. "
        "min/run is the training time of one run while 4 to 12 runs shared the GPU, or on a CPU one run with one "
        "thread beside other work (it says how crowded the machine was, not how fast a method is); peak GiB is the "
        "most GPU memory one run allocated.",
        "",
        "![tuned](tuned.png)",
    ]
    return "\n".join(lines) + "\n"


def gsm_protocol(by_task: dict[str, dict[str, Arm]], source: str) -> str:
    """The paragraph that says how the GSM tasks were run."""
    return (
        f"Each method's learning rate is chosen from its grid (within {grid_of(by_task)}; each method's own is in "
        "the grid table of its task: methods added later ran at the rates around every earlier one's best) times "
        "the task's base rate (5e-4) by the "
        "lowest answer loss on a validation split (the last 200 of GSM-Symbolic's 2,000 training problems, held "
        "out; the model trains on the other 1,800), seed 0; it is reported on the 200 test problems with seeds 0, "
        "1, 2 at that rate. SmolLM2-135M-Instruct, 150 steps of 8 sequences, cosine schedule, lora_alpha 16 unless "
        "the name says otherwise (`lora@r1a128`: lora_alpha 128); `gsm` has LoRA on all seven linear kinds, "
        "`gsm_qv` on q and v. Names as in `benchmarks/quality.py`: `+keep` is `dropped_scaling='keep'`, `+alpha0.8` "
        "a switch at 80% of the steps, `+resid` `score='residual'` (what truncation takes from each module's "
        "output), `random:` the same number of full-rank modules chosen at random (one draw per seed). Libraries "
        "on the GPU machine: torch 2.11, transformers 5.24.0, peft 0.21.2 (`benchmarks/fetch_device_wheels.sh`). "
        f"Made by `python benchmarks/tuned.py` from `{source}`."
    )


def encoder_protocol(by_task: dict[str, dict[str, Arm]], source: str) -> str:
    """The paragraph that says how the encoder tasks were run (the sizes as the rows record them)."""
    sizes = []
    for task in (task for task in TASK_ORDER if task in by_task):
        keys = ("train_examples", "val_examples", "eval_examples")
        counts = [{row.get(key) for row in rows_of(by_task[task])} - {None} for key in keys]
        train, val, test = (", ".join(f"{n:,}" for n in sorted(c)) or "?" for c in counts)
        sizes.append(f"`{task}` trains on {train} rows, validates on {val} and tests on {test}")
    return (
        f"The encoder tasks (`sarcasm`: news headlines, sarcastic or not; `polarity`: movie-review sentences): "
        f"all-MiniLM-L6-v2 through `recipes/quickstart.py`, LoRA on query, key, value and dense, batches of 32, "
        f"linear schedule. Each method's learning rate is chosen from its grid (within {grid_of(by_task)}) times "
        f"the task's base rate (1e-3) by the highest accuracy on a validation split, seed 0: rows drawn once (a fixed "
        f"seed) and held out of the data before the run's seed cuts the rest into training and test rows, so it is "
        f"the same for every seed and rate and disjoint from both; it is reported as the accuracy on the test rows "
        f"with seeds 0, 1, 2 at that rate. {'; '.join(sizes)}. Made by `python benchmarks/tuned.py` from "
        f"`{source}`."
    )


def grid_of(by_task: dict[str, dict[str, Arm]]) -> str:
    """The learning-rate factors any method was run at, spelt `x2, x4, ...`."""
    factors = sorted({factor for by_name in by_task.values() for arm in by_name.values() for factor in arm.grid})
    return ", ".join(f"x{factor:g}" for factor in factors)


def plot(by_task: dict[str, dict[str, Arm]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task in TASK_ORDER if by_task.get(task)]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 2, figsize=(14, 4.5 * len(tasks)), squeeze=False)
    names = sorted({name for by_name in by_task.values() for name in by_name})
    colours = {name: plt.get_cmap("tab20")(index % 20) for index, name in enumerate(names)}
    for (grid_ax, curve_ax), task in zip(axes, tasks):
        for arm in sorted(by_task[task].values(), key=_order):
            factors = sorted(arm.grid)
            style, colour = ("-" if arm.front_rank is not None else "--"), colours[arm.name]
            scale = arm.shown.scale
            grid = [arm.grid[f] * scale for f in factors]
            grid_ax.plot(factors, grid, style, color=colour, marker="o", label=arm.name)
            curve = arm.curve()
            if curve and (arm.front_rank is not None or arm.name in (DEFAULT, KEEP, LATE, RESID)):
                steps, means, spreads = zip(*((step, mean * scale, spread * scale) for step, mean, spread in curve))
                curve_ax.errorbar(
                    steps, means, yerr=spreads, fmt=style, color=colour, marker=".", capsize=2, label=arm.name
                )
        show, scale = shown(task), "log" if not TUNED_SCORES[task].higher_is_better else "linear"
        grid_ax.set_xscale("log", base=2)
        grid_ax.set_yscale(scale)
        grid_ax.set_xlabel(f"learning-rate factor (x {BASE_RATE[task]:.0e})".replace("e-0", "e-"))
        grid_ax.set_ylabel(f"{show.axis} (seed 0)")
        grid_ax.set_title(f"{task}: learning-rate grid")
        grid_ax.legend(fontsize=7)
        curve_ax.set_yscale(scale)
        curve_ax.set_xlabel("optimizer step")
        curve_ax.set_ylabel(f"{show.axis} (mean over seeds)")
        curve_ax.set_title(f"{task}: {show.validation} over training, each at its chosen rate")
        curve_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(RUNS_FILE))
    parser.add_argument("--results", default=str(RESULTS), help="where tuned.md and tuned.png go")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    by_task = arms(rows)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    try:
        source = Path(args.runs).resolve().relative_to(ROOT)
    except ValueError:
        source = Path(args.runs)
    text = markdown(by_task, str(source))
    (results / "tuned.md").write_text(text)
    plot(by_task, results / "tuned.png")
    print(text)


if __name__ == "__main__":
    main()
