"""What `save_pretrained` writes after the switch in mode "truncate": an adapter no engine can misread.

In training a truncated module keeps rank-r shapes and PEFT's rank-k scaling (`truncate.set_truncated_scaling`); the
PEFT config says so through an `alpha_pattern` entry (`truncate.record_truncation`). PEFT reads that entry, but vLLM
(`vllm/lora/peft_helper.py` has no such field) and llama.cpp (`convert_lora_to_gguf.py` reads `lora_alpha` alone)
scale the module by the config's `lora_alpha / r`, k/r of what it was trained with, silently. So once the plan is
applied, the model's `save_pretrained` (which `trainer.save_model()` and every checkpoint call, whatever engine gathered
the state dict) writes each truncated module's `lora_B` multiplied by `rank-k scaling / rank-r scaling` and a config
without loradrop's entries: every module is then scaled as the config's `lora_alpha / r` says, which every engine that
loads plain LoRA reads. PEFT computes the trained logits bit for bit when that factor is a power of two (`r / k`:
the default 8 / 1), to float32 rounding otherwise. The user's own `rank_pattern`, `alpha_pattern` and `use_rslora`
stay what they are, as in any PEFT adapter (`loradrop expand --for uniform` folds those too).

The model in memory is not changed: it trains as before. Only what the Trainer loads back from such a file must be
unfolded: on resume, the one-process and DDP Trainer restores the adapter file (`Trainer._load_from_checkpoint` ->
`load_adapter`), DeepSpeed and FSDP restore their own, unfolded, files, and `load_best_model_at_end` does the same.
So every checkpoint records, in the callback's state, the sum of squares of the truncated `lora_B` as the model held
them and as the file holds them (`saved_form`), and after a restore the weights are told apart by it
(`unfold_restored`): a model holding the file's values is unfolded (exactly, for a power-of-two factor, so a resumed
run stays bit-identical), one holding the model's is left alone, and one holding neither is refused.
"""

from __future__ import annotations

import math
import types

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.utils import logging

from .peft_keys import pattern_key
from .plan import DropPlan
from .sharding import parameter_engine
from .truncate import scaling_at_rank

logger = logging.get_logger(__name__)

# Relative difference within which a restored sum of squares is the recorded one (they are the same float32 values,
# summed in float64, perhaps on another device); the folded and unfolded sums differ by a factor of 2 at least.
_SAME_SUM = 1e-6


def fold_factors(layers: dict[str, LoraLayer], plan: DropPlan) -> dict[str, float]:
    """`{state dict key of a truncated module's lora_B: factor}`: its trained scaling over the one PEFT gives it from
    the config without loradrop's entries (the user's `lora_alpha` and rank for it); modules scaled as that config
    says already (factor 1) are left out."""
    adapter, factors = plan.adapter_name, {}
    for name in plan.truncated:
        layer = layers[name]
        written = scaling_at_rank(layer.lora_alpha[adapter], layer.r[adapter], layer.use_rslora.get(adapter, False))
        if layer.scaling[adapter] != written:
            factors[f"{name}.lora_B.{adapter}.weight"] = layer.scaling[adapter] / written
    return factors


def save_folded(model: nn.Module, layers: dict[str, LoraLayer], plan: DropPlan) -> None:
    """Make `model.save_pretrained` write the truncated modules folded (module docstring); idempotent.

    The method is bound on this instance only, with the factors kept on the model, so a `copy.deepcopy` of the model
    saves its own weights.

    Args:
        model: the PeftModel in training.
        layers: `{module name: LoRA layer}` of the plan's modules, the plan applied.
        plan: the plan in mode "truncate".
    """
    ours = {pattern_key(name) for name in plan.dropped}
    model.loradrop_fold = (plan.adapter_name, fold_factors(layers, plan), ours)
    model.save_pretrained = types.MethodType(save_pretrained, model)
    config = model.peft_config[plan.adapter_name]
    theirs = [field for field in ("rank_pattern", "alpha_pattern") if set(getattr(config, field)) - ours]
    if theirs or config.use_rslora:
        settings = " and ".join(theirs + (["use_rslora"] if config.use_rslora else []))
        logger.warning(
            f"LoRA-drop: the adapter trainer.save_model() writes keeps your LoraConfig's {settings}, as PEFT writes "
            "them; vLLM, SGLang and LoRAX ignore rank_pattern and alpha_pattern, and llama.cpp those and use_rslora. "
            "To serve it there, export it with `loradrop expand COMPACT DIR --for uniform`, which folds them."
        )


