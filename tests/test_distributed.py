"""LoRA-drop across 2 processes on CPU (gloo): DDP, DeepSpeed ZeRO-1/2/3 through `Trainer(deepspeed=...)`, and FSDP2.

Three torchrun launches (DDP and DeepSpeed run tests/distributed_worker.py, FSDP2 tests/fsdp2_worker.py, since the
Trainer applies no FSDP on a CPU) each run every scenario of several variants in the same processes: a full run
saving checkpoints before and after the switch and exporting the compact adapter, the resumes from both, and a few
more. Every rank writes what it saw; the tests compare the ranks with each other, the resumed runs with the full one,
and the sharded runs' exports with the same run's on a replicated engine. Variants run mode "share" (the paper's
method, tests' SHARING), except those with the `trunc` flag: mode "truncate" with dropped_rank 1. gloo may abort at
exit after a successful run, so a launch is judged by the files its ranks wrote, not by its exit code.
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
from safetensors.torch import load_file

from loradrop_trainer.importance import truncation_residual
from loradrop_trainer.truncate import kept_directions, truncated_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_worker import AUTO_EARLIEST, AUTO_LATEST, CLIPPING_NORM, EPOCH_STEPS, MAX_STEPS, SAVE_AT, SWITCH_STEP

TESTS = Path(__file__).resolve().parent
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 420
RESUMES = ["full", "after", "before"]

# variant (see distributed_worker.py) -> its scenarios, grouped by launch
LAUNCHES = {
    "ddp": {
        "ddp": [*RESUMES, "ckpt", "drop", "epoch", "epoch-before", "best", "best-before", "load-best"],
        "ddp-bf16-fresh": RESUMES,
        "ddp-restart-auto": RESUMES,
        "ddp-trunc": RESUMES,
        "ddp-trunc-resid-act": RESUMES,
    },
    "deepspeed": {
        "zero2-fresh": RESUMES,
        "zero2-bf16-dsopt": [*RESUMES, "ckpt", "drop"],
        "zero1-bf16-fresh-dsopt": RESUMES,
        "zero3": [*RESUMES, "drop", "load-best"],
        "zero3-bf16-fresh-clip": RESUMES,
        "zero2-restart-auto": RESUMES,
        "zero3-restart-auto": RESUMES,
        "zero2-bf16-trunc": RESUMES,
        "zero3-trunc": RESUMES,
        "zero2-trunc": ["full"],  # zero3-trunc's reference, see TRUNCATED_REFERENCES
        "zero3-trunc-resid-act": RESUMES,
        "zero2-trunc-resid-act": ["full"],
    },
    "fsdp2": {
        "fsdp2": [*RESUMES, "load-best"],
        "fsdp2-fresh-clip": RESUMES,
        "fsdp2-trunc": RESUMES,
        "fsdp2-trunc-resid-act": RESUMES,
        "ddploop": ["full"],
        "ddploop-trunc": ["full"],
        "ddploop-trunc-resid-act": ["full"],
    },
}
WORKERS = {"ddp": "distributed_worker.py", "deepspeed": "distributed_worker.py", "fsdp2": "fsdp2_worker.py"}
WRAPPERS = {
    "ddp": "DistributedDataParallel",
    "ddploop": "DistributedDataParallel",
    "fsdp2": "FSDPPeftModelForCausalLM",
    "zero1": "DeepSpeedEngine",
    "zero2": "DeepSpeedEngine",
    "zero3": "DeepSpeedEngine",
}
# A sharded run and the run it must export the same adapter as, tied in place under DDP (same data, same steps).
REFERENCES = {"zero3": "ddp", "fsdp2": "ddploop"}
# The same for mode "truncate": a sharded run, the replicated run that must export the same adapter (same data, same
# steps, same optimizer arithmetic), and the DDP run whose LoRA it must hold at the switch. DeepSpeed cannot drop one
# Parameter's optimizer state as torch does: its Adam step count belongs to a whole flat partition, so the reset at
# the switch zeroes the truncated modules' moments while the bias correction goes on counting from step 1, and from
# the first step after the switch ZeRO-3 trains them as ZeRO-1/2 do, not as DDP does.
TRUNCATED_REFERENCES = {
    "zero3-trunc": ("zero2-trunc", "ddp-trunc"),
    "fsdp2-trunc": ("ddploop-trunc", "ddploop-trunc"),
    "zero3-trunc-resid-act": ("zero2-trunc-resid-act", "ddp-trunc-resid-act"),
    "fsdp2-trunc-resid-act": ("ddploop-trunc-resid-act", "ddploop-trunc-resid-act"),
}
VARIANTS = {variant: group for group, variants in LAUNCHES.items() for variant in variants}


class Launch:
    """One torchrun launch of the worker over every run of a group, and where its ranks wrote their records."""

    def __init__(self, group: str, out: Path):
        runs = [f"{variant}/{scenario}" for variant, scenarios in LAUNCHES[group].items() for scenario in scenarios]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
        cmd += [str(TESTS / WORKERS[group]), "--out", str(out), "--runs", ",".join(runs)]
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
        self.backend, *flags = variant.split("-")
        self.deepspeed = self.backend.startswith("zero")
        self.sharded = self.backend in ("zero3", "fsdp2")  # LoRA gradient-tied rather than tied in place
        self.bf16 = "bf16" in flags
        self.fresh = "fresh" in flags
        self.auto = "auto" in flags
        self.clip = "clip" in flags
        self.trunc = "trunc" in flags  # mode "truncate", dropped_rank 1
        self.resid = "resid" in flags  # score "residual"
        self.act = "act" in flags  # truncation "activation"
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


def variants(*scenarios: str, flag: str | None = None, without: str | None = None):
    """Parametrize `case` over the variants that run all these scenarios (and have the flag `flag`, and not the flag
    `without`, if given: tests of sharing say `without="trunc"`)."""
    chosen = [
        v
        for v, group in VARIANTS.items()
        if set(scenarios) <= set(LAUNCHES[group][v])
        and (flag is None or flag in v.split("-"))
        and (without is None or without not in v.split("-"))
    ]
    return pytest.mark.parametrize("case", chosen, indirect=True)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{what}: {len(different)} tensors differ, first {different[0]}"


def _saved_totals(checkpoint: Path) -> dict[str, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["LoraDropCallback"]["attributes"]["_checkpoint"]["totals"]


def _summed_gram(ranks: list[dict], name: str, r: int) -> torch.Tensor:
    """Module `name`'s token Gram over every rank's scored tokens (what the all-reduce gives the switch)."""
    return torch.tensor([sum(values) for values in zip(*(rank["local_grams"][name] for rank in ranks))]).reshape(r, r)


def _residual_of_summed_grams(ranks: list[dict], activation: bool) -> float:
    """Score "residual": the total the plan must rest on, from the sum of the ranks' token Grams and the LoRA weights
    the switch found (the same on every rank)."""
    record = ranks[0]["before_switch"]
    total = 0.0
    for name, scaling in record["scaling"].items():
        a, b = (record["lora"][f"{name}.{part}.weight"] for part in ("lora_A", "lora_B"))
        gram = _summed_gram(ranks, name, a.shape[0])
        total += truncation_residual(a, b, gram.double(), 1, scaling, activation)
    return total


@variants("full", "before")
def test_every_rank_derives_the_same_plan_from_all_reduced_importance(case):
    for scenario in ("full", "before"):
        ranks = case[scenario]
        plans = [r["plan"] for r in ranks]
        assert plans[0] is not None and all(plan == plans[0] for plan in plans), scenario
        assert 0 < len(plans[0]["kept"]) < len(plans[0]["kinds"]), "the plan should keep some modules, not all"
        if case.auto:  # the ranks took the same decisions on the same all-reduced numbers, window after window
            assert AUTO_EARLIEST <= plans[0]["step"] <= AUTO_LATEST and plans[0]["stability"], scenario
            continue
        assert plans[0]["step"] == SWITCH_STEP
        # The plan is built from the sum of the ranks' own totals, each counted once.
        local = [math.fsum(r["local_totals"].values()) for r in ranks]
        assert all(total > 0 for total in local), local
        expected = _residual_of_summed_grams(ranks, case.act) if case.resid else sum(local)
        assert plans[0]["total"] == pytest.approx(expected, rel=1e-6)
    # The ranks saw different batches: a plan from one rank's totals would not be the plan of the sum.
    full = case["full"]
    assert case.auto or full[0]["local_totals"] != full[1]["local_totals"]


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
    assert case["full"][0]["wrapped"] == WRAPPERS[case.backend]


@variants("full", without="trunc")
def test_shared_modules_are_tied_in_place_or_by_gradient_on_every_rank(case):
    for rank in case["full"]:
        assert rank["shared_state"], "the plan should tie at least one kind"
        # Replicated LoRA is tied in place; sharded LoRA keeps one Parameter per member (equal, see the next test).
        assert all(entry["tied"] != case.sharded for entry in rank["shared_state"].values())


@variants(without="trunc")
def test_every_member_of_a_shared_group_equals_its_source_after_the_switch_and_at_the_end(case):
    for scenario in case.scenarios:
        for rank, record in enumerate(case[scenario]):
            plan = record["plan"]
            if plan["mode"] != "share":
                continue
            for when in ("switch_lora", "final_lora"):
                if when not in record:  # resumed after the switch
                    continue
                if when == "final_lora" and scenario == "load-best":  # back to a checkpoint from before the switch
                    continue
                lora = record[when]
                for members in plan["shared"].values():
                    for part in ("lora_A", "lora_B"):
                        source = lora[f"{members[0]}.{part}.weight"]
                        unequal = [m for m in members if not torch.equal(lora[f"{m}.{part}.weight"], source)]
                        assert not unequal, f"{scenario}, rank {rank}, {when}: {unequal[0]}.{part} differs"


@variants("drop")
def test_dropped_modules_keep_lora_b_at_zero_to_the_end(case):
    """Mode "drop" zeroes the dropped modules' B at the switch; nothing may move it afterwards (under ZeRO-3 their
    partitions would otherwise be stepped with the last gradient reduced for them, step after step)."""
    for rank, record in enumerate(case["drop"]):
        dropped = [name for members in record["plan"]["shared"].values() for name in members]
        assert dropped, "the plan should drop some modules"
        moved = [n for n in dropped if record["final_lora"][f"{n}.lora_B.weight"].any()]
        assert not moved, f"rank {rank}: the B of {len(moved)} dropped modules moved, first {moved[0]}"


@variants("load-best")
def test_21_1_best_checkpoint_before_the_switch_is_loaded_back_as_plain_lora_on_every_rank(case):
    """Issue 21, item 1: `load_best_model_at_end` with the best checkpoint from before the switch. Under ZeRO-3 the
    Trainer's DeepSpeed load, under FSDP2 the engine's state-dict load (the loop's stand-in for accelerate's
    `load_fsdp_model`), already gave every member its own weights back: the callback must not reload them through PEFT
    into the sharded Parameters (which failed with a size mismatch on every rank), and `train()` must end on every rank
    with exactly the checkpoint's adapter. DDP (tied in place, reloaded through PEFT) is the control."""
    for rank, record in enumerate(case["load-best"]):
        assert record["global_step"] == MAX_STEPS, f"rank {rank}: train() did not finish"
        best = Path(record["best_model_checkpoint"])
        assert best.name == f"checkpoint-{EPOCH_STEPS}" and EPOCH_STEPS < record["plan"]["step"] == SWITCH_STEP
        assert not record["plan_on_model"], f"rank {rank}: a model restored to before the switch carries no plan"
        saved = load_file(best / "adapter_model.safetensors")
        _assert_same_tensors(record["final_lora"], saved, f"rank {rank}: final LoRA vs the best checkpoint's adapter")
        _assert_same_tensors(record["final_lora"], record["snapshot_lora"], f"rank {rank}: vs the LoRA at its step")


