"""One rank of a multi-process LoRA-drop run on CPU (DDP, or DeepSpeed ZeRO-1/2/3), for tests/test_distributed.py.

Launch with torchrun (gloo; DeepSpeed picks up torchrun's environment):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --out /tmp/run \
        --runs ddp/full,ddp/after,ddp/before,zero2-bf16-fresh/full,zero3/full

Each run is `variant/scenario`; runs go one after another in the same processes (imports and the process group are
paid for once). A variant is dash-separated: the backend (`ddp`, `zero1`, `zero2`, `zero3`) then any of `bf16`, `fresh`
(shared_init="fresh"), `clip` (max_grad_norm=CLIPPING_NORM: gradient clipping acts at every step), `dsopt`
(DeepSpeed's own AdamW section rather than the Trainer's torch optimizer), `restart` (restart=True), `auto`
(alpha="auto", switching between steps AUTO_EARLIEST and AUTO_LATEST) and `trunc` (mode "truncate" with
dropped_rank 1, SHARING's other settings: dropped modules keep their own LoRA, cut to rank 1 at the switch).
Scenarios:

- `full`: train MAX_STEPS steps, switching at the end of step SWITCH_STEP, with checkpoints at the steps in SAVE_AT
  (one before the switch, one after), then export the compact adapter (`save_compact` on every rank).
- `after` / `before`: resume from the variant's `full` checkpoint after / before the switch and train to the end.
- `ckpt`: the full run without checkpoints, with (non-reentrant) activation checkpointing.
- `drop`: the full run without checkpoints, in mode "drop" (dropped modules lose their LoRA).
- `epoch` / `epoch-before`: save_strategy="epoch" on a smaller data set (an epoch ends before the switch), and the
  resume from that first epoch's checkpoint.
- `best` / `best-before`: save_strategy="best" with an evaluation every EPOCH_STEPS steps (the Trainer decides to
  save after evaluating), and the resume from the checkpoint of the first evaluation.
- `load-best`: `load_best_model_at_end=True` with a metric that makes the first evaluation (step EPOCH_STEPS, before
  the switch) the best: the Trainer loads that checkpoint at the end of `train()`, then the callback undoes the plan.

Every rank writes what it saw to `<out>/<variant>/<scenario>.rank<r>.pt` (plan, LoRA tensors at the switch and at
the end, the shared pair's or the truncated modules' fp32 master and Adam moments just after the switch, in mode
"truncate" the LoRA, fp32 masters and scalings just before it, ...). gloo may abort at exit after a
successful run, so the test judges the run by these files, not by the exit code. After a run fails, its rank writes
the traceback and the launch stops (the other rank may then wait in a collective until torchrun ends it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARING, EarliestIsBest, TokenDataset, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from hub_export import save_compact
from loradrop_trainer import LoraDropCallback
from loradrop_trainer.lora_layers import fresh_lora_a
from loradrop_trainer.plan import attached_plan
from loradrop_trainer.sharding import lora_state_dict

MAX_STEPS = 12
ALPHA = 0.25
SWITCH_STEP = math.ceil(ALPHA * MAX_STEPS)  # 3
AUTO = {"alpha": "auto", "auto_window": 0.02, "auto_min_overlap": 0.8, "max_alpha": 0.45}  # one-step windows
AUTO_EARLIEST, AUTO_LATEST = 4, math.ceil(0.45 * MAX_STEPS)  # three stable windows after the first; 6
SAVE_AT = (2, 5)  # one checkpoint before the switch, one after
EPOCH_STEPS = 2  # the `epoch` scenarios train on 32 rows: 2 ranks x 4 rows x 2 micro-batches = 16 rows a step
SAVING = {
    "epoch": {"save_strategy": "epoch"},
    "best": {
        "save_strategy": "best",
        "eval_strategy": "steps",
        "eval_steps": EPOCH_STEPS,
        "metric_for_best_model": "loss",
    },
    "load-best": {
        "save_strategy": "best",
        "eval_strategy": "steps",
        "eval_steps": EPOCH_STEPS,
        "metric_for_best_model": "earliness",  # helpers.EarliestIsBest: the first evaluation is the best
        "greater_is_better": True,
        "load_best_model_at_end": True,
    },
}
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CLIPPING_NORM = 0.05  # the `clip` flag: gradient norms here are about 0.2, so clipping acts at every step
TRUNCATING = {**SHARING, "mode": "truncate", "dropped_rank": 1}  # the `trunc` flag


def drop_settings(flags: list[str]) -> dict:
    """The LoraDropConfig fields a variant's flags choose (besides alpha, restart and shared_init); `resid` scores
    with score="residual" and `act` truncates with truncation="activation" (both mode "truncate")."""
    if "trunc" not in flags:
        return SHARING
    return {
        **TRUNCATING,
        **({"score": "residual"} if "resid" in flags else {}),
        **({"truncation": "activation"} if "act" in flags else {}),
    }


def deepspeed_config(stage: int, ds_optimizer: bool) -> dict:
    """The recipe's config as a user launches it (recipes/ds_zero{1,2,3}.json; ZeRO-1 is derived from ZeRO-2).

    `ds_optimizer` adds DeepSpeed's own AdamW section (`torch_adam`: the fused and CPU Adam kernels need compiling);
    without it the Trainer creates its torch optimizer and DeepSpeed wraps it (a "client" optimizer). Under ZeRO-3 no
    Parameter is kept whole ("persistent"): the recipe's "auto" threshold would keep these tiny LoRA weights whole on
    every rank, and the partitioned case (weights empty outside their module's forward) is the one to test.
    """
    config = json.loads((RECIPES / f"ds_zero{max(stage, 2)}.json").read_text())
    zero = config["zero_optimization"]
    zero["stage"] = stage
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if ds_optimizer:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        }
    return config


class SaveAt(TrainerCallback):
    """Asks for a checkpoint at the given steps. Listed before LoraDropCallback, which must see `should_save`."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class LocalTotals(TrainerCallback):
    """Reads this rank's importance totals at the switch step, just before LoraDropCallback all-reduces them."""

    def __init__(self, drop: LoraDropCallback):
        self.drop = drop
        self.totals: dict[str, float] | None = None
        self.grams: dict[str, list[float]] | None = None  # score "residual"

    def on_step_end(self, args, state, control, **kwargs):
        collector = self.drop._collector
        if collector is not None and state.global_step == self.drop._switch_step:
            self.totals, self.grams = collector.totals(), collector.grams()


class BeforeSwitch(TrainerCallback):
    """Listed before LoraDropCallback, in mode "truncate": at the step the switch comes at, records every LoRA tensor,
    its fp32 master under DeepSpeed and every module's scaling, as the switch finds them (collectives: every rank)."""

    def __init__(self, drop: LoraDropCallback, deepspeed: bool):
        self.drop = drop
        self.deepspeed = deepspeed
        self.record: dict = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.drop.config.mode != "truncate" or self.drop._collector is None:
            return
        if state.global_step != self.drop._switch_step:
            return
        layers, adapter = self.drop._layers, self.drop.config.adapter_name
        self.record["lora"] = lora_tensors(model)
        self.record["scaling"] = {name: layer.scaling[adapter] for name, layer in layers.items()}
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            self.record["masters"] = {
                f"{name}.{part}.weight": safe_get_full_fp32_param(getattr(layer, part)[adapter].weight).clone()
                for name, layer in layers.items()
                for part in ("lora_A", "lora_B")
            }


class Probe(TrainerCallback):
    """Listed after LoraDropCallback: records what the switch left behind, on every rank."""

    def __init__(self, drop: LoraDropCallback, deepspeed: bool, snapshot_at: int | None = None):
        self.drop = drop
        self.deepspeed = deepspeed
        self.snapshot_at = snapshot_at  # a step whose LoRA tensors to record (a checkpoint's, to compare with)
        self.before: dict[str, nn.Parameter] = {}
        self.record: dict = {"orphan_grads": [], "orphans_checked": 0}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Taken after LoraDropCallback.on_train_begin: on a resume after the switch the model is re-tied already.
        self.before = {n: p for n, p in model.named_parameters() if "lora_" in n}
        self.record["resumed_from_step"] = state.global_step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Under DDP the orphaned Parameters (owned by dropped modules before they were tied) must get no gradient.
        if self.drop.plan is None or self.deepspeed:
            return
        live = {id(p) for p in model.parameters()}
        orphans = [n for n, p in self.before.items() if id(p) not in live]
        self.record["orphans_checked"] += len(orphans)
        self.record["orphan_grads"] += [n for n in orphans if self.before[n].grad is not None]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.snapshot_at:
            self.record["snapshot_lora"] = lora_tensors(model)
        plan = self.drop.plan
        if plan is not None and state.global_step == plan.step and "switch_lora" not in self.record:
            self.record["switch_lora"] = lora_tensors(model)
            self.record["lr_after_switch"] = optimizer.param_groups[0]["lr"]
            if plan.mode == "share":
                self.record["shared_state"] = self._shared_state(optimizer, plan)
            if plan.mode == "truncate":
                self.record["truncated_state"] = self._truncated_state(optimizer, plan)
                self.record["switch_scaling"] = {
                    n: layer.scaling[plan.adapter_name] for n, layer in self.layers.items()
                }

    @property
    def layers(self) -> dict:
        return self.drop._layers

    def _shared_state(self, optimizer, plan) -> dict:
        """Module weight, fp32 master and Adam moments of every shared pair, right after the switch."""
        out = {}
        for kind, members in plan.shared.items():
            for part in ("lora_A", "lora_B"):
                param = getattr(self.layers[members[0]], part)[plan.adapter_name].weight
                entry = self._optimizer_state(param, optimizer)
                entry["tied"] = all(getattr(self.layers[n], part)[plan.adapter_name].weight is param for n in members)
                out[f"{kind}.{part}"] = entry
        return out

    def _truncated_state(self, optimizer, plan) -> dict:
        """Module weight, fp32 master and Adam moments of every truncated module's A and B, right after the switch."""
        return {
            f"{name}.{part}.weight": self._optimizer_state(
                getattr(self.layers[name], part)[plan.adapter_name].weight, optimizer
            )
            for name in plan.dropped
            for part in ("lora_A", "lora_B")
        }

    def _optimizer_state(self, param, optimizer) -> dict:
        """`param`'s whole weight, and its fp32 master and Adam moments (DeepSpeed) or the moments the torch optimizer
        holds for it (absent when it holds none). Collectives where sharded: every rank runs this, in the same order."""
        entry = {"weight": whole(param)}
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            entry["master"] = safe_get_full_fp32_param(param).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = safe_get_full_optimizer_state(param, key).clone()
            entry["fragments_live"] = _fragments_are_live(param, optimizer)
        else:
            inner = getattr(optimizer, "optimizer", optimizer)
            state = inner.state.get(param) or {}
            entry["state_keys"] = sorted(state)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    entry[key] = whole(state[key])
        return entry


def _fragments_are_live(param, optimizer) -> bool:
    """Whether the fp32 master and Adam moments DeepSpeed's setters write for `param` (on this rank) are views of
    the tensors its optimizer actually steps, and not of copies left over from before a checkpoint load."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:  # no fragment of this parameter lives in this rank's partition
        return True
    basic = getattr(optimizer, "optimizer", optimizer).optimizer  # accelerate wrapper -> ZeRO optimizer -> torch
    live = {p.untyped_storage().data_ptr() for group in basic.param_groups for p in group["params"]}
    live |= {t.untyped_storage().data_ptr() for st in basic.state.values() for t in st.values() if torch.is_tensor(t)}
    fragments = [mapping.hp_fragment, *mapping.optim_fragment.values()]
    return len(mapping.optim_fragment) >= 2 and all(t.untyped_storage().data_ptr() in live for t in fragments)


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """Every LoRA tensor by PEFT key (tied ones under each of their names), whole, as float32 copies.

    Gathers sharded (ZeRO-3, FSDP2) weights: every rank calls it at the same point."""
    return {key: t.detach().float().clone() for key, t in lora_state_dict(model, "default")[0].items()}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `tensor`, gathered when ZeRO-3 partitions it or FSDP2 shards it (then a collective)."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().float().clone()
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor().detach().float()
    return tensor.detach().float().clone()


def expected_fresh_a(record: dict, plan, seed: int) -> dict[str, torch.Tensor]:
    """What the switch draws for each kind's shared A with shared_init="fresh" (as PEFT initialises A), to check
    the switch against: one generator seeded with `seed`, kinds in plan order."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for kind in plan.shared:
        out[kind] = torch.empty(record["shared_state"][f"{kind}.lora_A"]["weight"].shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(out[kind], a=math.sqrt(5), generator=generator)
    return out


def restart_draws(model, seed: int) -> dict[str, torch.Tensor]:
    """The A every LoRA module draws when restart=True re-initialises the adapter (in model order, as PEFT does)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: fresh_lora_a(
            getattr(module.lora_A["default"].weight, "ds_shape", None) or module.lora_A["default"].weight.shape,
            generator,
        )
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def run_training(variant: str, scenario: str, out: Path) -> dict:
    backend, *flags = variant.split("-")
    deepspeed = backend != "ddp"
    shared_init = "fresh" if "fresh" in flags else "most_important"
    settings = {"restart": "restart" in flags, **(AUTO if "auto" in flags else {"alpha": ALPHA})}
    if scenario == "drop":
        drop = LoraDropCallback(save_plot=False, **{**SHARING, "mode": "drop"}, **settings)
    else:
        drop = LoraDropCallback(shared_init=shared_init, save_plot=False, **drop_settings(flags), **settings)
    local = LocalTotals(drop)
    before_switch = BeforeSwitch(drop, deepspeed)
    probe = Probe(drop, deepspeed, snapshot_at=EPOCH_STEPS if scenario == "load-best" else None)
    saving = SAVING.get(scenario) or SAVING.get(scenario.split("-")[0]) or {"save_strategy": "no"}
    args = TrainingArguments(
        output_dir=str(out / scenario),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        weight_decay=0.01,
        max_steps=MAX_STEPS,
        lr_scheduler_type="linear",
        warmup_steps=0,  # importance is 0 while B is 0: step 1 must already move B
        logging_steps=4,
        **saving,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        bf16="bf16" in flags,
        max_grad_norm=CLIPPING_NORM if "clip" in flags else 1.0,
        activation_checkpointing=scenario == "ckpt",
        ddp_backend="gloo",
        deepspeed=deepspeed_config(int(backend[-1]), "dsopt" in flags) if deepspeed else None,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=TokenDataset(n=32 if scenario.startswith("epoch") else 64),
        eval_dataset=TokenDataset(n=8, seed=1) if "eval_strategy" in saving else None,
        callbacks=[SaveAt(SAVE_AT if scenario == "full" else ()), local, before_switch, drop, probe, EarliestIsBest()],
    )
    resume = {
        "after": f"full/checkpoint-{SAVE_AT[1]}",
        "before": f"full/checkpoint-{SAVE_AT[0]}",
        "epoch-before": f"epoch/checkpoint-{EPOCH_STEPS}",
        "best-before": f"best/checkpoint-{EPOCH_STEPS}",
    }.get(scenario)
    trainer.train(resume_from_checkpoint=str(out / resume) if resume else None)
    model = trainer.model
    record = {**probe.record, **({"before_switch": before_switch.record} if before_switch.record else {})}
    if scenario == "full" and drop.plan is not None:
        # Every rank calls it, as after trainer.save_model(); rank 0 writes.
        record["compact"] = str(save_compact(model, out / "full-compact"))
    record.update(
        plan=drop.plan.to_dict() if drop.plan is not None else None,
        local_totals=local.totals,
        local_grams=local.grams,
        final_lora=lora_tensors(model),
        global_step=trainer.state.global_step,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        grad_norms=[h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
        find_unused_parameters=getattr(trainer.model_wrapped, "find_unused_parameters", None),
        wrapped=type(trainer.model_wrapped).__name__,
        optimizer=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        lora_dtype=str(next(p.dtype for n, p in model.named_parameters() if "lora_" in n)),
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        plan_on_model=attached_plan(model)[0] is not None,
        lora_params=(drop.lora_params_before, drop.lora_params_after),
    )
    if drop.plan is not None and "restart" in flags:
        record["expected_restart_a"] = restart_draws(model, args.seed + drop.plan.step)
    if drop.plan is not None and shared_init == "fresh" and "shared_state" in record:
        record["expected_fresh_a"] = expected_fresh_a(record, drop.plan, args.seed + drop.plan.step)
    return record


def reset_accelerate() -> None:
    """Let the next Trainer in this process configure accelerate afresh (another DeepSpeed config), same group."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def run_all(run_one: Callable[[str, str, Path], dict]) -> None:
    """Run every `--runs` variant/scenario in turn in this process with `run_one`; each rank saves its records."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True, help="comma-separated variant/scenario, e.g. zero2-bf16/full")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    for run in opts.runs.split(","):
        variant, _, scenario = run.rpartition("/")
        out = Path(opts.out) / variant
        out.mkdir(parents=True, exist_ok=True)
        try:
            record = run_one(variant, scenario, out)
        except Exception:
            record = {"exception": traceback.format_exc()}
        record["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        torch.save(record, out / f"{scenario}.rank{rank}.pt")
        if "exception" in record:
            print(record["exception"], file=sys.stderr, flush=True)
            break
        reset_accelerate()
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    run_all(run_training)
