"""Runs recipes/llama2_gsm8k.py with per-step timing and memory, for the distributed GPU measurements.

Launched like the recipe itself (`torchrun --nproc_per_node 2 benchmarks/recipe_gpu.py <recipe flags>`). Every rank
writes `step_stats_rank{R}.json` into the recipe's --output_dir: each optimizer step's wall time and peak GPU memory,
the logged losses, the switch step, and a SHA-256 of the LoRA parameters as they are at the end (to compare ranks,
and an uninterrupted run with a resumed one). `summarise` turns the files of several runs into ratios.

    torchrun --nproc_per_node 2 benchmarks/recipe_gpu.py --toy --toy_size llama2-7b --bf16 --deepspeed ... \\
        --output_dir runs/ds_loradrop
    python benchmarks/recipe_gpu.py summarise runs/ds_loradrop runs/ds_lora ...
    python benchmarks/recipe_gpu.py compare runs/ds_loradrop runs/ds_lora
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StepStats(TrainerCallback):
    """Wall time and peak GPU memory of every optimizer step, plus the losses the Trainer logs."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.losses: list[tuple[int, float]] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        peak = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        self.steps.append({"step": state.global_step, "seconds": time.perf_counter() - self._start, "peak": peak})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, logs["loss"]))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, param in model.named_parameters():
            if "lora_" in name:
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        plan = getattr(model, "loradrop_plan", None)
        record = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "switch_step": plan.step if plan is not None else None,
            "kept_modules": len(plan.kept) if plan is not None else None,
            "plan": plan.to_dict() if plan is not None else None,
            "lora_sha256": digest.hexdigest(),
            "steps": self.steps,
            "losses": self.losses,
        }
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_stats_rank{args.process_index}.json").write_text(json.dumps(record))


def _phase(record: dict, switch: int | None, after: bool) -> list[dict]:
    """Steps of one phase, leaving out step 1 (warm-up: allocator, kernels' first launch)."""
    return [s for s in record["steps"] if s["step"] > 1 and (switch is None or (s["step"] > switch) == after)]


def summarise(run_dirs: list[str]) -> dict:
    """Per run: ranks agree?, median step time and peak memory before/after the switch, losses around the switch."""
    runs = {}
    for run_dir in run_dirs:
        records = [json.loads(p.read_text()) for p in sorted(Path(run_dir).glob("step_stats_rank*.json"))]
        if not records:
            runs[run_dir] = {"missing": True}
            continue
        first = records[0]
        switch = first["switch_step"]
        phases = {}
        for name, after in (("before", False), ("after", True)):
            steps = _phase(first, switch, after)
            if steps:
                phases[name] = {
                    "median_step_s": statistics.median(s["seconds"] for s in steps),
                    "peak_gib": max(s["peak"] for r in records for s in _phase(r, switch, after)) / 2**30,
                    "steps": len(steps),
                }
        runs[run_dir] = {
            "ranks": len(records),
            "ranks_identical_lora": len({r["lora_sha256"] for r in records}) == 1,
            "ranks_identical_plan": len({json.dumps(r["plan"], sort_keys=True) for r in records}) == 1,
            "lora_sha256": first["lora_sha256"],
            "switch_step": switch,
            "kept_modules": first["kept_modules"],
            "losses": first["losses"],
            "phases": phases,
        }
    return runs


def compare(loradrop_dir: str, lora_dir: str) -> dict:
    """LoRA-drop over plain LoRA, median step time and peak memory, before and after the LoRA-drop run's switch."""
    pruned = json.loads(next(Path(loradrop_dir).glob("step_stats_rank0.json")).read_text())
    plain = json.loads(next(Path(lora_dir).glob("step_stats_rank0.json")).read_text())
    switch = pruned["switch_step"]
    ratios = {}
    for name, after in (("before_switch", False), ("after_switch", True)):
        a, b = _phase(pruned, switch, after), _phase(plain, switch, after)
        peak_a, peak_b = max(s["peak"] for s in a), max(s["peak"] for s in b)
        ratios[name] = {
            "step_time": statistics.median(s["seconds"] for s in a) / statistics.median(s["seconds"] for s in b),
            "peak_memory": peak_a / peak_b if peak_b else None,
            "peak_gib": [peak_a / 2**30, peak_b / 2**30],
        }
    return ratios


if __name__ == "__main__":
    if sys.argv[1:2] == ["summarise"]:
        print(json.dumps(summarise(sys.argv[2:]), indent=2))
    elif sys.argv[1:2] == ["compare"]:
        print(json.dumps(compare(*sys.argv[2:4]), indent=2))
    else:
        from recipes import llama2_gsm8k

        llama2_gsm8k.main(sys.argv[1:], callbacks=[StepStats()])