@variants("full", flag="clip")
def test_clipping_acted_in_the_clipped_runs(case):
    norms = case["full"][0]["grad_norms"]
    assert norms and min(norms) > CLIPPING_NORM, norms


@pytest.mark.parametrize("sharded", sorted(REFERENCES))
def test_compact_export_of_a_sharded_run_equals_the_same_run_under_ddp_and_stores_each_shared_lora_once(
    launches, sharded
):
    """Gradient clipping is inactive in these runs (norms ~0.2 < 1.0), where the two tying schemes are the same
    arithmetic; the float tolerance covers the engines' different reduction orders."""
    reference = REFERENCES[sharded]
    ours, theirs = (Case(launches(VARIANTS[v]), v)["full"] for v in (sharded, reference))
    assert ours[0]["plan"]["kept"] == theirs[0]["plan"]["kept"]
    assert max(ours[0]["grad_norms"] + theirs[0]["grad_norms"]) < 1.0
    compact = [load_file(Path(r["compact"]) / "adapter_compact.safetensors") for r in (ours[0], theirs[0])]
    assert compact[0].keys() == compact[1].keys()
    for key, tensor in compact[0].items():
        torch.testing.assert_close(tensor, compact[1][key], rtol=1e-4, atol=1e-6, msg=key)
    plan = ours[0]["plan"]
    assert len(compact[0]) == 2 * (len(plan["kept"]) + len(plan["shared"])) < len(ours[0]["final_lora"])
    manifest = json.loads((Path(ours[0]["compact"]) / "loradrop_compact.json").read_text())
    for members in plan["shared"].values():
        assert len(manifest["tensors"][f"{members[0]}.lora_A.weight"]) == len(members)


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


