"""One rank of a 2-process LoRA-drop run on CPU under FSDP2 (`fully_shard`), or DDP for comparison, for
tests/test_distributed.py.

The Trainer applies no FSDP on a CPU (accelerate's FSDP plugin wants GPUs), while `fully_shard` itself runs on gloo.
So this worker shards the PEFT model with `fully_shard` (each decoder layer, then the whole model) and trains it with
a loop that fires the Trainer's callback events, through transformers' own `CallbackHandler`, in the order the
Trainer fires them (DESIGN.md §5): `on_train_begin`; per step `on_step_begin`, the micro-batches (gradient
synchronisation held back for all but the last, as accelerate's `no_sync` does), gradient clipping,
`on_pre_optimizer_step`, `optimizer.step()`, `on_optimizer_step`, `zero_grad`, `on_step_end`, then a checkpoint when
asked for. Checkpoints hold the full model and optimizer state dicts (`torch.distributed.checkpoint.state_dict`, as
accelerate saves FSDP2 runs), the PEFT adapter as `Trainer.save_model` writes it, and the callback's `state()`, which a
resume hands back the way the Trainer does (in `TrainerState.stateful_callbacks`, trainer_state.json).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/fsdp2_worker.py --out /tmp/run \
        --runs fsdp2/full,fsdp2/after,fsdp2/before,fsdp2-fresh/full,ddploop/full

Variants: `fsdp2` (LoRA sharded, gradient-tied), `ddploop` (the same loop with torch DDP: LoRA tied in place, the
reference for the FSDP2 run's export). Flags (`fresh`, `clip`, `trunc`) and scenarios (`full`, `after`, `before`) are
those of distributed_worker.py, and records have the same fields. Scenario `load-best` (FSDP2 only) ends the way the
Trainer's `load_best_model_at_end` does with a best checkpoint from before the switch: after the last step the engine
loads the model state of the checkpoint at step EPOCH_STEPS (as accelerate's `load_fsdp_model` does for FSDP2), then
`on_train_end` fires with that checkpoint as `state.best_model_checkpoint`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import (
    ALPHA,
    CLIPPING_NORM,
    EPOCH_STEPS,
    MAX_STEPS,
    SAVE_AT,
    BeforeSwitch,
    LocalTotals,
    Probe,
    SaveAt,
    drop_settings,
    expected_fresh_a,
    lora_tensors,
    run_all,
)
from helpers import TokenDataset, tiny_llama
from transformers import DefaultFlowCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from hub_export import save_compact
from loradrop_trainer import LoraDropCallback
from loradrop_trainer.plan import attached_plan

GRADIENT_ACCUMULATION = 2
BATCH = 4
STATE_FILE = "loop_state.pt"
TRAINER_STATE = "trainer_state.json"


def shard(model):
    """FSDP2 as accelerate applies it to a decoder: each layer, then the root."""
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def batches(data: TokenDataset, step: int, rank: int, world: int):
    """This rank's micro-batches of optimizer step `step` (0-based): a fixed order, the same on a resume."""
    for micro in range(GRADIENT_ACCUMULATION):
        start = ((step * GRADIENT_ACCUMULATION + micro) * world + rank) * BATCH % len(data)
        rows = [data[i] for i in range(start, start + BATCH)]
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def run(variant: str, scenario: str, out: Path) -> dict:
    backend, *flags = variant.split("-")
    args = TrainingArguments(
        output_dir=str(out / scenario),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        max_steps=MAX_STEPS,
        max_grad_norm=CLIPPING_NORM if "clip" in flags else 1.0,
        report_to=[],
        use_cpu=True,
        seed=0,
        ddp_backend="gloo",
        save_strategy="no",
        load_best_model_at_end=scenario == "load-best",
        disable_tqdm=True,
    )
    rank, world = args.process_index, args.world_size  # TrainingArguments set up the gloo process group
    peft_model = tiny_llama()
    if backend == "fsdp2":
        model = shard(peft_model)
    else:
        model = DistributedDataParallel(peft_model, find_unused_parameters=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
    init = "fresh" if "fresh" in flags else "most_important"
    drop = LoraDropCallback(alpha=ALPHA, shared_init=init, save_plot=False, **drop_settings(flags))
    probe = Probe(drop, deepspeed=False, snapshot_at=EPOCH_STEPS if scenario == "load-best" else None)
    saves = SAVE_AT if scenario == "full" and backend == "fsdp2" else ()  # the DDP loop is the reference run only
    if scenario == "load-best":
        saves = (EPOCH_STEPS,)
    before_switch = BeforeSwitch(drop, deepspeed=False)
    callbacks = [DefaultFlowCallback(), SaveAt(saves), LocalTotals(drop), before_switch, drop, probe]
    handler = CallbackHandler(callbacks, peft_model, None, optimizer, None)
    state, control = TrainerState(max_steps=MAX_STEPS), TrainerControl()
    resume = {"after": SAVE_AT[1], "before": SAVE_AT[0]}.get(scenario)
    if resume is not None:
        state = load_checkpoint(out / "full" / f"checkpoint-{resume}", peft_model, optimizer)
    state.is_world_process_zero = state.is_local_process_zero = rank == 0
    data = TokenDataset(n=64)
    grad_norms: list[float] = []

    control = handler.on_train_begin(args, state, control)
    for step in range(state.global_step, MAX_STEPS):
        control = handler.on_step_begin(args, state, control)
        micro_batches = list(batches(data, step, rank, world))
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            if backend == "fsdp2":
                model.set_requires_gradient_sync(last)
                (model(**batch).loss / GRADIENT_ACCUMULATION).backward()
            else:
                with model.no_sync() if not last else contextlib.nullcontext():
                    (model(**batch).loss / GRADIENT_ACCUMULATION).backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)))
        control = handler.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        control = handler.on_optimizer_step(args, state, control)
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        control = handler.on_step_end(args, state, control)
        if control.should_save:
            save_checkpoint(out / scenario / f"checkpoint-{state.global_step}", peft_model, optimizer, state, drop)
            control.should_save = False
    if scenario == "load-best":
        load_best_model(out / scenario / f"checkpoint-{EPOCH_STEPS}", peft_model, state)
    handler.on_train_end(args, state, control)

    record = {**probe.record, **({"before_switch": before_switch.record} if before_switch.record else {})}
    record.update(
        plan=drop.plan.to_dict() if drop.plan is not None else None,
        local_totals=callbacks[2].totals,
        local_grams=callbacks[2].grams,
        final_lora=lora_tensors(peft_model),
        global_step=state.global_step,
        grad_norms=grad_norms,
        wrapped=type(model).__name__,
        lora_dtype=str(next(p.dtype for n, p in peft_model.named_parameters() if "lora_" in n)),
        lora_class=type(next(p for n, p in peft_model.named_parameters() if "lora_" in n)).__name__,
        best_model_checkpoint=state.best_model_checkpoint,
        plan_on_model=attached_plan(peft_model)[0] is not None,
        lora_params=(drop.lora_params_before, drop.lora_params_after),
    )
    if scenario == "full" and drop.plan is not None:
        record["compact"] = str(save_compact(peft_model, out / "full-compact"))
    if drop.plan is not None and "fresh" in flags and "shared_state" in record:
        record["expected_fresh_a"] = expected_fresh_a(record, drop.plan, args.seed + drop.plan.step)
    return record


