"""restart=True: the paper's two-stage protocol inside one Trainer run.

The paper measures importance in a separate pass over a sample of the data and then trains the pruned LoRA from
scratch. With restart, the first alpha of the steps play that pass, and at the switch the re-parameterised adapter
gets the state a fresh run would start from:

- every LoRA (each kept module's and each kind's shared pair) is drawn again as PEFT draws it (A by
  `init_lora_weights`, B zero), in model order from a generator seeded identically on every rank; PEFT's
  `modules_to_save` copies (a classifier head) go back to the base model's weights;
- the optimizer forgets their state (with DeepSpeed's optimizers the moments; a step count kept per parameter group
  goes on);
- the learning-rate schedule starts again: the warm-up and decay of the run's `lr_scheduler_type`, over the steps
  that are left.

The Trainer's scheduler object stays, since the Trainer, accelerate and DeepSpeed hold it and checkpoints save it:
its `lr_lambdas` are wrapped so that from the switch on they follow a schedule built for the remaining steps. The
wrapper is a plain function, which `LambdaLR.state_dict` does not save, so a checkpoint holds what it would hold
without restart; resuming wraps again (in `on_train_begin`) before the next step, and continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainingArguments, get_scheduler

from .lora_layers import fresh_lora_a, named_modules
from .plan import DropPlan
from .reparam import set_values
from .sharding import parameter_engine

RESTARTABLE_INITS = (True, "gaussian")


def check_restartable(model: nn.Module, adapter_name: str, scheduler: object) -> None:
    """Refuse, before the first step, what restart could not make fresh again."""
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    init = getattr(peft_config, "init_lora_weights", True)
    if init not in RESTARTABLE_INITS:
        raise ValueError(
            f"LoraDropConfig(restart=True) re-initialises the LoRA weights at the switch, which it can do for "
            f"init_lora_weights in {RESTARTABLE_INITS}; this adapter uses {init!r} (data- or weight-dependent). Use "
            "restart=False, or LoraConfig(init_lora_weights=True)."
        )
    other = [
        name
        for name, layer in named_modules(model)
        if isinstance(layer, LoraLayer)
        and (
            adapter_name in getattr(layer, "lora_embedding_A", {})
            or layer.lora_variant.get(adapter_name) is not None
            or (adapter_name in layer.lora_B and layer.lora_B[adapter_name].bias is not None)
        )
    ]
    if other:
        raise ValueError(
            f"LoraDropConfig(restart=True) re-initialises plain LoRA on linear layers; adapter {adapter_name!r} also "
            f"has {len(other)} other LoRA modules (first: {other[0]}; DoRA, lora_bias or embedding LoRA). Use "
            "restart=False, or a plain LoRA adapter."
        )
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save]
    if heads and parameter_engine(p for m in heads for p in m.parameters()) != "replicated":
        raise ValueError(
            "LoraDropConfig(restart=True) resets PEFT's modules_to_save copies (a classification head) to the base "
            "model's weights, which it cannot do where they are sharded (FSDP2, DeepSpeed ZeRO-3). Use restart=False, "
            "or DDP / ZeRO-1/2."
        )
    if scheduler is not None and not isinstance(_lambda_scheduler(scheduler), LambdaLR):
        raise ValueError(
            f"LoraDropConfig(restart=True) restarts the learning-rate schedule, which it can do for the Trainer's "
            f"own schedules (a LambdaLR); this run uses {type(_lambda_scheduler(scheduler)).__name__}. Use "
            "restart=False, or a TrainingArguments.lr_scheduler_type other than 'reduce_lr_on_plateau' and no "
            "scheduler in the DeepSpeed config."
        )


def restart_adapter(model: nn.Module, plan: DropPlan, optimizer: torch.optim.Optimizer | None, seed: int) -> None:
    """Give every LoRA of the re-parameterised model, and its optimizer state, the values of a fresh PEFT model.

    A is drawn once per LoRA layer of the adapter, in model order, as PEFT does when it builds the model; each kept
    module takes its own draw and every member of a shared group the draw of the group's first module (whether the
    group is tied in place or by its gradients), B is zero. Modules switched off (mode "drop") keep their zero B.

    Args:
        model: the PeftModel, re-parameterised by `plan`.
        plan: the applied plan.
        optimizer: the Trainer's optimizer (torch or DeepSpeed), or None.
        seed: seeds the generator of A; the same on every rank.
    """
    adapter = plan.adapter_name
    init = getattr(getattr(model, "peft_config", {}).get(adapter), "init_lora_weights", True)
    layers = {name: m for name, m in named_modules(model) if isinstance(m, LoraLayer) and adapter in m.lora_A}
    generator = torch.Generator().manual_seed(seed)
    draws = {name: fresh_lora_a(_shape(m.lora_A[adapter].weight), generator, init) for name, m in layers.items()}
    values: dict[nn.Parameter, torch.Tensor] = {}
    for name, layer in layers.items():
        source = plan.source_of(name)
        if source is None:
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        values[a] = draws[source]
        values[b] = torch.zeros(_shape(b), dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            original = dict(module.original_module.named_parameters())
            for name, param in module.modules_to_save[adapter].named_parameters():
                values[param] = original[name].detach().to(torch.float32, copy=True)
    set_values(list(values.items()), optimizer)


def scheduler_step(scheduler: object) -> int:
    """How many times the Trainer's scheduler has stepped (its `last_epoch`)."""
    return _lambda_scheduler(scheduler).last_epoch


def restart_schedule(scheduler: object, args: TrainingArguments, offset: int, remaining: int) -> None:
    """From scheduler step `offset` on, follow the run's schedule afresh over `remaining` steps.

    Sets the learning rate of the next optimizer step at once (the first of the new schedule: the start of its
    warm-up). Idempotent, which resuming relies on.
    """
    inner = _lambda_scheduler(scheduler)
    template = get_scheduler(
        args.lr_scheduler_type,
        optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
        num_warmup_steps=args.get_warmup_steps(remaining),
        num_training_steps=remaining,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    after = template.lr_lambdas[0]
    inner.lr_lambdas = [_restarted(getattr(fn, "before_restart", fn), after, offset) for fn in inner.lr_lambdas]
    learning_rates = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, learning_rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


def _restarted(before: Callable[[int], float], after: Callable[[int], float], offset: int) -> Callable[[int], float]:
    def lr_lambda(step: int) -> float:
        return after(step - offset) if step >= offset else before(step)

    lr_lambda.before_restart = before
    return lr_lambda


def _shape(weight: nn.Parameter) -> torch.Size:
    """A weight's full shape (DeepSpeed ZeRO-3 keeps it aside while the Parameter holds a partition)."""
    return torch.Size(getattr(weight, "ds_shape", None) or weight.shape)


def _lambda_scheduler(scheduler: object) -> object:
    """The torch scheduler inside accelerate's AcceleratedScheduler (or the scheduler itself)."""
    return getattr(scheduler, "scheduler", scheduler)
