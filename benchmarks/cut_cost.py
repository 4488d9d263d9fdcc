"""What the cut at LoRA-drop's switch costs on held-out data, for each way of choosing and truncating, on the same
weights (issue 29, items 4 and 6).

A run of LoRA-drop and a run of plain LoRA with the same seed are the same run up to the switch, so the switch's
immediate cost can be measured paired: one plain LoRA run per seed (`benchmarks/quality.py`'s GSM task, its rank,
lora_alpha and learning-rate factor) trains to the step where a run with `--alpha` switches (ceil(alpha * steps), with
the learning-rate schedule of the whole run), summing each module's importance and token Gram as `LoraDropCallback`
does (`ImportanceCollector(..., input_grams=True)`). There, on the very same weights, it scores the validation split's
answer loss before the cut and after each cut:

- `importance`: the plan `--plan` makes (default `kind+T0.5+trunc1`: per-kind threshold 0.5, rank 1), its dropped
  modules truncated by SVD (`truncation="svd"`) and by activation-aware truncation (`truncation="activation"`);
- `random<i>`: `--draws` random choices of the same LoRA parameter count (quality.py's `random:`), both truncations;
- `residual`: the plan made from score "residual" of each truncation (what that truncation takes from the output);
- `all`: every module truncated, both truncations (the cost of cutting everything).

Each cut also gets the share of the dropped modules' output energy on the collection's tokens that the truncation
takes away (`lost_energy`, from the Grams). Then training stops: what the run would recover afterwards is the tuned
protocol's (gpu_batch.py `+act` arms). Rows go to --out as JSON lines; `report` writes results/cut_cost.md.

    python benchmarks/cut_cost.py run --task gsm --lr_factor 8 --steps 150 --alpha 0.8 --seeds 0 1 2 \\
        --data_dir .carry/run            # GSM-Symbolic as prepare_carry.py writes it (gsm/train.jsonl)
    python benchmarks/cut_cost.py report

A CPU is far too slow for this (SmolLM2-135M: over two minutes a step on 2 busy cores). On the GPU machine, in a call
after one of benchmarks/tuned_gpu.sh (its wheels in /tmp/site, SmolLM2 in /tmp/models), the three seeds side by side
take a few minutes:

    export PYTHONPATH=/tmp/site:$PWD
    for seed in 0 1 2; do python3 benchmarks/cut_cost.py run --seeds $seed --model /tmp/models/smollm2 \
        --data_dir .carry/run --work_dir /tmp/cut --out "$OUT/cut_cost_runs.jsonl" & done; wait
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
for path in (ROOT, BENCHMARKS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import quality  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from variants import Variant  # noqa: E402

from loradrop_trainer import DropPlan, LoraDropCallback, find_lora_layers, plan_keeping  # noqa: E402
from loradrop_trainer.importance import ImportanceCollector  # noqa: E402
from loradrop_trainer.lora_layers import lora_kinds, lora_parameters  # noqa: E402
from loradrop_trainer.truncate import set_truncated_scaling, truncated_dropped_values  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS_FILE = RESULTS / "cut_cost_runs.jsonl"
REPORT = RESULTS / "cut_cost.md"
TRUNCATIONS = ("svd", "activation")


class CutCost(TrainerCallback):
    """Collects importance and token Grams from the first step; at `switch_step` scores every cut on copies of the
    weights (`cuts`) and stops training.

    Args:
        config: the LoRA-drop settings whose plan is measured (`quality.variant_config`).
        switch_step: the step at whose end the cut is made.
        splits: scores the validation split (`quality.SplitLosses`; not a callback of the run, which would score it
            again at the end).
        draws: how many random choices of the plan's size.
        seed: the run's seed (the random draws are seeded from it).
    """

    def __init__(self, config, switch_step: int, splits: quality.SplitLosses, draws: int, seed: int) -> None:
        self.config, self.switch_step, self.splits = config, switch_step, splits
        self.draws, self.seed = draws, seed
        self.collector: ImportanceCollector | None = None
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.splits.on_train_begin(args, state, control, model=model, **kwargs)  # tokenises the split; no more
        cfg = self.config
        self.layers = find_lora_layers(model, cfg.adapter_name)
        self.collector = ImportanceCollector(
            model, self.layers, cfg.adapter_name, cfg.score_every, "output", cfg.aggregate, input_grams=True
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.switch_step:
            return
        self.collector.remove()
        with torch.no_grad():
            self.rows = self.cuts(model, state.global_step)
        control.should_training_stop = True

    def cuts(self, model, step: int) -> list[dict]:
        """One row per (choice, truncation): the validation loss after the cut, before it, and the lost energy."""
        cfg, layers = self.config, self.layers
        adapter = cfg.adapter_name
        totals, grams = self.collector.totals(), self.collector.input_grams()
        kinds = lora_kinds(layers, adapter)
        sizes = {name: sum(p.numel() for p in lora_parameters(m, adapter)) for name, m in layers.items()}
        ranks = {name: m.r[adapter] for name, m in layers.items()}
        planner = LoraDropCallback(cfg)
        plan = planner.make_plan(totals, kinds, step)
        choices: dict[str, dict[str, DropPlan]] = {}
        residuals: dict[str, dict[str, float]] = {}  # what each truncation takes from each module's output
        for truncation in TRUNCATIONS:
            residual = self.collector.residual_totals(layers, adapter, cfg.dropped_rank, truncation == "activation")
            residuals[truncation] = residual
            choices[truncation] = {
                "importance": plan,
                **{
                    f"random{i}": quality.random_plan_like(plan, totals, sizes, ranks, self.seed * 1000 + i, 1.0)
                    for i in range(self.draws)
                },
                "residual": planner.make_plan(residual, kinds, step),
                "all": plan_keeping(totals, kinds, [], 1.0, mode="truncate", dropped_rank=cfg.dropped_rank),
            }
        before = self.splits.score(model, "val")
        rows = []
        for truncation, plans in choices.items():
            for choice, chosen in plans.items():
                start = time.monotonic()
                after = self._score_cut(model, chosen, grams if truncation == "activation" else None)
                rows.append(
                    {
                        "choice": choice,
                        "truncation": truncation,
                        "kept_fraction": chosen.kept_fraction(sizes, ranks),
                        "kept_modules": len(chosen.kept),
                        "val_loss_before": before,
                        "val_loss_after": after,
                        "lost_energy": lost_energy(chosen, residuals[truncation], totals),
                        "score_s": round(time.monotonic() - start, 1),
                    }
                )
        return rows

    def _score_cut(self, model, plan: DropPlan, grams) -> float:
        """The validation loss with `plan`'s dropped modules truncated (values and scaling as at a real switch);
        the weights and scalings are put back afterwards."""
        adapter = plan.adapter_name
        values = truncated_dropped_values(self.layers, plan, None, "rank", grams)
        saved = [(param, param.detach().clone()) for param, _ in values]
        scalings = {name: self.layers[name].scaling[adapter] for name in plan.dropped}
        try:
            for param, value in values:
                param.data.copy_(value.to(param))
            set_truncated_scaling(self.layers, plan)
            return self.splits.score(model, "val")
        finally:
            for param, value in saved:
                param.data.copy_(value)
            for name, scaling in scalings.items():
                self.layers[name].scaling[adapter] = scaling


def lost_energy(plan: DropPlan, residual: dict[str, float], output: dict[str, float]) -> float:
    """The share of the dropped modules' output energy on the collection's tokens that the truncation removes, from
    each module's truncation residual and output energy (`ImportanceCollector.residual_totals`, `totals`)."""
    lost = math.fsum(residual[name] for name in plan.dropped)
    whole = math.fsum(output[name] for name in plan.dropped)
    return lost / whole if whole > 0 else float("nan")


