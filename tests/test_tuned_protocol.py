"""Issue 29's protocol (benchmarks/gpu_batch.py part "tuned", benchmarks/tuned.py): each task's learning rate is
chosen in the direction of its score (the lowest validation loss for GSM, the highest validation accuracy for the
encoders), and the report's verdicts follow the same direction. Pure Python, no model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks(monkeypatch):
    """benchmarks/gpu_batch.py and benchmarks/tuned.py, imported from benchmarks/ and not left behind (benchmarks/
    names its modules plainly)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_batch
    import tuned

    yield gpu_batch, tuned
    for name in ("gpu_batch", "tuned", "variants"):
        sys.modules.pop(name, None)


def row(task: str, variant: str, seed: int, val: float, test: float) -> dict:
    metric = "loss" if task.startswith("gsm") else "accuracy"
    params = 1 if "@r1" in variant else 8
    return {"task": task, "variant": variant, "seed": seed, "hardware": "test", "steps": 10, "wall_minutes": 0.1,
            "adapter_params": params, f"val_{metric}": val, f"test_{metric}": test}  # fmt: skip


def test_the_rate_is_chosen_in_the_direction_of_the_tasks_score(benchmarks):
    gpu_batch, _ = benchmarks
    rows = [row("sarcasm", f"lora@x{rate:g}", 0, val, 0.8) for rate, val in zip((0.5, 1, 2, 4), (0.80, 0.85, 0.9, 0.7))]
    rows += [row("gsm", f"lora@x{rate:g}", 0, val, 0.3) for rate, val in zip((1, 2, 4, 8, 16), (0.5, 0.4, 0.2, 0.3, 1))]
    rows += [row("polarity", "lora@x0.5", 0, 0.9, 0.9)]  # an incomplete grid chooses nothing
    assert gpu_batch.chosen_rates(rows) == {("sarcasm", "lora"): 2.0, ("gsm", "lora"): 4.0}
    assert gpu_batch.chosen_rates(rows, {"sarcasm": (0.5, 1)}) == {("sarcasm", "lora"): 1.0}


