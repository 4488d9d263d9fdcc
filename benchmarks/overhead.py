"""Step time (and GPU memory) of plain LoRA vs LoRA-drop, measured side by side in one process, with a 95% interval.

Copies of a Llama-architecture model (random weights) train on the same batch, one optimizer step each in turn, round
after round, so that machine noise hits them alike:

- `lora`: plain PEFT LoRA, the baseline;
- `collect`: the very same model with LoRA-drop's importance hooks attached for its step (the first `alpha` of a run),
  at the default scoring; `collect_rank` with `aggregate="rank"`, `collect_relative` with `score="relative"`;
  `collect_prehooks`, the default scoring as first written, with a forward pre-hook on every `lora_B` where the
  library now wraps its `forward` (what the wrappers save). Being the same model as `lora` (the hooks come and go
  between steps), these differ from it by the hooks alone;
- `lora_twin`: a second, identical plain-LoRA model: how far two copies of one model differ (their memory layout),
  the floor for the variants below, which are other copies;
- `truncate`: after the switch at the default settings (`LoraDropConfig()`: in each kind the modules holding half its
  collected importance keep rank r, the others are cut to rank 1), the plan of a real collection;
- `share`: after the switch in the paper's mode (one LoRA per kind for the dropped modules, threshold 0.9 global).

Each variant's step is timed on the GPU with CUDA events (from an empty queue: the stream is synchronised before
each step, so a variant's host-side cost shows whenever it delays the GPU), and the order of the variants rotates
from round to round. A variant's figure is the geometric mean over rounds of its step time divided by `lora`'s in
the same round, with the 95% interval of that mean (normal approximation of the mean log-ratio), and the median
ratio with its distribution-free 95% interval (order statistics); warm-up rounds are discarded, rounds run until
`--seconds` have passed, and the process runs pinned to `--cpus` cores with the garbage collector held off while
timing. Each variant also gets its extra time over `lora` in the same round: the median difference, with its
distribution-free 95% interval. The whole-run ratio is `alpha * collect + (1 - alpha) * truncate`.

The preset `llama2-7b-host` is Llama-2-7B's 32 layers and 224 LoRA modules at a width of 128: the same Python and
the same kernel launches at next to no GPU work, so its step is the host's alone, and its extra milliseconds are what
the hooks cost the host of a 7B step.

    python benchmarks/overhead.py --preset cpu-40m --seconds 60                      # CPU, ~40M parameters
    python benchmarks/overhead.py --preset llama2-7b --targets all --seconds 240    # H200, Llama-2-7B width
    python benchmarks/overhead.py --preset llama2-7b --targets qv --seconds 120
    python benchmarks/overhead.py --preset llama2-7b --batch 8 --seq 1024 --seconds 400    # a GPU-bound step
    python benchmarks/overhead.py --preset llama2-7b-host --variants lora,collect,collect_prehooks --seconds 60
    python benchmarks/overhead.py summarise benchmarks/results/overhead/h200_pinned/*.json   # the README's table

`summarise` pools the rounds of runs of the same model, batch and design (each file's own paired rounds) and prints
one Markdown row per variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loradrop_trainer import LoraDropConfig, build_plan, find_lora_layers, lora_kinds
from loradrop_trainer.importance import ImportanceCollector
from loradrop_trainer.reparam import reparameterise

PRESETS = {
    "cpu-40m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-7b-host": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=32, num_attention_heads=32),
}
ALL_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_KINDS}
VARIANTS = ("lora", "collect", "collect_rank", "collect_relative", "collect_prehooks", "lora_twin", "truncate", "share")


class PreHookCollector(ImportanceCollector):
    """The collector as first written: a forward pre-hook on each `lora_B` passes its input on. A module with a hook
    runs through `nn.Module`'s slow call path; the library now wraps `lora_B.forward` instead."""

    def _record_inputs(self) -> None:
        self._handles += [b.register_forward_pre_hook(self._pre_hook(i)) for i, b in enumerate(self._lora_b)]

    def _pre_hook(self, index: int) -> Callable:
        def record(module: torch.nn.Module, args: tuple) -> None:
            if self._active:
                self._inputs.append((index, args[0], None))

        return record