def save_checkpoint(directory: Path, model, optimizer, state: TrainerState, drop: LoraDropCallback) -> None:
    """Full (gathered) model and optimizer state, the adapter (as `Trainer.save_model` writes it, from the full state
    dict) and the callback's state, written by rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)  # a collective
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model_state, "optimizer": optimizer_state}, directory / STATE_FILE)
        model.save_pretrained(str(directory), state_dict=model_state)
        state.stateful_callbacks = {type(drop).__name__: drop.state()}
        state.save_to_json(str(directory / TRAINER_STATE))
    dist.barrier()


def load_best_model(directory: Path, model, state: TrainerState) -> None:
    """What `Trainer._load_best_model` does under FSDP2 at the end of training: the engine loads the checkpoint's model
    state (not the optimizer's) into the sharded model, and `state` names the checkpoint for `on_train_end`."""
    saved = torch.load(directory / STATE_FILE, weights_only=False)
    set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
    state.best_model_checkpoint = str(directory)
    state.best_global_step = int(directory.name.rsplit("-", 1)[1])
    dist.barrier()


def load_checkpoint(directory: Path, model, optimizer) -> TrainerState:
    saved = torch.load(directory / STATE_FILE, weights_only=False)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_state_dict(
        model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"], options=options
    )
    return TrainerState.load_from_json(str(directory / TRAINER_STATE))


if __name__ == "__main__":
    run_all(run)