@variants("full", "before", flag="restart")
def test_restart_gives_every_rank_a_fresh_adapter_optimizer_state_and_schedule(case):
    for scenario in ("full", "before"):
        for rank, record in enumerate(case[scenario]):
            plan, expected = record["plan"], record["expected_restart_a"]
            for name in plan["kinds"]:
                source = name if name in plan["kept"] else next(m[0] for m in plan["shared"].values() if name in m)
                where = f"{scenario}, rank {rank}, {name}"
                assert torch.equal(record["switch_lora"][f"{name}.lora_A.weight"], expected[source]), where
                assert not record["switch_lora"][f"{name}.lora_B.weight"].any(), where
            for key, entry in record["shared_state"].items():
                if case.deepspeed:
                    assert torch.equal(entry["master"], entry["weight"]), f"{scenario}, {key}: fp32 master"
                    assert all(not entry[m].any() for m in ("exp_avg", "exp_avg_sq")), f"{scenario}, {key}"
                else:
                    assert "exp_avg" not in entry, f"{scenario}, {key}: the torch optimizer state should be dropped"
            assert record["lr_after_switch"] == pytest.approx(5e-3), "the schedule starts again (no warm-up)"


@variants("full", flag="ddp", without="trunc")
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


# Mode "truncate" (variants with the `trunc` flag): each dropped module keeps its own LoRA, cut to rank 1 at the switch.


