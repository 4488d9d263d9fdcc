"""benchmarks/gsm8k_real.py's queue and report (real GSM8K on Gemma-3-270M), on made-up rows: no model, no data."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATES = (5e-4, 1e-3, 2e-3, 4e-3)


@pytest.fixture
def real(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("gsm8k_real")
    yield module
    sys.modules.pop("gsm8k_real")  # benchmarks/ names its modules plainly: leave none behind


def row(arm: str, lr: float, seed: int, val: float, em: float = 0.2, params: int = 1000) -> dict:
    return {
        "task": "gsm8k-gemma3-270m", "variant": f"{arm} lr={lr:g}", "seed": seed, "arm": arm, "lr": lr,
        "val_loss": val, "test_loss": val + 0.01, "exact_match": em, "adapter_params": params, "hardware": "H100",
        "wall_minutes": 3.0, "train_minutes": 2.0, "peak_gib": 5.0, "steps": 300, "batch": 16,
    }  # fmt: skip


def test_queue_waits_for_the_grid_then_runs_every_arm_at_its_rate(real):
    arms = list(real.GEMMA.arms)
    first = real.planned_runs([], arms, RATES, (0, 1))
    assert first[:4] == [("lora", rate, 0) for rate in RATES]  # r=8's grid first
    assert ("lora@r1", 1e-3, 0) in first[4:] and all(seed == 0 for _, _, seed in first)  # then the own grids
    assert real.planned_runs([], arms, RATES, (0, 1), own_grids=False) == first[:4]

    rows = [row("lora", rate, 0, val) for rate, val in zip(RATES, (1.2, 1.0, 0.9, 0.95))]
    assert real.chosen_rate(rows[:3], RATES) is None
    assert real.chosen_rate(rows, RATES) == 2e-3
    rows.append(row("lora@r1", 2e-3, 0, 1.0))  # an own-grid run at the rate chosen later counts as seed 0
    queue = real.planned_runs(rows, arms, RATES, (0, 1))
    at_rate = [(arm, seed) for arm, rate, seed in queue if rate == 2e-3]
    assert at_rate[:4] == [("lora@r2", 0), (real.DEFAULT, 0), (f"random:{real.DEFAULT}", 0), (arms[-1], 0)]
    assert ("lora@r1", 0) not in at_rate and ("lora", 1) in at_rate and ("lora@r1", 1) in at_rate
    assert queue.index(("lora", 2e-3, 1)) < queue.index(("lora@r1", 5e-4, 0))  # own grids come last


def test_report_on_partial_and_complete_rows(real):
    assert "No runs yet" in real.report([], real.GEMMA)
    partial = real.report([row("lora", 5e-4, 0, 1.2, params=8000)], real.GEMMA)
    assert "grid is incomplete" in partial and "lora lr=0.001 seed 0" in partial

    rows = [row("lora", rate, 0, val, params=8000) for rate, val in zip(RATES, (1.2, 1.0, 0.9, 0.95))]
    rows += [row("lora", 2e-3, 1, 0.91, em=0.22, params=8000)]
    rows += [row("lora@r1", 2e-3, seed, 1.0, em=0.10, params=1000) for seed in (0, 1)]
    rows += [row("lora@r2", 2e-3, seed, 0.95, em=0.15 + 0.01 * seed, params=2000) for seed in (0, 1)]
    rows += [row(real.DEFAULT, 2e-3, seed, 0.92, em=0.25 + 0.01 * seed, params=1900) for seed in (0, 1)]
    text = real.report(rows, real.GEMMA)
    assert "Chosen rate (plain LoRA r=8's lowest validation loss): **0.002**" in text
    assert "| lora@r2 | 0.002 | 2 (0, 1) | 15.5 ± 0.7 |" in text
    verdict = next(line for line in text.splitlines() if line.startswith(f"- {real.DEFAULT} "))
    assert "vs plain LoRA r=1 " in verdict and "exact match 25.5 vs 10.0 (above)" in verdict  # r=2 has more params
    missing = text.split("not yet made: ")[1].split(" (")[0].split(", ")
    assert f"{real.DEFAULT} lr=0.002 seed 0" not in missing and f"random:{real.DEFAULT} lr=0.002 seed 1" in missing
