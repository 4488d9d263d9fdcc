"""Runs many small benchmark processes side by side on one GPU, within a time budget, most important first.

MiniLM and SmolLM2-135M use a small part of an H200, so one GPU takes a dozen runs at once. The jobs of a part (the
quality rows of benchmarks/quality.py and the measurements of benchmarks/contribution.py) are queued in priority
order: the decoder with LoRA on all seven kinds before the rest, every variant's first seed before any second seed.
A job starts only while the time it is expected to take (learnt from the finished jobs of its kind) still fits the
budget; at the end of the budget the jobs still running are stopped. Every job appends its own result line to a file
directly under --out as it ends, and this launcher appends one line per job to jobs.tsv, so a command stopped at its
time limit still returns everything that finished.

    python3 benchmarks/gpu_batch.py --part 1 --out "$OUT" --models /tmp/models --data .carry/run
    python3 benchmarks/gpu_batch.py --part 1 --out /tmp/toy --toy      # the same jobs at toy size, on a CPU

Part "front" measures quality per parameter (benchmarks/quality.py's front report): plain LoRA at ranks 1-16, the
LoRA-drop candidates, AdaLoRA and VeRA, on both decoder tasks and both encoder tasks. Its results accumulate in
--results_dir, which outlasts a command while the GPU machine stays warm: a second command skips every job the first
one finished and goes on down the queue, and each command copies what has accumulated to --out.

Part "tuned" runs the fair protocol of benchmarks/tuned.py on the tasks of --tasks (the decoder tasks unless told):
every method (TUNED_ARMS) at every learning rate of the task's grid (TUNED_RATES times the task's rate, or --rates)
with seed 0, scored on a validation split held out from the training data (GSM: the last --gsm_val of GSM-Symbolic's
training problems, the model trains on the others; encoders: quality.py's --validate, a fixed draw of rows held out
of the data file before the quickstart cuts training and test rows), then seeds 1 and 2 at the rate each method's
validation score chose (TUNED_SCORES: the lowest answer loss, the highest accuracy), as soon as its grid is complete;
every run also scores the test split. The queue is re-derived from the accumulated results whenever a process ends,
task by task in the order of --tasks. Results accumulate as in part "front"; --resume_from merges the rows an earlier
machine returned (the copy committed under benchmarks/results/), so a machine given back mid-way costs only the runs
in flight.

    python3 benchmarks/gpu_batch.py --part tuned --out "$OUT" --gsm_steps 150 \\
        --resume_from benchmarks/results/tuned_runs.jsonl
    python3 benchmarks/gpu_batch.py --part tuned --out "$OUT" --tasks sarcasm polarity \\
        --resume_from benchmarks/results/tuned_runs.jsonl

On a CPU, `--toy` runs the same queue at toy size (the encoders on 256/64/64 rows, 40 steps): with --data holding
sarcasm.jsonl (prepare_carry.py's) and --models a minilm/ directory, two methods take about 7 minutes on 2 cores:

    python3 benchmarks/gpu_batch.py --part tuned --toy --tasks sarcasm --arms lora@r1 lora --jobs 2 --budget_s 1500 \\
        --out /tmp/toy --results_dir /tmp/toy/results --models /tmp/toy/models --data /tmp/toy/data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from variants import Variant

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# The variants of each task. CANDIDATE is the scoring the other settings (restart, auto, drop, random selection) are
# measured with: the likely default by the CPU signal (kind: 60% of the parameters, answer loss 0.925 vs 0.901 for
# LoRA, 60 steps, seed 0); --candidate changes it.
SCORINGS = ["T0.9", "relative+kind", "kind", "relative", "layer", "rank", "T0.8"]
WITH_CANDIDATE = ["random:{c}", "{c}+restart", "{c}+auto", "{c}+drop"]
# Expected minutes per job kind before any has finished (an H200 shared by a dozen processes).
FIRST_GUESS_MIN = {"encoder": 1.0, "gsm": 3.0, "gsm_qv": 2.5, "contribution-encoder": 2.0, "contribution-gsm": 4.0}
TOY_ENCODER_SIZES = (256, 64, 64)  # --toy: encoder rows to train, test and validate on (quality.py --encoder_sizes)
FIRST_GUESS_MIN.update(sarcasm=1.0, polarity=0.8)  # part "tuned" learns each task's time on its own
# Part "front": the tasks, the plain-LoRA ranks every point is compared with, and the rest in priority order.
FRONT_TASKS = ["gsm", "gsm_qv", "sarcasm", "polarity"]
FRONT_RANKS = ["lora@r1", "lora@r2", "lora@r4", "lora"]
FRONT_CANDIDATES = ["kind+T0.5+trunc1", "T0.9+trunc1"]
FRONT_MORE = ["kind+trunc1", "random:kind+T0.5+trunc1", "kind+T0.5", "adalora@r2", "vera", "lora@r16"]
FRONT_ONE_SEED = ["lora@r1a2", "lora@r2a4", "lora@r4a8"]  # lora_alpha = 2r: the reference line, one seed
# Part "tuned": the methods of issue 29's protocol, most decisive first (the plain-LoRA front, the default, random
# choice of the same size, the default with lora_alpha / r kept, rank 1 with the default's step size on every module
# (lora_alpha x8), a late switch that compresses what a rank-8 run learnt), and the learning-rate grid.
GSM_TASKS = ("gsm", "gsm_qv")
TUNED_TASKS = ["gsm", "gsm_qv"]  # part tuned's default --tasks (the encoders: --tasks sarcasm polarity)
TUNED_ARMS = ["lora@r1", "lora", "kind+T0.5+trunc1", "random:kind+T0.5+trunc1", "lora@r2", "lora@r4"]
TUNED_ARMS += ["kind+T0.5+trunc1+keep", "lora@r1a128", "kind+T0.5+trunc1+alpha0.8"]
TUNED_ARMS += ["random:kind+T0.5+trunc1+alpha0.8", "kind+T0.5+trunc1+resid", "kind+T0.5+trunc1+resid+alpha0.8"]
# A random draw of the residual's size; the late switch without rank-k scaling (is its jump the step or the cut?).
TUNED_ARMS += ["random:kind+T0.5+trunc1+resid", "kind+T0.5+trunc1+keep+alpha0.8"]
# Activation-aware truncation: at the default's switch, at the late switch (where the cut lost most), and with the
# residual it minimises.
TUNED_ARMS += ["kind+T0.5+trunc1+act", "kind+T0.5+trunc1+act+alpha0.8", "kind+T0.5+trunc1+resid+act"]
# Each task's learning-rate grid (factors on quality.py's rate: 5e-4 for GSM, 1e-3 for the encoders, where the untuned
# runs were); --rates replaces it for every task.
GSM_RATES, ENCODER_RATES = (1, 2, 4, 8, 16), (0.5, 1, 2, 4)
TUNED_RATES = {"gsm": GSM_RATES, "gsm_qv": GSM_RATES, "sarcasm": ENCODER_RATES, "polarity": ENCODER_RATES}


@dataclass(frozen=True)
class Score:
    """What the protocol scores a task by: `val_<metric>` chooses the learning rate, `test_<metric>` is reported."""

    metric: str
    higher_is_better: bool

    def best(self, values: dict[float, float]) -> float:
        """The key of the best value (the first of equals, in the dict's order)."""
        return (max if self.higher_is_better else min)(values, key=values.get)

    def gain(self, a: float, b: float) -> float:
        """How much better `a` is than `b` (positive: better)."""
        return a - b if self.higher_is_better else b - a


TUNED_SCORES = {
    "gsm": Score("loss", higher_is_better=False),
    "gsm_qv": Score("loss", higher_is_better=False),
    "sarcasm": Score("accuracy", higher_is_better=True),
    "polarity": Score("accuracy", higher_is_better=True),
}


@dataclass
class Job:
    name: str
    kind: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    log: Path | None = None
    extra: dict = field(default_factory=dict)


def task_args(
    task: str, args: argparse.Namespace, exact_match: bool = False, files: dict[str, Path] | None = None
) -> list[str]:
    """Model, data and size flags of a task (quality.py and contribution.py take the same). `files` (part tuned;
    GSM: train, val, test) makes the evaluation file the validation split and adds the test split; for an encoder it
    asks quality.py for its own validation split (`--validate`)."""
    data = Path(args.data)
    if task in ("gsm", "gsm_qv"):
        sizes = ["--steps", str(args.gsm_steps), "--batch_size", str(args.gsm_batch), "--eval_samples"]
        sizes += [str(args.gsm_eval), "--max_new_tokens", str(args.gsm_new_tokens)]
        sizes += ["--eval_batch_size", str(args.gsm_eval_batch)]
        sizes += [] if exact_match else ["--no_exact_match"]
        named = [f"gsm_train={data / 'gsm' / 'train.jsonl'}", f"gsm_eval={data / 'gsm' / 'test.jsonl'}"]
        if files is not None:
            named = [f"gsm_train={files['train']}", f"gsm_eval={files['val']}", f"gsm_test={files['test']}"]
        return [*sizes, "--model", str(Path(args.models) / "smollm2"), "--data", *named]
    sizes = ["--steps", str(args.encoder_steps), *(["--validate"] if files is not None else [])]
    sizes += ["--encoder_sizes", *map(str, TOY_ENCODER_SIZES)] if args.toy else []
    return [*sizes, "--model", str(Path(args.models) / "minilm"), "--data", f"{task}={data / f'{task}.jsonl'}"]


def jobs_of_part(part: int, args: argparse.Namespace) -> list[Job]:
    """Part 1: the decoder with LoRA on all seven kinds. Part 2: the encoders and the decoder with LoRA on q,v.

    Queued in priority order: every variant's first seed, the contribution runs, the other seeds of the variants the
    default is decided by (LoRA, the candidate, random selection at its size, the paper's T0.9, the relative
    scorings), then the other seeds of the rest. Exact match (greedy generation: most of a GSM run's time, and near
    zero for a 135M model) is measured on the first `--exact_match_seeds` seeds only.
    """
    candidate = args.candidate
    variants = ["lora", *SCORINGS, *(v.format(c=candidate) for v in WITH_CANDIDATE)]
    decisive = [
        v for v in variants if v in ("lora", candidate, f"random:{candidate}", "T0.9", "relative", "relative+kind")
    ]
    tasks = ["gsm"] if part == 1 else ["sarcasm", "polarity", "gsm_qv"]
    order = [(0, variants)] + [(seed, decisive) for seed in SEEDS[1 : args.seeds]]
    order += [(seed, [v for v in variants if v not in decisive]) for seed in SEEDS[1 : args.seeds]]
    jobs = []
    for seed, chosen in order:
        for task in tasks:
            kind = task if task.startswith("gsm") else "encoder"
            for variant in chosen:
                argv = ["benchmarks/quality.py", "run", "--task", task, "--variants", variant, "--seeds", str(seed)]
                argv += ["--out", str(Path(args.out) / "quality_runs.jsonl")]
                argv += task_args(task, args, exact_match=seed < args.exact_match_seeds)
                jobs.append(Job(f"{task}-{variant}-{seed}", kind, argv))
        if seed == 0:
            jobs += [contribution_job(task, args) for task in tasks]
    return jobs


def front_jobs(args: argparse.Namespace) -> list[Job]:
    """Part "front", most decisive first: the ranks and the candidates at seed 0, then at seeds 1 and 2, then seed 0
    of the rest, then their other seeds. Jobs whose result is already in --results_dir are left out."""
    results = Path(args.results_dir) / "quality_runs.jsonl"
    done = set()
    if results.is_file():
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        done = {(row["task"], row["variant"], row["seed"]) for row in rows}
    decisive = FRONT_RANKS + args.candidates
    tiers = [(0, decisive), *((seed, decisive) for seed in SEEDS[1:]), (0, FRONT_MORE + FRONT_ONE_SEED)]
    tiers += [(seed, FRONT_MORE) for seed in SEEDS[1:]]
    jobs = []
    for seed, variants in tiers:
        for variant in variants:
            for task in FRONT_TASKS:
                if (task, variant, seed) in done:
                    continue
                argv = ["benchmarks/quality.py", "run", "--task", task, "--variants", variant, "--seeds", str(seed)]
                argv += ["--out", str(results), *task_args(task, args)]
                kind = task if task.startswith("gsm") else "encoder"
                jobs.append(Job(f"{task}-{variant}-{seed}", kind, argv))
    return jobs


def split_gsm(args: argparse.Namespace) -> dict[str, Path]:
    """The tuned part's GSM files: the training problems less the last `--gsm_val`, those as the validation split,
    and the test problems as they are (written once under --work_dir; the same rows on every machine)."""
    data, out = Path(args.data) / "gsm", Path(args.work_dir) / "gsm_split"
    out.mkdir(parents=True, exist_ok=True)
    rows = (data / "train.jsonl").read_text().splitlines()
    if len(rows) <= args.gsm_val:
        raise SystemExit(f"{data / 'train.jsonl'} has {len(rows)} problems: too few to hold out {args.gsm_val}.")
    files = {"train": out / "fit.jsonl", "val": out / "val.jsonl", "test": data / "test.jsonl"}
    files["train"].write_text("\n".join(rows[: -args.gsm_val]) + "\n")
    files["val"].write_text("\n".join(rows[-args.gsm_val :]) + "\n")
    return files


def chosen_rates(rows: list[dict], rates: dict[str, tuple[float, ...]] = TUNED_RATES) -> dict[tuple[str, str], float]:
    """`{(task, arm): learning-rate factor}` for every method whose seed-0 grid (`rates[task]`) is complete: the
    factor with the best validation score among them (TUNED_SCORES; the rule benchmarks/tuned.py reports with)."""
    grid: dict[tuple[str, str], dict[float, float]] = {}
    for row in rows:
        score = TUNED_SCORES.get(row["task"])
        if row["seed"] == 0 and score is not None and f"val_{score.metric}" in row and row["task"] in rates:
            parsed = Variant.parse(row["variant"])
            grid.setdefault((row["task"], parsed.arm), {})[parsed.lr_factor] = row[f"val_{score.metric}"]
    chosen = {}
    for (task, arm), values in grid.items():
        factors = [float(rate) for rate in rates[task]]
        if all(factor in values for factor in factors):
            chosen[(task, arm)] = TUNED_SCORES[task].best({factor: values[factor] for factor in factors})
    return chosen


def tuned_rates(args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """The learning-rate grid of each task of --tasks: --rates, or the task's own (TUNED_RATES)."""
    return {task: tuple(args.rates or TUNED_RATES[task]) for task in args.tasks}


def tuned_jobs(args: argparse.Namespace, files: dict[str, Path] | None) -> list[Job]:
    """Part "tuned", in priority order, leaving out the runs already in --results_dir: per task (gsm first), the
    seed-0 grid method by method, with the other seeds of every method whose grid is complete ahead of it. `files`:
    split_gsm's (None when no GSM task is asked for)."""
    results = Path(args.results_dir) / "quality_runs.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    done = {(row["task"], row["variant"], row["seed"]) for row in rows}
    rates = tuned_rates(args)
    chosen = chosen_rates(rows, rates)
    jobs = []
    for task in args.tasks:
        later = [(seed, arm) for arm in args.arms if (task, arm) in chosen for seed in SEEDS[1:]]
        runs = [(seed, Variant.parse(arm).at_rate(chosen[(task, arm)])) for seed, arm in later]
        runs += [(0, Variant.parse(arm).at_rate(rate)) for arm in args.arms for rate in rates[task]]
        for seed, variant in runs:
            if (task, variant, seed) in done:
                continue
            argv = ["benchmarks/quality.py", "run", "--task", task, "--variants", variant, "--seeds", str(seed)]
            argv += ["--out", str(results), *task_args(task, args, files=files or {}), "--curve_every"]
            argv += [str(args.curve_every)]
            jobs.append(Job(f"{task}-{variant}-{seed}", task, argv))
    return jobs


def merge_rows(source: Path, target: Path) -> int:
    """Append to `target` the rows of `source` whose (task, variant, seed) it lacks; returns how many."""
    if not source.is_file():
        return 0

    def key(line: str) -> tuple:
        row = json.loads(line)
        return row["task"], row["variant"], row["seed"]

    lines = [line for line in source.read_text().splitlines() if line.strip()]
    have = {key(line) for line in target.read_text().splitlines() if line.strip()} if target.is_file() else set()
    new = [line for line in lines if key(line) not in have]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as f:
        f.writelines(line + "\n" for line in new)
    return len(new)


def contribution_job(task: str, args: argparse.Namespace) -> Job:
    kind = "contribution-gsm" if task.startswith("gsm") else "contribution-encoder"
    argv = ["benchmarks/contribution.py", "run", "--task", task, "--seeds", "0", "--points", str(args.points)]
    argv += ["--out", str(Path(args.out) / "contribution_runs.jsonl"), *task_args(task, args)]
    return Job(f"contribution-{task}", kind, argv)


class Launcher:
    """Runs `jobs` in order, `--jobs` at a time, within the budget. With `pending` the queue is instead re-derived
    from it before every start (part "tuned": what to run next depends on the results so far)."""

    def __init__(self, jobs: list[Job], args: argparse.Namespace, pending=None) -> None:
        self.queue, self.running, self.args, self.pending = list(jobs), [], args, pending
        self.seen: set[str] = set()  # jobs launched or skipped: a re-derived queue never offers them again
        self.minutes: dict[str, list[float]] = {}
        self.start = time.monotonic()
        self.logs = Path(args.work_dir) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.table = Path(args.out) / "jobs.tsv"

    def expected_s(self, job: Job) -> float:
        seen = self.minutes.get(job.kind)
        return 60 * (statistics.median(seen) if seen else FIRST_GUESS_MIN[job.kind] * self.args.guess_scale)

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def launch(self, job: Job) -> None:
        job.log = self.logs / f"{job.name.replace(':', '_').replace('+', '_')}.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(Path(self.args.work_dir) / "hf_datasets" / job.name.replace(":", "_")),
        }
        argv = [sys.executable, *job.argv, "--work_dir", str(Path(self.args.work_dir) / "runs" / job.name)]
        with job.log.open("w") as log:
            job.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        job.started = time.monotonic()
        self.running.append(job)

    def record(self, job: Job, outcome: str) -> None:
        minutes = (time.monotonic() - job.started) / 60
        if outcome == "ok":
            self.minutes.setdefault(job.kind, []).append(minutes)
        with self.table.open("a") as f:
            f.write(f"{job.name}\t{job.kind}\t{outcome}\t{job.started - self.start:.0f}\t{minutes:.2f}\n")
        if outcome != "ok":
            tail = job.log.read_text(errors="replace").splitlines()[-25:]
            with (Path(self.args.out) / "failures.txt").open("a") as f:
                f.write(f"== {job.name}: {outcome}\n" + "\n".join(tail) + "\n")

    def run(self) -> None:
        while self.queue or self.running or self.pending is not None:
            for job in [j for j in self.running if j.process.poll() is not None]:
                self.running.remove(job)
                self.record(job, "ok" if job.process.returncode == 0 else f"exit {job.process.returncode}")
            if self.pending is not None:
                self.queue = [job for job in self.pending() if job.name not in self.seen]
                if not self.queue and not self.running:
                    break
            while self.queue and len(self.running) < self.args.jobs:
                job = self.queue.pop(0)
                self.seen.add(job.name)
                if self.expected_s(job) > self.left_s():
                    self.record_skipped(job)
                    continue
                self.launch(job)
            if self.left_s() <= 0:
                for job in self.running:
                    os.killpg(job.process.pid, signal.SIGKILL)
                    job.process.wait()
                    self.record(job, "stopped at the end of the budget")
                self.running.clear()
                for job in self.queue:
                    self.record_skipped(job)
                self.queue.clear()
                self.pending = None
            time.sleep(1)

    def record_skipped(self, job: Job) -> None:
        with self.table.open("a") as f:
            f.write(f"{job.name}\t{job.kind}\tnot started: expected {self.expected_s(job) / 60:.1f} min\t-\t-\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["1", "2", "front", "tuned"], required=True)
    parser.add_argument(
        "--results_dir", default="/tmp/front", help="part front: where results accumulate from command to command"
    )
    parser.add_argument(
        "--candidates", nargs="+", default=FRONT_CANDIDATES, help="part front: the LoRA-drop settings to decide by"
    )
    parser.add_argument("--out", required=True, help="where the result files go ($OUT on the GPU machine)")
    parser.add_argument("--models", default="/tmp/models", help="minilm/ and smollm2/ (benchmarks/carry_models.py)")
    parser.add_argument("--data", default=".carry/run", help="sarcasm.jsonl, polarity.jsonl, gsm/{train,test}.jsonl")
    parser.add_argument("--work_dir", default="/tmp/gpu_batch")
    parser.add_argument("--budget_s", type=float, default=450, help="stop every job after this many seconds")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes at a time (default: 7 in part 1, 9 in part 2; a SmolLM2 run peaks near 20 GB on an H200, "
        "and 14 of them ran out of its 140 GB)",
    )
    parser.add_argument("--candidate", default="kind", help="scoring that restart/auto/drop/random use")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, 2)")
    parser.add_argument("--encoder_steps", type=int, default=300)
    parser.add_argument("--gsm_steps", type=int, default=120)
    parser.add_argument("--gsm_batch", type=int, default=8)
    parser.add_argument("--gsm_eval", type=int, default=200, help="held-out GSM problems (answer loss, exact match)")
    parser.add_argument("--gsm_new_tokens", type=int, default=160)
    parser.add_argument("--gsm_eval_batch", type=int, default=16, help="gsm: sequences per evaluation batch")
    parser.add_argument("--gsm_val", type=int, default=200, help="part tuned: training problems held out to validate")
    parser.add_argument("--curve_every", type=int, default=25, help="part tuned: validation loss every N steps")
    parser.add_argument("--tasks", nargs="+", default=TUNED_TASKS, help="part tuned: the tasks, in priority order")
    parser.add_argument("--arms", nargs="+", default=TUNED_ARMS, help="part tuned: the methods, in priority order")
    parser.add_argument(
        "--rates",
        nargs="+",
        type=float,
        default=None,
        help="part tuned: the learning-rate grid of every task (default: each task's own, TUNED_RATES)",
    )
    parser.add_argument(
        "--resume_from", default=None, help="part tuned: rows of earlier machines (a JSONL) to merge into the results"
    )
    parser.add_argument("--exact_match_seeds", type=int, default=1, help="gsm: seeds whose runs also generate")
    parser.add_argument("--points", type=int, default=10, help="contribution: removed shares 0, 1/points, ..., 1")
    parser.add_argument("--guess_scale", type=float, default=1.0, help="scales the first guesses of job durations")
    parser.add_argument("--only", nargs="*", default=None, help="run only the jobs whose name contains one of these")
    parser.add_argument("--toy", action="store_true", help="tiny sizes, to test the whole pipeline on a CPU")
    args = parser.parse_args(argv)
    args.jobs = args.jobs or {"1": 7, "2": 9, "front": 12, "tuned": 12}[args.part]
    if args.toy:
        args.encoder_steps, args.gsm_steps, args.gsm_batch, args.gsm_eval, args.gsm_new_tokens = 40, 30, 2, 4, 8
        args.points, args.gsm_val, args.curve_every = 2, 8, 10
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = Path(args.results_dir, "quality_runs.jsonl")
    pending = None
    if args.part == "tuned":
        if args.resume_from:
            print(f"merged {merge_rows(Path(args.resume_from), results)} rows of {args.resume_from}", flush=True)
        files = split_gsm(args) if any(task in GSM_TASKS for task in args.tasks) else None

        def pending() -> list[Job]:
            return [j for j in tuned_jobs(args, files) if args.only is None or any(o in j.name for o in args.only)]

        jobs = pending()
    else:
        jobs = front_jobs(args) if args.part == "front" else jobs_of_part(int(args.part), args)
        jobs = [j for j in jobs if args.only is None or any(o in j.name for o in args.only)]
    Path(args.out, "plan.json").write_text(json.dumps({"args": vars(args), "jobs": [j.name for j in jobs]}, indent=1))
    print(f"part {args.part}: {len(jobs)} jobs, {args.jobs} at a time, budget {args.budget_s:.0f} s", flush=True)
    Launcher(jobs, args, pending).run()
    if args.part in ("front", "tuned") and results.is_file():
        shutil.copy(results, Path(args.out, f"{args.part}_runs.jsonl"))
    print(Path(args.out, "jobs.tsv").read_text(), flush=True)


if __name__ == "__main__":
    main()