def _truncation(record: dict) -> tuple[list[str], int]:
    """The modules the record's plan truncates, and their rank."""
    plan = record["plan"]
    assert plan["mode"] == "truncate" and plan["dropped_rank"] == 1, plan["mode"]
    dropped = [name for members in plan["shared"].values() for name in members]
    assert dropped and plan["kept"], "the plan should truncate some modules and keep others"
    return dropped, plan["dropped_rank"]


def _lora_term(tensors: dict, name: str, scaling: float) -> torch.Tensor:
    """`scaling * B @ A` of module `name`, in float64."""
    return scaling * tensors[f"{name}.lora_B.weight"].double() @ tensors[f"{name}.lora_A.weight"].double()


@variants(flag="trunc")
def test_truncated_modules_hold_an_exact_zero_block_and_a_live_rank_k_part_on_every_rank(case):
    """After the switch and at the end (resumes included), rows k.. of every truncated module's A and columns k.. of
    its B are exactly zero on every rank, its rank-k part is not; its scaling is PEFT's at rank k; and the callback
    counts what is left: the kept modules' LoRA and the truncated modules' rank-k parts."""
    for scenario in case.scenarios:
        for rank, record in enumerate(case[scenario]):
            dropped, k = _truncation(record)
            for when in ("switch_lora", "final_lora"):
                if when not in record:  # resumed after the switch
                    continue
                lora = record[when]
                for name in dropped:
                    a, b = lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"]
                    where = f"{scenario}, rank {rank}, {when}, {name}"
                    assert not a[k:].any() and not b[:, k:].any(), f"{where}: the zero block is not zero"
                    assert a[:k].any(dim=1).all() and b[:, :k].any(dim=0).all(), f"{where}: the rank-k part is zero"
            if "switch_scaling" in record:
                kept = set(record["plan"]["kept"])
                expected = {name: 8 / 4 if name in kept else 8 / k for name in record["switch_scaling"]}
                assert record["switch_scaling"] == expected, f"{scenario}, rank {rank}: lora_alpha / rank"
            lora = record["final_lora"]
            before = sum(t.numel() for t in lora.values())
            after = sum(lora[f"{n}.{p}.weight"].numel() for n in record["plan"]["kept"] for p in ("lora_A", "lora_B"))
            after += sum(
                k * sum(lora[f"{n}.lora_A.weight"].shape[1:] + lora[f"{n}.lora_B.weight"].shape[:1]) for n in dropped
            )
            assert record["lora_params"] == (before, after), f"{scenario}, rank {rank}: parameter counts"


