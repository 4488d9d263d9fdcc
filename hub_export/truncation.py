"""Truncated modules in the export: stored at their rank k, padded back to r, and the PEFT config entries that say how
PEFT scales them; for the modules a plan truncates (`DropPlan.truncated`, none unless its mode truncates).

In training a truncated module keeps the shapes of a rank-r LoRA (`loradrop_trainer.truncate`): `lora_A` holds its k
rows then zero rows, `lora_B` its k columns then zero columns, and the PEFT config's `alpha_pattern` gets an entry
(`pattern_key(name)`, placed first) whose `lora_alpha` makes PEFT scale the rank-r module as a rank-k one. So:

- a compact adapter stores only the leading k rows / columns (`stored_part`), after checking that the rest is exactly
  zero (`check_zero_block`): otherwise the weights do not come from the plan's run after its switch, and dropping
  that part would change what they compute;
- `load_compact` pads them back to r (`pad_to_rank`) and builds the model from the config without loradrop's
  `alpha_pattern` entries (`without_recorded_alpha`), so each layer holds the `lora_alpha` the user chose and
  `apply_plan` gives it the rank-k scaling, as in training;
- the plain PEFT adapter `expand_to_peft` writes is rank k for real: the stored tensors, and a config whose
  `rank_pattern` says k for those modules and whose `alpha_pattern` has loradrop's entries removed
  (`hub_export.modes.truncate`), so PEFT's own scaling, `lora_alpha / k`, is the trained one.

PEFT reads pattern keys as regular expressions and takes the first key that matches a module, so loradrop's entries
go first. PEFT's `save_pretrained` writes the keys sorted; loradrop's begin with a regular-expression comment that
sorts before the keys users write (`pattern_key`), and `recorded_alpha_first` puts them first again where one
does not (a key beginning `(.`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loradrop_trainer import DropPlan
from loradrop_trainer.peft_keys import LORA_SUFFIXES, PEFT_PREFIX, pattern_key

from .errors import PlanError


def truncated_keys(plan: DropPlan) -> dict[str, str]:
    """`{PEFT key: module name}` of the LoRA A and B weights of every module `plan` truncates."""
    return {name + suffix: name for name in plan.truncated for suffix in LORA_SUFFIXES}


def module_value(default: Any, pattern: Mapping[str, Any], module: str) -> Any:
    """The rank or `lora_alpha` PEFT gives the LoRA of `module` (a PEFT module name): its entry in `pattern`
    (`rank_pattern`, `alpha_pattern`), else `default` (`r`, `lora_alpha`).

    PEFT's own matching (`get_pattern_key`) decides which entry applies; it is imported only when there is a pattern,
    since importing PEFT takes seconds and reading most adapters (`loradrop inspect`) needs nothing else of it.
    """
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), module.removeprefix(PEFT_PREFIX)), default)


def rank_axis(key: str) -> int:
    """The axis of a LoRA weight that runs over the rank: rows of A (r, in), columns of B (out, r)."""
    return 0 if key.endswith(LORA_SUFFIXES[0]) else 1


def stored_part(key: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The leading `rank` rows (A) or columns (B) of a truncated module's weight: what a compact adapter stores."""
    return tensor.narrow(rank_axis(key), 0, rank)