# The collector of each collecting variant and its settings (hooks on the `lora` model itself).
COLLECTING = {
    "collect": (ImportanceCollector, {}),
    "collect_rank": (ImportanceCollector, {"aggregate": "rank"}),
    "collect_relative": (ImportanceCollector, {"score": "relative"}),
    "collect_prehooks": (PreHookCollector, {}),
}
# The plan settings of each variant after the switch: the library's defaults, and the paper's sharing.
DEFAULTS = LoraDropConfig()
SWITCHED = {
    "truncate": dict(
        threshold=DEFAULTS.threshold,
        normalize=DEFAULTS.normalize,
        mode=DEFAULTS.mode,
        dropped_rank=DEFAULTS.dropped_rank,
    ),
    "share": dict(threshold=0.9, normalize="global", mode="share"),
}
Z95 = 1.959963984540054


def build(preset: str, targets: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama with PEFT LoRA (r=8) and B drawn non-zero, as after some training, and its AdamW."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **PRESETS[preset])
    with torch.device(device):
        base = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[targets], lora_dropout=0.05))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    return model, optimizer


def train_steps(model, optimizer, batch, steps: int, autocast) -> None:
    for _ in range(steps):
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def switch(model, optimizer, batch, autocast, settings: dict) -> tuple[int, int]:
    """Collect importance for two steps, then re-parameterise `model` in place as the callback does at the switch.
    Returns (kept modules, all modules)."""
    layers = find_lora_layers(model)
    collector = ImportanceCollector(model, layers)
    train_steps(model, optimizer, batch, 2, autocast)
    plan = build_plan(collector.totals(), lora_kinds(layers), **settings)
    collector.remove()
    reparameterise(layers, plan, optimizer, at_switch=True)
    return len(plan.kept), len(plan.kinds)


def interval(log_ratios: list[float]) -> dict:
    """Geometric mean of the ratios with its 95% interval (normal approximation of the mean of the logs), and the
    median ratio with its distribution-free 95% interval."""
    n = len(log_ratios)
    mean = statistics.fmean(log_ratios)
    half = Z95 * statistics.stdev(log_ratios) / math.sqrt(n)
    median, median_ci95 = median_interval(log_ratios)
    return {
        "ratio": math.exp(mean),
        "ci95": [math.exp(mean - half), math.exp(mean + half)],
        "ci95_width": math.exp(mean + half) - math.exp(mean - half),
        "median": math.exp(median),
        "median_ci95": [math.exp(bound) for bound in median_ci95],
        "rounds": n,
    }


def compare(seconds: list[float], baseline: list[float]) -> dict:
    """A variant's step times against plain LoRA's of the same rounds: the ratio (`interval`), and the extra time in
    milliseconds, the median difference with its distribution-free 95% interval."""
    result = interval([math.log(t / base) for t, base in zip(seconds, baseline)])
    median, bounds = median_interval([t - base for t, base in zip(seconds, baseline)])
    result["extra_ms_median"], result["extra_ms_ci95"] = 1e3 * median, [1e3 * bound for bound in bounds]
    return result


