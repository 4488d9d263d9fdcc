"""Where the LoRA Parameters live: whole on every rank, or sharded by FSDP2 or DeepSpeed ZeRO-3.

The tying scheme depends on it. Replicated Parameters (one process, DDP, DeepSpeed ZeRO-1/2, and FSDP2 models whose
PEFT adapter was attached after sharding) are tied in place: members of a shared group hold the very same Parameter.
Sharded Parameters cannot be: FSDP2 replaces every Parameter of a sharded module by a `DTensor` shard and swaps in
unsharded copies only around the module's forward and backward, and ZeRO-3 keeps only a flat partition of each
Parameter per rank (`ds_tensor`), gathering it inside the module's forward. So there, members keep their own
Parameters and their gradients are tied instead (`grad_tying.GradientTying`).

The engine is read off the Parameters themselves rather than off the launcher's settings: that is what the Trainer,
accelerate, `from_pretrained(distributed_config=...)` and a hand-written loop all have in common.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist
from peft import get_peft_model_state_dict
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

Engine = Literal["replicated", "fsdp2", "zero3"]


def is_fsdp2_parameter(param: torch.Tensor) -> bool:
    """An FSDP2 (`fully_shard`) sharded Parameter: a DTensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def is_zero3_parameter(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned Parameter (`ds_id` is what DeepSpeed's own `safe_*` utilities check)."""
    return hasattr(param, "ds_id")


def parameter_engine(params: Iterable[torch.Tensor]) -> Engine:
    """How `params` are held; all of them must be held the same way."""
    engines = {_engine_of(p) for p in params}
    if len(engines) > 1:
        raise ValueError(
            f"The LoRA Parameters are held in several ways at once ({sorted(engines)}): some are sharded and some "
            "are not. Shard the whole PEFT model (apply fully_shard after get_peft_model, or let the Trainer do it)."
        )
    return engines.pop() if engines else "replicated"


def is_deepspeed_optimizer(optimizer: object) -> bool:
    """Whether `optimizer` (looked through accelerate's wrapper by the caller) is DeepSpeed's ZeRO optimizer, which
    keeps fp32 masters and moments in flat partitions that only its `safe_get/set_*` utilities reach."""
    return type(optimizer).__module__.startswith("deepspeed.")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole Parameter on any engine (a ZeRO-3 Parameter's `numel()` is its empty placeholder's)."""
    return getattr(param, "ds_numel", None) or param.numel()


def _engine_of(param: torch.Tensor) -> Engine:
    if is_fsdp2_parameter(param):
        return "fsdp2"
    if is_zero3_parameter(param):
        return "zero3"
    return "replicated"


def check_fsdp_version(fsdp_config: dict | None, model: nn.Module) -> None:
    """Refuse FSDP1 before the first step: it flattens a module's Parameters into one, which neither tying survives.

    Args:
        fsdp_config: `TrainingArguments.fsdp_config` when the Trainer shards (`TrainingArguments.fsdp` set), else None.
        model: the model the Trainer trains; once wrapped by FSDP1 it holds `FullyShardedDataParallel` modules.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    requested = fsdp_config is not None and int(fsdp_config.get("version", 2)) == 1
    if requested or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "LoraDropCallback does not support FSDP1 (FullyShardedDataParallel): it flattens each wrapped module's "
            "Parameters into one, so LoRA modules can neither share Parameters nor have their gradients tied. Use "
            "FSDP2, the Trainer's default version: TrainingArguments(fsdp=True, fsdp_config={'version': 2, "
            "'reshard_after_forward': True}) (reshard_after_forward is FSDP2's full_shard)."
        )


def lora_state_dict(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The adapter's PEFT state dict (adapter name removed from the keys), whole, and whether it is the live model's.

    Replicated Parameters come back as they are: tied members are then the very same tensor, which exporters check.
    Sharded ones are gathered into CPU copies on every rank (a collective: call it on every rank, in the same order),
    only the LoRA Parameters and not the base model (gathering a full FSDP2 state dict would assemble the frozen
    7B base weights too, just to throw them away); gradient-tied members are then equal copies.

    Args:
        model: the PeftModel (the Trainer's `trainer.model`, not a DDP/DeepSpeed wrapper).
        adapter_name: the adapter to read.

    Returns:
        `(state dict, live)`: `live` is True when the tensors are the model's own (replicated Parameters).
    """
    named = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if "lora_" in name]
    if parameter_engine(p for _, p in named) == "replicated":
        # CheckpointWrapper's state_dict() drops the wrapper from its keys; PEFT before 0.22 matched them against the
        # wrapped module names, PEFT 0.22 against the unwrapped ones. Give PEFT the tensors under both.
        own = None
        if any(_CHECKPOINT_PREFIX in name for name, _ in named):
            tensors = [*model.named_buffers(), *model.named_parameters(remove_duplicate=False)]
            own = {key: t for name, t in tensors for key in (name, unwrapped_name(name))}
        state, live = get_peft_model_state_dict(model, state_dict=own, adapter_name=adapter_name), True
    else:
        gathered = dict(zip((name for name, _ in named), whole_tensors([p for _, p in named], cpu=True)))
        state, live = get_peft_model_state_dict(model, state_dict=gathered, adapter_name=adapter_name), False
    return {unwrapped_name(key): value for key, value in state.items()}, live


def whole_tensors(params: list[torch.Tensor], *, cpu: bool = False) -> list[torch.Tensor]:
    """The whole value of each Parameter, on any engine: itself (detached) when replicated, a gathered copy when FSDP2
    or ZeRO-3 shards it (a collective then: every rank calls it with the same Parameters, in the same order).

    Args:
        params: Parameters all held the same way; a Parameter may appear more than once (tied members).
        cpu: return CPU copies (what exporters write) rather than tensors on the Parameters' device.
    """
    engine = parameter_engine(params)
    if engine == "replicated":
        values = [p.detach() for p in params]
    elif engine == "fsdp2":
        values = [p.full_tensor().detach() for p in params]
    else:
        import deepspeed

        distinct = list({id(p): p for p in params}.values())
        with deepspeed.zero.GatheredParameters(distinct, modifier_rank=None):
            values = [p.detach().clone() for p in params]
    return [value.cpu() if cpu else value for value in values]


def unwrapped_name(name: str) -> str:
    """A module or Parameter name as in the unwrapped model: without the `_checkpoint_wrapped_module.` that activation
    checkpointing through torch's CheckpointWrapper (FSDP's, the Trainer's `fsdp_config`) puts below a wrapped layer.
    """
    return name.replace(_CHECKPOINT_PREFIX, "")


def is_writing_rank() -> bool:
    """Whether this process writes shared files: the only one, or rank 0 of a distributed run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