def zero_block(key: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows (A) or columns (B) of a truncated module's weight past `rank`, which training keeps at zero."""
    axis = rank_axis(key)
    return tensor.narrow(axis, rank, tensor.shape[axis] - rank)


def pad_to_rank(key: str, tensor: torch.Tensor, r: int) -> torch.Tensor:
    """A stored rank-k weight zero-padded to rank `r`, as the trained model holds it."""
    shape = list(tensor.shape)
    shape[rank_axis(key)] = r
    out = torch.zeros(shape, dtype=tensor.dtype)
    stored_part(key, out, tensor.shape[rank_axis(key)]).copy_(tensor)
    return out


def numel_at_rank(key: str, tensor: torch.Tensor, r: int) -> int:
    """Elements of a stored rank-k weight at rank `r` (its size in the unpruned adapter)."""
    return tensor.numel() // tensor.shape[rank_axis(key)] * r


def check_zero_block(state: Mapping[str, torch.Tensor], plan: DropPlan) -> None:
    """Refuse weights in which a module `plan` truncates is not exactly zero past rank k (or has no rank above k).

    The callback cuts every truncated module to rank k at the switch and that part stays zero in training; a module
    with anything else there was saved before the switch (a checkpoint from before it, `load_best_model_at_end`
    going back to one), or by another run than the plan's, and storing its leading k ranks alone would change what it
    computes.
    """
    rank, keys, odd = plan.dropped_rank, truncated_keys(plan), []
    for key in keys:
        tensor = state.get(key)
        if tensor is None:
            continue  # a missing weight is reported by the mapping check, with the rest of the adapter's keys
        if tensor.dim() != 2 or tensor.shape[rank_axis(key)] <= rank:
            raise PlanError(
                f"The adapter does not match the plan (mode 'truncate'): {key!r} has shape {list(tensor.shape)}, "
                f"which is no LoRA weight of rank above the plan's dropped_rank {rank}. Pass the plan of the run that "
                "saved this adapter."
            )
        if zero_block(key, tensor, rank).any():
            odd.append(key)
    if odd:
        modules = {keys[key] for key in odd}
        raise PlanError(
            f"The adapter does not match the plan (mode 'truncate'): {odd[0]!r} is not zero past rank {rank}, yet "
            f"the plan truncates that module to rank {rank} ({len(modules)} of {len(plan.dropped)} truncated modules "
            f"hold such weights). LoraDropCallback cuts them to rank {rank} at the switch (step {plan.step}) and that "
            "part stays zero, so the adapter was saved before the switch (or by another run than the plan's) and "
            f"keeping rank {rank} of it would change what it computes. Compact a checkpoint saved after the switch, "
            "with the plan of the same run; an adapter from before the switch is a plain LoRA adapter, to use as it is."
        )


def refuse_kept_scaling(dropped_scaling: object, where: str) -> None:
    """Refuse a run trained with `LoraDropConfig(dropped_scaling="keep")`: the compact format rebuilds truncated
    modules at the rank-k scaling only, and a "keep" run's `trainer.save_model()` output needs no compacting to be
    served (a uniform LoRA, no patterns)."""
    if dropped_scaling == "keep":
        raise PlanError(
            f"{where} was trained with LoraDropConfig(dropped_scaling='keep'), which the compact format does not hold "
            "yet (it stores truncated modules at the rank-k scaling). Its trainer.save_model() output is already a "
            "plain LoRA with one scaling that PEFT, vLLM and llama.cpp load as trained: share that directory."
        )


def recorded_alpha_keys(plan: DropPlan) -> dict[str, str]:
    """`{alpha_pattern key: module name}` of the entries LoraDropCallback records for the truncated modules."""
    return {pattern_key(name): name for name in plan.truncated}


def without_recorded_alpha(peft_config: Mapping[str, Any], plan: DropPlan) -> dict[str, Any]:
    """`peft_config` without loradrop's `alpha_pattern` entries: PEFT then gives every module the `lora_alpha` the
    user chose, from which `apply_plan` computes the truncated scaling as the callback did."""
    ours = recorded_alpha_keys(plan)
    if not ours:
        return dict(peft_config)
    theirs = {key: value for key, value in (peft_config.get("alpha_pattern") or {}).items() if key not in ours}
    return {**peft_config, "alpha_pattern": theirs}


def recorded_alpha_first(peft_config: Mapping[str, Any], plan: DropPlan) -> dict[str, Any]:
    """`peft_config` with loradrop's `alpha_pattern` entries (those present) ahead of the user's, as the callback put
    them: PEFT takes the first key that matches, and its `save_pretrained` writes the keys sorted."""
    ours = recorded_alpha_keys(plan)
    pattern = peft_config.get("alpha_pattern")
    if not ours or not isinstance(pattern, dict):
        return dict(peft_config)
    first = {key: pattern[key] for key in ours if key in pattern}
    return {**peft_config, "alpha_pattern": {**first, **{k: v for k, v in pattern.items() if k not in first}}}
