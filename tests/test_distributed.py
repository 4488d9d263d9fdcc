"""LoRA-drop across 2 processes on CPU: DDP (gloo) and DeepSpeed ZeRO-1/2 through `Trainer(deepspeed=...)`.

Two torchrun launches of tests/distributed_worker.py (one DDP, one DeepSpeed) each run every scenario of several
variants in the same processes: a full run saving checkpoints before and after the switch, the resumes from both,
and a few more. Every rank writes what it saw; the tests compare the ranks with each other and the resumed runs
with the full one. gloo may abort at exit after a successful run, so a launch is judged by the files its ranks
wrote, not by its exit code.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_worker import EPOCH_STEPS, MAX_STEPS, SAVE_AT, SWITCH_STEP

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 420
RESUMES = ["full", "after", "before"]

# variant (see distributed_worker.py) -> its scenarios, grouped by launch
LAUNCHES = {
    "ddp": {
        "ddp": [*RESUMES, "ckpt", "drop", "epoch", "epoch-before", "best", "best-before"],
        "ddp-bf16-fresh": RESUMES,
    },
    "deepspeed": {
        "zero2-fresh": RESUMES,
        "zero2-bf16-dsopt": [*RESUMES, "ckpt", "drop"],
        "zero1-bf16-fresh-dsopt": RESUMES,
    },
}
VARIANTS = {variant: group for group, variants in LAUNCHES.items() for variant in variants}


class Launch:
    """One torchrun launch of the worker over every run of a group, and where its ranks wrote their records."""

    def __init__(self, group: str, out: Path):
        runs = [f"{variant}/{scenario}" for variant, scenarios in LAUNCHES[group].items() for scenario in scenarios]
        if group == "deepspeed":
            runs.append("zero3")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
        cmd += [str(WORKER), "--out", str(out), "--runs", ",".join(runs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
            self.log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            self.log = f"timed out after {LAUNCH_TIMEOUT_S}s\n{err.stdout or ''}{err.stderr or ''}"
        self.seconds = time.monotonic() - start
        self.out = out
        (out / "launch.log").write_text(self.log)
        print(f"\n{group} launch: {self.seconds:.1f}s for {len(runs)} runs")

    def records(self, variant: str, scenario: str) -> list[dict]:
        records = []
        for rank in range(WORLD_SIZE):
            path = self.out / variant / f"{scenario}.rank{rank}.pt"
            assert path.exists(), f"rank {rank} wrote no {variant}/{path.name}; the launch said:\n{self.log[-6000:]}"
            record = torch.load(path, weights_only=False)
            assert "exception" not in record, f"rank {rank}, {variant}/{scenario}:\n{record['exception']}"
            records.append(record)
        return records


class Case:
    """One variant's records: `case["full"]` is the list of the ranks' records of its full run."""

    def __init__(self, launch: Launch, variant: str):
        self.launch, self.variant = launch, variant
        self.scenarios = LAUNCHES[VARIANTS[variant]][variant]
        flags = variant.split("-")
        self.deepspeed = flags[0] != "ddp"
        self.bf16 = "bf16" in flags
        self.fresh = "fresh" in flags
        self.out = launch.out / variant

    def __getitem__(self, scenario: str) -> list[dict]:
        return self.launch.records(self.variant, scenario)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    done: dict[str, Launch] = {}

    def get(group: str) -> Launch:
        if group == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed is not installed")
        if group not in done:
            done[group] = Launch(group, tmp_path_factory.mktemp(group))
        return done[group]

    return get


@pytest.fixture(scope="module")
def case(request, launches) -> Case:
    return Case(launches(VARIANTS[request.param]), request.param)


def variants(*scenarios: str, flag: str | None = None):
    """Parametrize `case` over the variants that run all these scenarios (and have this flag, if given)."""
    chosen = [
        v
        for v, group in VARIANTS.items()
        if set(scenarios) <= set(LAUNCHES[group][v]) and (flag is None or flag in v.split("-"))
    ]
    return pytest.mark.parametrize("case", chosen, indirect=True)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what}: {len(different)} tensors differ, first {different[0]}"


def _saved_totals(checkpoint: Path) -> dict[str, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["LoraDropCallback"]["attributes"]["_checkpoint"]["totals"]


@variants("full", "before")
def test_every_rank_derives_the_same_plan_from_all_reduced_importance(case):
    for scenario in ("full", "before"):
        ranks = case[scenario]
        plans = [r["plan"] for r in ranks]
        assert plans[0] is not None and plans[0]["step"] == SWITCH_STEP
        assert all(plan == plans[0] for plan in plans), scenario
        assert 0 < len(plans[0]["kept"]) < len(plans[0]["kinds"]), "the plan should keep some modules, not all"
        # The plan is built from the sum of the ranks' own totals, each counted once.
        local = [math.fsum(r["local_totals"].values()) for r in ranks]
        assert all(total > 0 for total in local), local
        assert plans[0]["total"] == pytest.approx(sum(local), rel=1e-6)
    # The ranks saw different batches: a plan from one rank's totals would not be the plan of the sum.
    full = case["full"]
    assert full[0]["local_totals"] != full[1]["local_totals"]


@variants()
def test_ranks_hold_identical_lora_after_the_switch_and_at_the_end(case):
    for scenario in case.scenarios:
        ranks = case[scenario]
        assert all(r["global_step"] == MAX_STEPS for r in ranks), scenario
        for other in ranks[1:]:
            _assert_same_tensors(ranks[0]["final_lora"], other["final_lora"], f"{scenario}: final LoRA, rank 0 vs 1")
            if "switch_lora" in ranks[0]:
                _assert_same_tensors(ranks[0]["switch_lora"], other["switch_lora"], f"{scenario}: LoRA at the switch")
    expected = "torch.bfloat16" if case.bf16 and case.deepspeed else "torch.float32"
    assert case["full"][0]["lora_dtype"] == expected
    assert case["full"][0]["wrapped"] == ("DeepSpeedEngine" if case.deepspeed else "DistributedDataParallel")


@variants("full")
def test_shared_modules_are_tied_on_every_rank(case):
    for rank in case["full"]:
        assert rank["shared_state"], "the plan should tie at least one kind"
        assert all(entry["tied"] for entry in rank["shared_state"].values())


@variants("full", "after")
def test_resume_after_the_switch_continues_bit_identically(case):
    full, after = case["full"], case["after"]
    for rank, (a, f) in enumerate(zip(after, full)):
        assert a["resumed_from_step"] == SAVE_AT[1]
        assert a["plan"] == f["plan"]
        _assert_same_tensors(a["final_lora"], f["final_lora"], f"rank {rank}: resumed after the switch vs full run")


@variants("full", "before")
def test_resume_before_the_switch_counts_importance_once(case):
    full, before = case["full"], case["before"]
    saved = _saved_totals(case.out / "full" / f"checkpoint-{SAVE_AT[0]}")
    assert math.fsum(saved.values()) > 0, "the checkpoint before the switch must hold importance for this to test"
    for rank, (b, f) in enumerate(zip(before, full)):
        assert b["resumed_from_step"] == SAVE_AT[0]
        assert b["plan"]["total"] == f["plan"]["total"]
        assert b["plan"] == f["plan"]
        _assert_same_tensors(b["final_lora"], f["final_lora"], f"rank {rank}: resumed before the switch vs full run")


@variants("full", "before", flag="fresh")
def test_fresh_shared_init_resets_weights_master_and_moments_on_every_rank(case):
    for scenario in ("full", "before"):
        for rank, record in enumerate(case[scenario]):
            expected_a = record["expected_fresh_a"]
            for key, entry in record["shared_state"].items():
                kind, part = key.rsplit(".", 1)
                value = expected_a[kind] if part == "lora_A" else torch.zeros_like(entry["weight"])
                where = f"{scenario}, rank {rank}, {key}"
                if case.bf16 and case.deepspeed:
                    assert torch.equal(entry["weight"], value.to(torch.bfloat16).float()), where
                else:
                    assert torch.equal(entry["weight"], value), where
                if case.deepspeed:
                    assert torch.equal(entry["master"], value), f"{where}: fp32 master"
                    assert entry["fragments_live"], f"{where}: DeepSpeed's setters wrote stale fragments"
                    for moment in ("exp_avg", "exp_avg_sq"):
                        assert not entry[moment].any(), f"{where}: {moment}"
                else:
                    assert "exp_avg" not in entry, f"{where}: the torch optimizer state should be dropped"


@variants("full", flag="ddp")
def test_ddp_finds_unused_parameters_and_orphans_get_no_gradient(case):
    for rank in case["full"]:
        # Trainer's default for a PeftModel (not a PreTrainedModel) is find_unused_parameters=True.
        assert rank["find_unused_parameters"] is True
        assert rank["orphans_checked"] > 0
        assert rank["orphan_grads"] == []


@variants("full", "ckpt", "drop")
def test_activation_checkpointing_and_drop_mode_give_the_plan_of_the_full_run(case):
    full = case["full"][0]["plan"]
    for scenario in ("ckpt", "drop"):
        plan = case[scenario][0]["plan"]
        if scenario == "drop":  # a module alone in its kind keeps its LoRA when sharing, and loses it when dropping
            alone = {kind: members for kind, members in plan["shared"].items() if len(members) == 1}
            plan = {
                **plan,
                "kept": [n for n in full["kept"] if n in plan["kept"] or [n] in alone.values()],
                "shared": {kind: members for kind, members in plan["shared"].items() if kind not in alone},
            }
        assert plan["kept"] == full["kept"] and plan["shared"] == full["shared"], scenario
        assert plan["total"] == pytest.approx(full["total"], rel=1e-5), scenario
        assert plan["mode"] == ("drop" if scenario == "drop" else "share")


@variants("epoch", "epoch-before", "best", "best-before")
@pytest.mark.parametrize("strategy", ["epoch", "best"])
def test_resume_from_an_epoch_or_best_checkpoint_before_the_switch(case, strategy):
    """save_strategy "epoch" and "best" decide to save after on_step_end: the checkpoint must still hold every rank's
    importance (the sum over the ranks, on rank 0)."""
    full, before = case[strategy], case[f"{strategy}-before"]
    assert EPOCH_STEPS < SWITCH_STEP
    saved = _saved_totals(case.out / strategy / f"checkpoint-{EPOCH_STEPS}")
    assert math.fsum(saved.values()) > 0
    for rank, (b, f) in enumerate(zip(before, full)):
        assert b["resumed_from_step"] == EPOCH_STEPS
        assert b["plan"] == f["plan"]
        _assert_same_tensors(b["final_lora"], f["final_lora"], f"rank {rank}: resumed from {strategy} checkpoint")


def test_zero3_is_refused_before_the_first_step(launches):
    launch = launches("deepspeed")
    for rank in launch.records("", "zero3"):
        assert rank["error"] is not None and "ZeRO-3" in rank["error"] and "ZeRO-2" in rank["error"]
        assert rank["steps"] == 0