def cmd_run(args: argparse.Namespace) -> None:
    from gpu_batch import split_gsm

    from recipes import llama2_gsm8k

    files = split_gsm(argparse.Namespace(data=args.data_dir, work_dir=args.work_dir, gsm_val=args.gsm_val))
    config = quality.variant_config(args.plan)
    variant = Variant.parse(f"lora@r{args.r}x{args.lr_factor:g}")
    switch_step = math.ceil(args.alpha * args.steps)
    llama2_gsm8k.export_compact = lambda *_, **__: None  # the run stops at the switch: nothing worth exporting
    for seed in args.seeds:
        task_args = argparse.Namespace(
            data={"gsm_train": str(files["train"]), "gsm_eval": str(files["val"])},
            work_dir=args.work_dir,
            model=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            eval_samples=args.gsm_val,
            exact_match=False,
            max_new_tokens=1,
            eval_batch_size=args.eval_batch_size,
        )
        argv = quality.gsm_argv(args.task, seed, task_args, Path(args.work_dir) / f"cut-{seed}", variant)
        splits = quality.SplitLosses(argv, {"val": str(files["val"])})
        cut = CutCost(config, switch_step, splits, args.draws, seed)
        start = time.monotonic()
        llama2_gsm8k.main([*argv, "--max_eval_samples", "1"], callbacks=[cut])
        common = {
            "task": args.task,
            "variant": variant.name,
            "plan": args.plan,
            "seed": seed,
            "steps": args.steps,
            "switch_step": switch_step,
            "hardware": quality.hardware(),
            "minutes": round((time.monotonic() - start) / 60, 2),
        }
        for row in cut.rows:
            quality.append_line(Path(args.out), {**common, **row})
        print(f"seed {seed}: {len(cut.rows)} cuts in {common['minutes']} min", flush=True)