@variants("full", "before", flag="trunc")
def test_truncation_at_the_switch_is_the_best_rank_k_approximation_of_what_the_optimizer_held(case):
    """At the switch each truncated module's LoRA term `scaling * B @ A` becomes the best rank-1 approximation of its
    term just before it (what the optimizer trains: DeepSpeed's fp32 masters, whatever the module's dtype): the
    truncated SVD, or with `act` the projection on the directions that keep most of its output on the tokens every
    rank scored (from the sum of the ranks' token Grams); its values are `truncated_values` of those weights; kept
    modules are untouched."""
    for scenario in ("full", "before"):
        ranks = case[scenario]
        for rank, record in enumerate(ranks):
            dropped, k = _truncation(record)
            before, after = record["before_switch"], record["truncated_state"]
            held = before["masters"] if case.deepspeed else before["lora"]
            now = {key: entry["master"] if case.deepspeed else entry["weight"] for key, entry in after.items()}
            for name in dropped:
                where = f"{scenario}, rank {rank}, {name}"
                a, b = (held[f"{name}.{part}.weight"] for part in ("lora_A", "lora_B"))
                gram = _summed_gram(ranks, name, a.shape[0]).double() if case.act else None
                held_term = _lora_term(held, name, before["scaling"][name])
                if gram is None:
                    u, s, vh = torch.linalg.svd(held_term)
                    best = (u[:, :k] * s[:k]) @ vh[:k]
                else:
                    kept = kept_directions(a.double(), b.double(), k, gram)
                    best = kept @ (kept.T @ held_term)
                term = _lora_term(now, name, record["switch_scaling"][name])
                assert float((term - best).norm() / best.norm()) < 1e-6, where
                scale = before["scaling"][name] / record["switch_scaling"][name]
                for part, value in zip(("lora_A", "lora_B"), truncated_values(a, b, k, scale, gram)):
                    torch.testing.assert_close(now[f"{name}.{part}.weight"], value, rtol=1e-5, atol=1e-7, msg=where)
            for name in record["plan"]["kept"]:
                for part in ("lora_A", "lora_B"):
                    key = f"{name}.{part}.weight"
                    assert torch.equal(record["switch_lora"][key], before["lora"][key]), f"{scenario}, {key}"


