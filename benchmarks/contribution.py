"""Does importance predict contribution? And how early is the ranking settled?

One plain LoRA run per task and seed (the tasks of benchmarks/quality.py), with every scoring of LoraDropConfig
(`score` x `aggregate`) collected side by side over the whole run, then:

1. Contribution: the LoRA modules of the trained adapter are switched off (their scaling set to 0) in ascending
   order of the importance each scoring measured during the first `alpha` (0.1) of the steps, and in 5 random
   orders; the held-out loss (and accuracy, for the encoders) is measured as the removed share of the LoRA
   parameters grows. If importance predicts contribution, its curve stays below the random ones.
2. Stability: Kendall's tau between each scoring's importance at alpha = 2, 5, 10, 20% of the steps and at the end
   of the run; and the step at which alpha="auto" would switch, replayed on the importance at the end of every
   scoring window for a few (auto_min_tau, auto_min_overlap) settings.

Every run appends one JSON line to --out as soon as it ends; `report` draws the curves and writes the tables:

    python benchmarks/contribution.py run --task sarcasm --seeds 0
    python benchmarks/contribution.py run --task gsm --seeds 0 --steps 300 --batch_size 8 --eval_samples 200
    python benchmarks/contribution.py report --runs benchmarks/results/contribution_runs.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import Trainer, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import (  # noqa: E402
    GSM_TARGETS,
    TASKS,
    add_task_arguments,
    append_line,
    encoder_argv,
    gsm_argv,
    hardware,
)

from loradrop_trainer import LoraDropConfig, build_plan, find_lora_layers, lora_kinds  # noqa: E402
from loradrop_trainer.importance import ImportanceCollector  # noqa: E402
from loradrop_trainer.lora_layers import lora_parameters  # noqa: E402
from loradrop_trainer.plan import NoImportanceError  # noqa: E402
from loradrop_trainer.stability import StabilityTracker, kendall_tau  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "contribution_runs.jsonl"
SCORINGS = {  # name -> (score, aggregate)
    "output": ("output", "sum"),
    "relative": ("relative", "sum"),
    "rank": ("output", "rank"),
    "relative+rank": ("relative", "rank"),
}
ALPHAS = (0.02, 0.05, 0.1, 0.2)
AUTO_SETTINGS = [(tau, overlap) for tau in (0.8, 0.9, 0.95) for overlap in (0.9, 0.95, 1.0)]
RANDOM_ORDERS = 5


class ImportanceTrace(TrainerCallback):
    """Collects every scoring during a plain LoRA run and keeps its totals at the steps `snapshot_steps` names."""

    def __init__(self, snapshot_steps: set[int]) -> None:
        self.snapshot_steps = snapshot_steps
        self.snapshots: dict[str, dict[int, dict[str, float]]] = {name: {} for name in SCORINGS}
        self.kinds: dict[str, str] = {}
        self._collectors: dict[str, ImportanceCollector] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = find_lora_layers(model)
        self.kinds = lora_kinds(layers)
        self._collectors = {
            name: ImportanceCollector(model, layers, score=score, aggregate=aggregate)
            for name, (score, aggregate) in SCORINGS.items()
        }

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.snapshot_steps:
            for name, collector in self._collectors.items():
                self.snapshots[name][state.global_step] = collector.totals()

    def on_train_end(self, args, state, control, **kwargs):
        for collector in self._collectors.values():
            collector.remove()


@contextmanager
def switched_off(layers: dict, names: list[str]):
    """The LoRA of `names` contributes nothing (scaling 0) inside the block."""
    saved = {name: layers[name].scaling["default"] for name in names}
    for name in names:
        layers[name].scaling["default"] = 0.0
    try:
        yield
    finally:
        for name, value in saved.items():
            layers[name].scaling["default"] = value


def removal_curve(order: list[str], sizes: dict[str, int], fractions: list[float], evaluate) -> list[dict]:
    """Held-out metrics with the longest prefix of `order` holding at most each fraction of the LoRA parameters off."""
    total = sum(sizes.values())
    cumulative = [0]
    for name in order:
        cumulative.append(cumulative[-1] + sizes[name])
    points = []
    for fraction in fractions:
        count = max(i for i, c in enumerate(cumulative) if c <= fraction * total + 0.5)
        points.append({"removed": cumulative[count] / total, "modules": count, **evaluate(order[:count])})
    return points


def auto_switch_steps(snapshots: dict[int, dict[str, float]], kinds: dict[str, str], window: int) -> dict[str, int]:
    """The step at which alpha="auto" would switch (None: not within the run), for each (tau, overlap) setting."""
    defaults = LoraDropConfig()
    steps = sorted(step for step in snapshots if step % window == 0)
    out = {}
    for tau, overlap in AUTO_SETTINGS:
        tracker = StabilityTracker(defaults.auto_patience, tau, overlap)
        out[f"tau{tau}_overlap{overlap}"] = None
        for step in steps:
            try:
                kept = build_plan(snapshots[step], kinds, defaults.threshold).kept
            except NoImportanceError:
                kept = None
            if tracker.update(step, snapshots[step], kept):
                out[f"tau{tau}_overlap{overlap}"] = step
                break
    return out


def train_task(task: str, seed: int, args: argparse.Namespace, trace: ImportanceTrace):
    """Train plain LoRA on `task` with `trace` attached; return the model and a function of held-out metrics."""
    output_dir = Path(args.work_dir) / f"contribution-{task}-{seed}"
    if task not in GSM_TARGETS:
        from recipes import quickstart

        trainer, _ = quickstart.train(quickstart.parse_args(encoder_argv(task, seed, args, output_dir)), trace)

        def evaluate() -> dict:
            metrics = trainer.evaluate()
            return {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]}

        return trainer.model, evaluate

    from transformers import set_seed

    from recipes import llama2_gsm8k as recipe
    from recipes.gsm8k_data import training_collator

    cfg = recipe.parse_args(gsm_argv(task, seed, args, output_dir))
    training_args = recipe.training_arguments(cfg)
    set_seed(cfg.seed)
    base, tokenizer = recipe.load_model_and_tokenizer(cfg)
    model = recipe.add_lora(base, cfg)
    train_rows, eval_rows = recipe.load_gsm8k(cfg)
    train_tokens = recipe.tokenize_split(train_rows, tokenizer, cfg, True, "training")
    eval_features = recipe.tokenize_split(eval_rows, tokenizer, cfg, True, "evaluation").to_list()
    Trainer(
        model=model,
        args=training_args,
        train_dataset=train_tokens,
        data_collator=training_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=[trace],
    ).train()

    def evaluate() -> dict:
        loss, tokens = recipe.answer_loss_sums(model, eval_features, tokenizer, 32)
        return {"loss": loss / tokens}

    return model, evaluate


def run_one(task: str, seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    max_steps = args.steps or 300
    window = LoraDropConfig().window_steps(max_steps)
    alpha_steps = {alpha: math.ceil(alpha * max_steps) for alpha in ALPHAS}
    trace = ImportanceTrace({*range(window, max_steps + 1, window), *alpha_steps.values(), max_steps})
    model, evaluate = train_task(task, seed, args, trace)
    layers = find_lora_layers(model)
    sizes = {name: sum(p.numel() for p in lora_parameters(layer, "default")) for name, layer in layers.items()}

    measured: dict[frozenset, dict] = {}

    def evaluate_without(names: list[str]) -> dict:
        key = frozenset(names)
        if key not in measured:
            with switched_off(layers, names):
                measured[key] = evaluate()
        return measured[key]

    at_alpha = {name: snaps[alpha_steps[0.1]] for name, snaps in trace.snapshots.items()}
    orders = {
        f"importance:{name}": sorted(layers, key=lambda n, imp=imp: (imp[n], n)) for name, imp in at_alpha.items()
    }
    for k in range(RANDOM_ORDERS):
        orders[f"random:{k}"] = random.Random(1000 + k).sample(sorted(layers), len(layers))
    fractions = [i / args.points for i in range(args.points + 1)]
    curves = {name: removal_curve(order, sizes, fractions, evaluate_without) for name, order in orders.items()}
    names = list(layers)
    final = {name: snaps[max_steps] for name, snaps in trace.snapshots.items()}
    return {
        "task": task,
        "seed": seed,
        "steps": max_steps,
        "hardware": hardware(),
        "lora": evaluate_without([]),
        "curves": curves,
        "tau_to_end": {
            scoring: {
                str(alpha): kendall_tau([snaps[step][n] for n in names], [final[scoring][n] for n in names])
                for alpha, step in alpha_steps.items()
            }
            for scoring, snaps in trace.snapshots.items()
        },
        "auto_switch": {
            scoring: auto_switch_steps(snaps, trace.kinds, window) for scoring, snaps in trace.snapshots.items()
        },
        "window": window,
        "importance_at_alpha": at_alpha,
        "sizes": sizes,
        "wall_minutes": round((time.perf_counter() - start) / 60, 3),
    }


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        row = run_one(args.task, seed, args)
        append_line(out, row)
        print(json.dumps({k: row[k] for k in ("task", "seed", "lora", "tau_to_end", "wall_minutes")}), flush=True)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    colours = {"importance:output": "tab:red", "importance:relative": "tab:blue"}
    colours |= {"importance:rank": "tab:orange", "importance:relative+rank": "tab:green"}
    for ax, task in zip(axes[0], tasks):
        row = next(r for r in rows if r["task"] == task)  # the first seed of each task
        for name, points in row["curves"].items():
            xs, ys = [p["removed"] for p in points], [p["loss"] for p in points]
            if name.startswith("random:"):
                ax.plot(xs, ys, color="tab:gray", alpha=0.6, lw=1, label="random order" if name == "random:0" else None)
            else:
                ax.plot(xs, ys, color=colours.get(name), lw=2, marker="o", ms=3, label=name.split(":", 1)[1])
        ax.set_title(f"{task} (seed {row['seed']})")
        ax.set_xlabel("share of LoRA parameters switched off")
        ax.set_ylabel("held-out answer loss" if task in GSM_TARGETS else "held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "LoRA modules switched off: ascending importance\n(measured over the first 10% of the steps) vs random order"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| task | seed | scoring | " + " | ".join(f"tau α={a:.0%}→end" for a in ALPHAS) + " | auto (0.9, 0.95) |"]
    lines.append("|---|---|---|" + "---|" * (len(ALPHAS) + 1))
    for row in sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["seed"])):
        for scoring, taus in row["tau_to_end"].items():
            cells = " | ".join(f"{taus[str(a)]:.2f}" for a in ALPHAS)
            step = row["auto_switch"][scoring]["tau0.9_overlap0.95"]
            auto = f"step {step} ({step / row['steps']:.0%})" if step else "not within the run"
            lines.append(f"| {row['task']} | {row['seed']} | {scoring} | {cells} | {auto} |")
    lines.append("")
    lines.append("Area between the random orders' mean loss and each importance order's loss, over the removed share:")
    lines.append("")
    lines.append("| task | seed | " + " | ".join(SCORINGS) + " | random orders' spread |")
    lines.append("|---|---|" + "---|" * (len(SCORINGS) + 1))
    for row in sorted(rows, key=lambda r: (TASKS.index(r["task"]), r["seed"])):
        random_areas = [_area(points) for name, points in row["curves"].items() if name.startswith("random:")]
        mean = statistics.mean(random_areas)
        gains = " | ".join(f"{mean - _area(row['curves'][f'importance:{s}']):+.4f}" for s in SCORINGS)
        lines.append(f"| {row['task']} | {row['seed']} | {gains} | ± {statistics.pstdev(random_areas):.4f} |")
    lines.append("")
    lines.append("Positive: switching the least important modules off first hurts less than a random order does.")
    return "\n".join(lines)


def _area(points: list[dict]) -> float:
    """Trapezoid area under loss over the removed share."""
    return sum((b["removed"] - a["removed"]) * (a["loss"] + b["loss"]) / 2 for a, b in itertools.pairwise(points))


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, results / "contribution.png")
    table = markdown(rows)
    (results / "contribution.md").write_text(table + "\n")
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train plain LoRA, measure contribution and stability; append one JSON line")
    run.add_argument("--task", choices=TASKS, default="sarcasm")
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--points", type=int, default=10, help="removed shares measured: 0, 1/points, ..., 1")
    add_task_arguments(run)
    run.add_argument("--out", default=str(RUNS_FILE))
    report = sub.add_parser("report", help="draw the curves and write the tables into benchmarks/results/")
    report.add_argument("--runs", default=str(RUNS_FILE))
    report.add_argument("--results", default=str(RESULTS), help="where contribution.png and contribution.md go")
    args = parser.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
