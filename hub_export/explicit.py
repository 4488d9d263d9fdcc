"""A PEFT config whose module patterns every reader of compact adapters accepts, for the adapter of a trained model.

Readers hold the regular expressions of an adapter's config to a subset whose matching time is bounded
(`validate.check_patterns`): an untrusted pattern such as "(a+)+" can take hours to match one module name. A user's
own pattern can fall outside that subset without being hostile (``^(?!.*vision).*\\.layers\\.\\d+\\..*_proj$`` has
four repetitions), and training with it works. Refusing it at export would lose the run's result at its very end, so
the writers replace such patterns with what they selected: the names of the LoRA modules, and the rank and
`lora_alpha` of each module whose own differs from `r` / `lora_alpha`, under a key that names only that module. PEFT
builds the same model from either config; an adapter whose patterns pass is written as PEFT wrote it.

What each module got is read off what PEFT built, never by matching the refused patterns (a PEFT directory being
compacted is as untrusted as any adapter): the trained model's layers (`save_compact`), or the stored weights' shapes
and an `alpha_pattern` that passes the check on its own (`compact_peft_adapter`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from transformers.utils import logging

from loradrop_trainer.peft_keys import PEFT_PREFIX
from loradrop_trainer.plan import DropPlan

from .errors import CompactFormatError
from .truncation import recorded_alpha_keys
from .validate import MAX_REPEATS, check_counts, check_patterns, matched_keys_only

logger = logging.get_logger(__name__)

# Fields that select modules by pattern and have no meaning once `target_modules` names every module.
_SELECTING = ("exclude_modules", "layers_to_transform", "layers_pattern")


def spelled_out(
    peft_config: Mapping[str, Any],
    plan: DropPlan,
    where: str,
    settings: Callable[[], Mapping[str, tuple[Any, Any]]],
) -> dict[str, Any]:
    """`peft_config` as it is when readers accept its patterns, else with them replaced by the modules they selected.

    Args:
        peft_config: the adapter's PEFT config, as written (`adapter_config_dict`), with loradrop's recorded
            `alpha_pattern` entries first.
        plan: the run's plan, whose truncated modules keep loradrop's `alpha_pattern` entries.
        where: names the adapter in the warning, and in the error for a pattern names cannot replace
            (`modules_to_save`).
        settings: gives `{module: (rank, lora_alpha)}` for every LoRA module of the adapter, what PEFT gave it, without
            matching the config's patterns. Every one, not only the plan's: a run may prune some of them
            (`LoraDropConfig(target=..., exclude=...)`), and the others are LoRA all the same.

    Pattern keys that match none of the modules are left out either way: PEFT never uses them, and readers refuse
    them (`validate.check_entries`).
    """
    selected = settings()
    try:
        check_counts(peft_config, selected, where)
        check_patterns(peft_config, where)
    except CompactFormatError:
        pass  # spelled out below
    else:
        return matched_keys_only(peft_config, selected)
    r, lora_alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    ours = recorded_alpha_keys(plan)
    alpha_pattern = {key: value for key, value in (peft_config.get("alpha_pattern") or {}).items() if key in ours}
    rank_pattern = {}
    for name, (rank, alpha) in selected.items():
        key = re.escape(name.removeprefix(PEFT_PREFIX))
        if rank != r:
            rank_pattern[key] = rank
        if alpha != lora_alpha:
            alpha_pattern[key] = alpha
    explicit = {
        **peft_config,
        **dict.fromkeys(_SELECTING),
        "target_modules": sorted(name.removeprefix(PEFT_PREFIX) for name in selected),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    check_counts(explicit, selected, where)
    check_patterns(explicit, where)  # what names cannot replace (modules_to_save) is refused as before
    logger.warning(
        f"LoRA-drop: the PEFT config of {where} selects modules with regular expressions that readers of compact "
        f"adapters refuse (more than {MAX_REPEATS} repetitions, repetitions of more than one character, or more "
        "entries than its modules need: untrusted, such patterns can take hours to match). It records instead the "
        f"{len(selected)} LoRA modules by name (target_modules), with the ranks and lora_alpha that differ from r and "
        "lora_alpha (rank_pattern, alpha_pattern); PEFT builds the same model from it."
    )
    return explicit