@variants("full", "before", flag="trunc")
def test_truncated_modules_start_with_fresh_optimizer_state_at_the_switch(case):
    """Torch optimizers (DDP, FSDP2) hold no state for a truncated module after the switch. DeepSpeed (fp32 masters in
    its flat partitions, through its safe setters) holds zero moments and an fp32 master equal to the module's new
    value, written into the partitions its optimizer steps (also after a resume, which loads them anew)."""
    for scenario in ("full", "before"):
        for rank, record in enumerate(case[scenario]):
            for key, entry in record["truncated_state"].items():
                where = f"{scenario}, rank {rank}, {key}"
                if not case.deepspeed:
                    assert entry["state_keys"] == [], f"{where}: the torch optimizer state should be dropped"
                    continue
                weight = entry["master"].to(torch.bfloat16).float() if case.bf16 else entry["master"]
                assert torch.equal(entry["weight"], weight), f"{where}: the module's weight is not the fp32 master's"
                assert entry["fragments_live"], f"{where}: DeepSpeed's setters wrote stale fragments"
                for moment in ("exp_avg", "exp_avg_sq"):
                    assert not entry[moment].any(), f"{where}: {moment}"


@pytest.mark.parametrize("sharded", sorted(TRUNCATED_REFERENCES))
def test_compact_export_of_a_sharded_truncated_run_equals_the_same_run_on_a_replicated_engine(launches, sharded):
    """FSDP2 against the same loop under DDP; ZeRO-3 against ZeRO-2 (DeepSpeed's optimizer arithmetic after the switch,
    see TRUNCATED_REFERENCES) and, at the switch, against DDP. The export stores kept modules at rank r and truncated
    ones at rank 1, one tensor per key, and counts the same parameters as the reference."""
    ours, theirs, at_switch = (
        Case(launches(VARIANTS[v]), v)["full"] for v in (sharded, *TRUNCATED_REFERENCES[sharded])
    )
    for other in (theirs, at_switch):  # the same plan; importances equal up to the engines' reduction orders
        assert (ours[0]["plan"]["kept"], ours[0]["plan"]["shared"]) == (
            other[0]["plan"]["kept"],
            other[0]["plan"]["shared"],
        )
    assert max(ours[0]["grad_norms"] + theirs[0]["grad_norms"]) < 1.0, "clipping should not act"
    for key, tensor in ours[0]["switch_lora"].items():
        torch.testing.assert_close(tensor, at_switch[0]["switch_lora"][key], rtol=1e-4, atol=1e-6, msg=key)
    compact = [load_file(Path(r["compact"]) / "adapter_compact.safetensors") for r in (ours[0], theirs[0])]
    assert compact[0].keys() == compact[1].keys()
    for key, tensor in compact[0].items():
        torch.testing.assert_close(tensor, compact[1][key], rtol=1e-4, atol=1e-6, msg=key)
    dropped, k = _truncation(ours[0])
    plan, final = ours[0]["plan"], ours[0]["final_lora"]
    assert len(compact[0]) == 2 * len(plan["kinds"]) == len(final)
    for name in plan["kinds"]:
        rank = k if name in dropped else 4
        a, b = compact[0][f"{name}.lora_A.weight"], compact[0][f"{name}.lora_B.weight"]
        assert a.shape == (rank, final[f"{name}.lora_A.weight"].shape[1]), name
        assert b.shape == (final[f"{name}.lora_B.weight"].shape[0], rank), name
    assert sum(t.numel() for t in compact[0].values()) == ours[0]["lora_params"][1] == theirs[0]["lora_params"][1]
    manifest = json.loads((Path(ours[0]["compact"]) / "loradrop_compact.json").read_text())
    assert all(members == [key] for key, members in manifest["tensors"].items())
