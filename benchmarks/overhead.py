"""Step time (and GPU memory) of plain LoRA vs LoRA-drop, measured side by side in one process.

Three identical copies of a Llama-architecture model (random weights) train on the same batch, interleaved so that
machine noise hits them alike:

- `lora`: plain PEFT LoRA, the baseline;
- `collect`: the same with LoRA-drop's importance hooks installed (the first `alpha` of a run);
- `tied`: after the switch, with the plan of a real collection applied (half of each kind, by default, shares one
  LoRA; `--threshold` sets it from the collected importance instead).

Each ratio is the median over rounds of a variant's step time divided by `lora`'s in the same round, which cancels
slow drifts of a shared machine. The whole-run ratio is `alpha * collect + (1 - alpha) * tied`.

    python benchmarks/overhead.py --preset cpu-40m                                   # CPU, ~40M parameters
    python benchmarks/overhead.py --preset llama2-7b --targets all --device cuda    # H200, Llama-2-7B width
    python benchmarks/overhead.py --preset llama2-7b --targets all --score relative --aggregate rank
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loradrop_trainer import DropPlan, apply_plan, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.importance import AGGREGATES, SCORES, ImportanceCollector

PRESETS = {
    "cpu-40m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}
ALL_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_KINDS}


def build(preset: str, targets: str, device: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **PRESETS[preset])
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[targets], lora_dropout=0.05))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_steps(model, optimizer, batch, steps: int, autocast) -> None:
    for _ in range(steps):
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def collected_plan(model, collector: ImportanceCollector, threshold: float | None) -> DropPlan:
    """The plan of the collected importance: at `threshold`, or keeping the top half of each kind."""
    kinds = lora_kinds(find_lora_layers(model))
    importance = collector.totals()
    if threshold is not None:
        return build_plan(importance, kinds, threshold)
    total = sum(importance.values())
    kept, shared = [], {}
    for kind in dict.fromkeys(kinds.values()):
        members = sorted((n for n in kinds if kinds[n] == kind), key=lambda n: -importance[n])
        kept += members[: len(members) // 2]
        shared[kind] = members[len(members) // 2 :]
    return DropPlan({n: v / total for n, v in importance.items()}, kept, shared, kinds, threshold=0.5)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-40m")
    parser.add_argument("--targets", choices=TARGETS, default="qv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 512 on GPU, 128 on CPU)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--out", default="benchmarks/results/overhead")
    parser.add_argument("--score_every", type=int, default=1, help="LoraDropConfig.score_every for the hooks")
    parser.add_argument("--score", choices=SCORES, default="output", help="LoraDropConfig.score for the hooks")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="sum", help="LoraDropConfig.aggregate")
    parser.add_argument("--profile", action="store_true", help="print a profile of one step with the hooks on")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    seq = args.seq or (512 if cuda else 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext

    plain, plain_opt = build(args.preset, args.targets, args.device, dtype)
    hooked, hooked_opt = build(args.preset, args.targets, args.device, dtype)
    tied, tied_opt = build(args.preset, args.targets, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32000, (args.batch, seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for model in (plain, hooked, tied):
        model.train()
    # Installed once, as in a real run: building the collector (and its index tensors, on the first forward) is
    # set-up, not per-step cost.
    collecting = ImportanceCollector(
        hooked, find_lora_layers(hooked), score_every=args.score_every, score=args.score, aggregate=args.aggregate
    )

    collector = ImportanceCollector(tied, find_lora_layers(tied))
    train_steps(tied, tied_opt, batch, 2, autocast)
    plan = collected_plan(tied, collector, args.threshold)
    collector.remove()
    apply_plan(find_lora_layers(tied), plan)

    variants = {
        "lora": lambda: train_steps(plain, plain_opt, batch, args.steps, autocast),
        "collect": lambda: train_steps(hooked, hooked_opt, batch, args.steps, autocast),
        "tied": lambda: train_steps(tied, tied_opt, batch, args.steps, autocast),
    }
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    peak: dict[str, int] = {}
    for _ in range(args.reps):
        for name, run in variants.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append((time.perf_counter() - start) / args.steps)

    median = {name: statistics.median(t) for name, t in times.items()}
    paired = {name: [t / base for t, base in zip(times[name], times["lora"])] for name in variants}
    ratios = {name: statistics.median(paired[name]) for name in variants}
    result = {
        "preset": args.preset,
        "targets": args.targets,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": [args.batch, seq],
        "lora_modules": len(plan.kinds),
        "kept_modules": len(plan.kept),
        "step_seconds": median,
        "ratio_collect": ratios["collect"],
        "ratio_tied": ratios["tied"],
        "ratio_whole_run": args.alpha * ratios["collect"] + (1 - args.alpha) * ratios["tied"],
        "alpha": args.alpha,
        "score_every": args.score_every,
        "score": args.score,
        "aggregate": args.aggregate,
        "paired_ratio_quartiles": {name: statistics.quantiles(r, n=4) for name, r in paired.items() if name != "lora"},
        "scored_modules": sum(total > 0 for total in collecting.totals().values()),
    }
    if cuda:
        result["peak_gib"] = {name: value / 2**30 for name, value in peak.items()}
    if args.profile:
        with torch.profiler.profile() as prof:
            train_steps(hooked, hooked_opt, batch, 1, autocast)
            if cuda:
                torch.cuda.synchronize()
        for key in ("self_cpu_time_total", "self_device_time_total") if cuda else ("self_cpu_time_total",):
            print(prof.key_averages().table(sort_by=key, row_limit=20))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_every{args.score_every}" if args.score_every > 1 else ""
    suffix += f"_{args.score}" if args.score != "output" else ""
    suffix += f"_{args.aggregate}" if args.aggregate != "sum" else ""
    (out / f"overhead_{args.preset}_{args.targets}_{args.device.split(':')[0]}{suffix}.json").write_text(
        json.dumps(result, indent=2)
    )
    print(
        f"{args.preset} {args.targets} ({len(plan.kinds)} LoRA modules, {len(plan.kept)} kept) on {result['device']}: "
        f"collect {ratios['collect']:.3f}x, after switch {ratios['tied']:.3f}x, "
        f"whole run (alpha={args.alpha}) {result['ratio_whole_run']:.3f}x of plain LoRA step time"
    )
    return result


if __name__ == "__main__":
    main()