def median_interval(values: list[float]) -> tuple[float, list[float]]:
    """The median and its distribution-free 95% interval (the order statistics around the middle)."""
    n = len(values)
    ordered = sorted(values)
    spread = math.ceil(Z95 * math.sqrt(n) / 2)
    low, high = max(n // 2 - spread, 0), min((n + 1) // 2 + spread, n - 1)
    return statistics.median(values), [ordered[low], ordered[high]]


class Timer:
    """One step's duration on the device: CUDA events on a GPU (read after the round), the wall clock on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._pending: list[tuple[str, object, object]] = []

    def time(self, name: str, run: Callable[[], None]) -> float:
        """Run `run` from an empty queue; return the host time it took to issue its work (seconds)."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            began = time.perf_counter()
            run()
            issued = time.perf_counter() - began
            end.record()
            self._pending.append((name, start, end))
            return issued
        began = time.perf_counter()
        run()
        issued = time.perf_counter() - began
        self._pending.append((name, began, began + issued))
        return issued

    def read(self) -> dict[str, float]:
        """The durations (seconds) of the steps timed since the last read."""
        if self.cuda:
            torch.cuda.synchronize()
            out = {name: start.elapsed_time(end) / 1000 for name, start, end in self._pending}
        else:
            out = {name: end - start for name, start, end in self._pending}
        self._pending.clear()
        return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-40m")
    parser.add_argument("--targets", choices=TARGETS, default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 512 on GPU, 128 on CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--seconds", type=float, default=120.0, help="time the rounds for this long")
    parser.add_argument("--warmup", type=int, default=5, help="rounds discarded at the start")
    parser.add_argument("--cpus", type=int, default=4, help="pin the process to this many cores (0: leave as is)")
    parser.add_argument("--alpha", type=float, default=DEFAULTS.alpha)
    parser.add_argument("--out", default="benchmarks/results/overhead")
    parser.add_argument("--profile", action="store_true", help="profile 5 steps of `lora` and each collecting variant")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "lora" or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants must start with lora and name only {VARIANTS}")
    if args.cpus and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))[: args.cpus]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    cuda = args.device.startswith("cuda")
    seq = args.seq or (512 if cuda else 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32000, (args.batch, seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    models, plans, collectors = {}, {}, {}
    for name in variants:
        if name in COLLECTING:  # installed once, as in a real run: building the collector is set-up, not step cost
            model = models["lora"][0]
            collector, settings = COLLECTING[name]
            collectors[name] = collector(model, find_lora_layers(model), **settings)
            collectors[name].remove()  # attached only for its own steps
            continue
        models[name] = build(args.preset, args.targets, args.device, dtype)
        if name in SWITCHED:
            plans[name] = switch(*models[name], batch, autocast, SWITCHED[name])

    def step(name: str) -> Callable[[], None]:
        model, optimizer = models.get(name) or models["lora"]
        return lambda: train_steps(model, optimizer, batch, 1, autocast)

    runs = {name: step(name) for name in variants}
    timer = Timer(cuda)
    durations: dict[str, list[float]] = {name: [] for name in variants}
    issued: dict[str, list[float]] = {name: [] for name in variants}
    peak: dict[str, int] = {}
    gc.collect()
    gc.freeze()
    started, rounds = time.perf_counter(), 0
    while rounds < args.warmup + 3 or time.perf_counter() - started < args.seconds:
        order = variants[rounds % len(variants) :] + variants[: rounds % len(variants)]
        gc.disable()
        for name in order:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if name in collectors:
                collectors[name].attach()
            host = timer.time(name, runs[name])
            if name in collectors:
                collectors[name].remove()
            if cuda:
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
            if rounds >= args.warmup:
                issued[name].append(host)
        measured = timer.read()
        gc.enable()
        if rounds >= args.warmup:
            for name in variants:
                durations[name].append(measured[name])
        rounds += 1

    ratios = {name: compare(durations[name], durations["lora"]) for name in variants[1:]}
    result = {
        "preset": args.preset,
        "targets": args.targets,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": [args.batch, seq],
        "lora_modules": len(find_lora_layers(models["lora"][0])),
        "plans": {name: {"kept": kept, "modules": total} for name, (kept, total) in plans.items()},
        "switched_settings": {name: SWITCHED[name] for name in plans},
        "timing": "CUDA events from an empty queue" if cuda else "wall clock",
        "warmup_rounds": args.warmup,
        "step_seconds_median": {name: statistics.median(t) for name, t in durations.items()},
        "step_seconds": durations,
        "host_issue_seconds_median": {name: statistics.median(t) for name, t in issued.items()},
        "ratios": ratios,
        "alpha": args.alpha,
        "scored_modules": {name: sum(v > 0 for v in c.totals().values()) for name, c in collectors.items()},
    }
    if "collect" in ratios and "truncate" in ratios:
        result["ratio_whole_run"] = (
            args.alpha * ratios["collect"]["ratio"] + (1 - args.alpha) * ratios["truncate"]["ratio"]
        )
    if cuda:
        result["peak_gib"] = {name: value / 2**30 for name, value in peak.items()}
    if args.profile:
        result["profile_ms_per_step"] = profile(runs, collectors, cuda, steps=5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overhead_{args.preset}_{args.targets}_{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{args.preset} {args.targets} on {result['device']}, {len(durations['lora'])} rounds:")
    for name, r in ratios.items():
        (low, high), (m_low, m_high), (e_low, e_high) = r["ci95"], r["median_ci95"], r["extra_ms_ci95"]
        print(
            f"  {name:<17} {r['ratio']:.4f}x of plain LoRA's step time (95% interval {low:.4f}-{high:.4f}); "
            f"median {r['median']:.4f}x ({m_low:.4f}-{m_high:.4f}); "
            f"{r['extra_ms_median']:+.2f} ms ({e_low:+.2f} to {e_high:+.2f})"
        )
    return result


def profile(runs: dict[str, Callable[[], None]], collectors: dict, cuda: bool, steps: int) -> dict:
    """torch.profiler over `steps` steps of `lora` and of each collecting variant: prints the collecting variants'
    busiest operators, and returns each one's host (self CPU) and device time per step, in milliseconds."""
    totals = {}
    for name, run in runs.items():
        if name != "lora" and name not in collectors:
            continue
        if name in collectors:
            collectors[name].attach()
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                run()
            if cuda:
                torch.cuda.synchronize()
        if name in collectors:
            collectors[name].remove()
        events = prof.key_averages()
        host = sum(event.self_cpu_time_total for event in events) / steps / 1e3
        kernels = [event for event in events if event.device_type != torch.autograd.DeviceType.CPU]
        device = sum(event.self_device_time_total for event in kernels) / steps / 1e3  # as the table's total
        totals[name] = {"host": host, "device": device}
        if name != "lora":
            print(f"--- {name}, {steps} steps")
            print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    for name, t in totals.items():
        print(f"  profiled {name:<17} host {t['host']:.1f} ms, device {t['device']:.1f} ms per step")
    return totals


def summarise(paths: list[str]) -> list[str]:
    """Markdown rows of the ratios of `paths` (JSON results of `main`), the rounds of runs of one set-up pooled.

    A file without its rounds (`step_seconds`: the first version of this script, which timed the collecting variants
    on models of their own) gives its own ratios."""
    pooled: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
    reported: dict[tuple, dict[str, dict]] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        durations = result.get("step_seconds")
        design = "same model" if durations else "separate models"
        setup = (result["preset"], result["lora_modules"], tuple(result["batch"]), result["device"], design)
        if not durations:
            reported[setup] = result["ratios"]
            continue
        for name, seconds in durations.items():
            if name != "lora":
                variant, baseline = pooled.setdefault(setup, {}).setdefault(name, ([], []))
                variant.extend(seconds)
                baseline.extend(durations["lora"])
    for setup, variants in pooled.items():
        reported[setup] = {name: compare(*times) for name, times in variants.items()}
    rows = [
        "| model, batch, device | LoRA modules | design | variant | ratio to plain LoRA | 95% interval | median "
        "(95% interval) | extra ms per step, median (95% interval) | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (preset, modules, batch, device, design), ratios in reported.items():
        for name, r in ratios.items():
            median = extra = ""
            if "median" in r:
                median = f"{r['median']:.4f}x ({r['median_ci95'][0]:.4f}-{r['median_ci95'][1]:.4f})"
            if "extra_ms_median" in r:
                extra = f"{r['extra_ms_median']:+.2f} ({r['extra_ms_ci95'][0]:+.2f} to {r['extra_ms_ci95'][1]:+.2f})"
            rows.append(
                f"| {preset}, {batch[0]} x {batch[1]}, {device} | {modules} | {design} | {name} | {r['ratio']:.4f}x | "
                f"{r['ci95'][0]:.4f}-{r['ci95'][1]:.4f} | {median} | {extra} | {r['rounds']} |"
            )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["summarise"]:
        print("\n".join(summarise(sys.argv[2:])))
    else:
        main()