def save_pretrained(self: nn.Module, save_directory: str, *args, state_dict=None, **kwargs):
    """PEFT's `save_pretrained`, writing `self.loradrop_fold`'s modules folded and its alpha_pattern entries left out
    (`saved_form`); the state dict given (the Trainer gathers it under DeepSpeed and FSDP) or PEFT's own."""
    adapter, factors, ours = self.loradrop_fold
    state = self.state_dict() if state_dict is None else state_dict  # what PEFT reads when not given one
    folded = {key: value * factors[key] if key in factors else value for key, value in state.items()}
    config = self.peft_config[adapter]
    recorded = config.alpha_pattern
    config.alpha_pattern = {key: value for key, value in recorded.items() if key not in ours}
    try:
        return type(self).save_pretrained(self, save_directory, *args, state_dict=folded, **kwargs)
    finally:
        config.alpha_pattern = recorded


def stop_folding(model: nn.Module) -> None:
    """Give `model` its class's `save_pretrained` back (the model is plain LoRA again)."""
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop("loradrop_fold", None)


def saved_form(layers: dict[str, LoraLayer], plan: DropPlan) -> dict[str, float] | None:
    """What a checkpoint records to tell its adapter file's values from the model's: the sums of squares of the
    truncated `lora_B`, `{"model": as held, "file": as written}`. None where the LoRA is sharded (FSDP2, ZeRO-3: read
    on one rank it is partial, and their engines restore their own unfolded files)."""
    weights = _truncated_b(layers, plan)
    if not weights or parameter_engine(weights.values()) != "replicated":
        return None
    factors = fold_factors(layers, plan)
    return {
        "model": _sum_of_squares(weights.values()),
        "file": _sum_of_squares(weight * factors.get(key, 1.0) for key, weight in weights.items()),
    }


def unfold_restored(layers: dict[str, LoraLayer], plan: DropPlan, record: dict[str, float] | None, where: str) -> None:
    """After the Trainer restored `layers` from a checkpoint whose `saved_form` is `record`: divide the truncated
    `lora_B` by their factors if they hold the adapter file's values; leave them if they hold the model's.

    Args:
        layers: `{module name: LoRA layer}` of the plan's modules, the plan applied.
        plan: the checkpoint's plan.
        record: the checkpoint's `saved_form` (None: written before this existed, or sharded: nothing to undo).
        where: names the checkpoint in the error.
    """
    weights = _truncated_b(layers, plan)
    if not record or not weights or parameter_engine(weights.values()) != "replicated":
        return
    restored = _sum_of_squares(weights.values())
    if _same(restored, record["model"]):
        return
    if not _same(restored, record["file"]):
        raise ValueError(
            f"LoRA-drop: the LoRA weights restored from {where} are neither those the model held when it was saved "
            f"nor those of its adapter file (sum of squares of the truncated modules' lora_B {restored:.6g}, recorded "
            f"{record['model']:.6g} and {record['file']:.6g}), so their scaling cannot be told. Resume from an "
            "unmodified checkpoint of this run."
        )
    factors = fold_factors(layers, plan)
    with torch.no_grad():
        for key, factor in factors.items():
            weights[key].div_(factor)


def _truncated_b(layers: dict[str, LoraLayer], plan: DropPlan) -> dict[str, nn.Parameter]:
    adapter = plan.adapter_name
    return {f"{name}.lora_B.{adapter}.weight": layers[name].lora_B[adapter].weight for name in plan.truncated}


def _sum_of_squares(tensors) -> float:
    return math.fsum(float(tensor.detach().double().square().sum()) for tensor in tensors)


def _same(value: float, recorded: float) -> bool:
    return math.isclose(value, recorded, rel_tol=_SAME_SUM)