def summary(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """`{(task, choice family, truncation): mean/sd of the loss added by the cut, lost energy, kept fraction}`, the
    random draws of a seed averaged first (one value per seed)."""
    per_seed: dict[tuple[str, str, str], dict[int, list[dict]]] = {}
    for row in rows:
        family = "random" if row["choice"].startswith("random") else row["choice"]
        per_seed.setdefault((row["task"], family, row["truncation"]), {}).setdefault(row["seed"], []).append(row)
    out = {}
    for key, seeds in per_seed.items():
        added = [statistics.fmean(r["val_loss_after"] - r["val_loss_before"] for r in rs) for rs in seeds.values()]
        lost = [statistics.fmean(r["lost_energy"] for r in rs) for rs in seeds.values()]
        kept = [statistics.fmean(r["kept_fraction"] for r in rs) for rs in seeds.values()]
        before = [rs[0]["val_loss_before"] for rs in seeds.values()]
        out[key] = {
            "seeds": len(seeds),
            "draws": max(len(rs) for rs in seeds.values()),
            "added": (statistics.fmean(added), statistics.stdev(added) if len(added) > 1 else 0.0),
            "lost": statistics.fmean(lost),
            "kept": statistics.fmean(kept),
            "before": statistics.fmean(before),
        }
    return out


def paired_gain(rows: list[dict], task: str, choice: str) -> tuple[float, float, int] | None:
    """Mean and sd over seeds of (loss added by the SVD cut) - (loss added by the activation-aware cut) for one
    choice (random draws paired draw by draw): positive when activation-aware truncation costs less."""
    by = {(r["seed"], r["choice"], r["truncation"]): r["val_loss_after"] for r in rows if r["task"] == task}
    gains: dict[int, list[float]] = {}
    for (seed, name, truncation), after in by.items():
        family = "random" if name.startswith("random") else name
        if family == choice and truncation == "svd" and (seed, name, "activation") in by:
            gains.setdefault(seed, []).append(after - by[(seed, name, "activation")])
    values = [statistics.fmean(v) for v in gains.values()]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def report(rows: list[dict]) -> str:
    lines = [
        "# What the cut at the switch costs (benchmarks/cut_cost.py)",
        "",
        "Validation answer loss added by the cut, on the same weights (one plain LoRA run per seed, stopped at the "
        "switch step); mean ± sd over seeds, random draws of a seed averaged first. `lost energy`: the share of the "
        "dropped modules' output energy on the collection's tokens that the truncation removes. Paired gain: SVD's "
        "added loss minus activation-aware truncation's, same weights and same choice (positive: activation-aware "
        "costs less).",
        "",
    ]
    table = summary(rows)
    for task in sorted({key[0] for key in table}):
        example = next(r for r in rows if r["task"] == task)
        lines += [
            f"## {task}: {example['variant']}, {example['steps']} steps, cut at step {example['switch_step']}, plan "
            f"`{example['plan']}` ({example['hardware']})",
            "",
            "| choice | truncation | seeds | LoRA params kept | loss before | added by the cut | lost energy |",
            "|---|---|---|---|---|---|---|",
        ]
        for (t, family, truncation), s in sorted(table.items()):
            if t != task:
                continue
            draws = f" ({s['draws']} draws)" if family == "random" else ""
            lines.append(
                f"| {family}{draws} | {truncation} | {s['seeds']} | {s['kept']:.1%} | {s['before']:.3f} | "
                f"{s['added'][0]:+.3f} ± {s['added'][1]:.3f} | {s['lost']:.1%} |"
            )
        lines.append("")
        for family in ("importance", "random", "residual", "all"):
            gain = paired_gain(rows, task, family)
            if gain is not None:
                mean, sd, seeds = gain
                lines.append(f"- {family}: paired gain of activation-aware truncation {mean:+.4f} ± {sd:.4f} ({seeds})")
        lines.append("")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line.strip()]
    Path(args.results).write_text(report(rows) + "\n")
    print(Path(args.results).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train to the switch per seed and score every cut; one JSON line per cut")
    run.add_argument("--task", choices=["gsm", "gsm_qv"], default="gsm")
    run.add_argument("--plan", default="kind+T0.5+trunc1", help="quality.py variant whose plan is cut")
    run.add_argument("--r", type=int, default=8, help="the plain LoRA run's rank")
    run.add_argument("--lr_factor", type=float, default=8.0, help="factor on the task's learning rate (5e-4)")
    run.add_argument("--steps", type=int, default=150, help="the whole run's steps (the schedule's length)")
    run.add_argument("--alpha", type=float, default=0.8, help="the switch: the end of step ceil(alpha * steps)")
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--draws", type=int, default=3, help="random choices of the plan's size per seed")
    run.add_argument("--data_dir", required=True, help="holds gsm/train.jsonl (prepare_carry.py's run files)")
    run.add_argument("--gsm_val", type=int, default=200, help="training problems held out to validate on")
    run.add_argument("--model", default=None, help="local SmolLM2-135M-Instruct (default: recipes.assets')")
    run.add_argument("--batch_size", type=int, default=8)
    run.add_argument("--eval_batch_size", type=int, default=16)
    run.add_argument("--work_dir", default="out/cut_cost")
    run.add_argument("--out", default=str(RUNS_FILE))
    rep = sub.add_parser("report", help="results/cut_cost.md from the rows")
    rep.add_argument("--runs", default=str(RUNS_FILE))
    rep.add_argument("--results", default=str(REPORT))
    args = parser.parse_args(argv)
    {"run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