def test_the_encoder_queue_runs_its_own_grid_then_the_other_seeds_at_the_chosen_rate(benchmarks, tmp_path):
    gpu_batch, _ = benchmarks
    args = argparse.Namespace(
        results_dir=str(tmp_path), tasks=["sarcasm"], arms=["lora"], rates=None, data="data", models="models",
        encoder_steps=40, toy=False, curve_every=10,
    )  # fmt: skip
    assert [job.name for job in gpu_batch.tuned_jobs(args, None)] == [f"sarcasm-lora@x{r}-0" for r in (0.5, 1, 2, 4)]
    assert "--validate" in gpu_batch.tuned_jobs(args, None)[0].argv
    rows = [row("sarcasm", f"lora@x{rate:g}", 0, val, 0.8) for rate, val in zip((0.5, 1, 2, 4), (0.8, 0.9, 0.85, 0.7))]
    (tmp_path / "quality_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [job.name for job in gpu_batch.tuned_jobs(args, None)] == ["sarcasm-lora@x1-1", "sarcasm-lora@x1-2"]


def test_the_report_calls_a_higher_accuracy_above_and_a_lower_loss_above(benchmarks):
    _, tuned = benchmarks
    rows = []
    for task, (good, bad) in {"sarcasm": (0.9, 0.8), "gsm": (0.2, 0.4)}.items():
        for seed, jitter in enumerate((0.0, 0.001, -0.001)):
            rows += [row(task, f"lora@r1x{rate}", seed, good, good + jitter) for rate in (1, 2)]
            rows += [row(task, f"lora@x{rate}", seed, bad, bad + jitter) for rate in (1, 2)]
    by_task = tuned.arms(rows)
    for task in ("sarcasm", "gsm"):
        r1, r8 = by_task[task]["lora@r1"], by_task[task]["lora"]
        assert tuned.compare(r1, r8)[2] == "above" and tuned.compare(r8, r1)[2] == "below"
    assert "r=8 is -10.0 better" in "\n".join(tuned.findings("sarcasm", by_task["sarcasm"]))
    assert "r=8 is -0.200 better" in "\n".join(tuned.findings("gsm", by_task["gsm"]))


def test_update_sizes_are_the_norms_of_the_full_step_changes(tmp_path, monkeypatch):
    """benchmarks/quality.py's UpdateSizes (how far one step moves s*B*A, from the factors) against the full products,
    grouped as it groups them: before the switch, then the kept and the truncated modules apart."""
    import torch
    from helpers import TokenDataset, tiny_llama, training_args
    from transformers import Trainer, TrainerCallback

    from loradrop_trainer import LoraDropCallback, find_lora_layers

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import quality

    class FullProducts(TrainerCallback):
        def __init__(self, drop):
            self.drop, self.sizes, self.before = drop, {}, None

        def products(self, model):
            return {
                name: (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
                .detach()
                .double()
                for name, layer in find_lora_layers(model).items()
            }

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.before = self.products(model) if state.global_step % 2 == 0 else None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.before is None:
                return
            plan = self.drop.plan
            for name, after in self.products(model).items():
                group = "before" if plan is None else "kept" if name in plan.kept else "dropped"
                self.sizes.setdefault(group, []).append(float(torch.linalg.norm(after - self.before[name])))

    model = tiny_llama()
    drop = LoraDropCallback(alpha=0.25, mode="truncate", dropped_rank=1, normalize="global", threshold=0.6)
    updates, reference = quality.UpdateSizes(drop, every=2), FullProducts(drop)
    args = training_args(tmp_path, max_steps=12, learning_rate=5e-3)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[updates, reference, drop]).train()
    got = updates.metrics()["step_update"]
    assert set(got) == {"before", "kept", "dropped"}
    for group, sizes in reference.sizes.items():
        assert got[group] == pytest.approx(sum(sizes) / len(sizes), rel=1e-4), group


def test_cut_cost_scores_every_cut_on_the_same_weights_and_puts_them_back(tmp_path, monkeypatch):
    """benchmarks/cut_cost.py's CutCost: at the switch step every choice is cut both ways on the weights training
    reached (the loss before is the same for all, each cut changes it), the weights are put back after each, the
    activation-aware cut never removes more of the dropped modules' output on the collection's tokens than the SVD,
    and training stops there; the report pairs the two truncations."""
    import torch
    from helpers import TokenDataset, tiny_llama, training_args
    from torch.utils.data import default_collate
    from transformers import Trainer

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cut_cost
    import quality

    batch = default_collate([TokenDataset(n=8, seed=9)[i] for i in range(8)])

    class Validation:
        """The validation loss on a fixed batch, with the LoRA weights each call saw."""

        def __init__(self):
            self.seen = []

        def on_train_begin(self, *args, **kwargs):
            pass

        def score(self, model, split):
            self.seen.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
            with torch.no_grad():
                return float(model(**batch).loss)

    model, validation = tiny_llama(), Validation()
    cut = cut_cost.CutCost(quality.variant_config("kind+T0.5+trunc1"), 4, validation, draws=2, seed=0)
    args = training_args(tmp_path, max_steps=10, learning_rate=5e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=40), callbacks=[cut])
    trainer.train()
    assert trainer.state.global_step == 4
    rows = cut.rows
    choices = {"importance", "random0", "random1", "residual", "all"}
    assert {(r["choice"], r["truncation"]) for r in rows} == {(c, t) for c in choices for t in ("svd", "activation")}
    assert len({r["val_loss_before"] for r in rows}) == 1
    assert all(r["val_loss_after"] != r["val_loss_before"] for r in rows)
    first = validation.seen[0]  # before any cut: every later call cut from these weights, which end as they were
    final = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(final[n], first[n]) for n in first)
    by = {(r["choice"], r["truncation"]): r for r in rows}
    for choice in choices:
        assert by[(choice, "activation")]["lost_energy"] <= by[(choice, "svd")]["lost_energy"] * (1 + 1e-9)
    assert by[("all", "activation")]["lost_energy"] < by[("all", "svd")]["lost_energy"]
    assert by[("all", "svd")]["kept_fraction"] == pytest.approx(1 / 4)  # rank 1 of the tiny model's r=4
    table = [{**r, "task": "gsm", "seed": 0, "variant": "lora@x8", "steps": 10, "switch_step": 4, "plan": "p",
              "hardware": "test"} for r in rows]  # fmt: skip
    text = cut_cost.report(table)
    assert "| importance | activation | 1 |" in text and "- all: paired gain of activation-aware truncation" in text
    for name in ("cut_cost", "quality", "variants", "readme"):
        sys.modules.pop(name, None)
