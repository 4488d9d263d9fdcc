"""Compacting what an unmodified training script leaves behind: a plain PEFT adapter saved after the switch.

`trainer.save_model()` and every `checkpoint-N/` of a run with `LoraDropCallback` hold the plain PEFT adapter of the
re-parameterised model (every member of a shared group with its own copy of the same weights) and, next to it, the
callback's ``loradrop_plan.json``. Saving untied the copies, so the tying cannot be read off a model as
`save_compact` does; what can be checked is that each shared group's copies are still equal, which holds exactly
when the adapter was saved from the model that plan re-parameterised. In mode "drop" the callback zeroes every dropped
module's LoRA B at the switch, so the plain adapter computes what the pruned model did; a dropped module whose saved B
is not zero shows an adapter saved before the switch (or by another run), which dropping would change. In mode
"truncate" the callback cuts every truncated module to rank k, and the adapter either records its scaling in the PEFT
config's `alpha_pattern` (checkpoints of earlier versions) or carries it folded into lora_B (`save_pretrained` since
issue 30, `loradrop_trainer.saved_form`; unfolded here, `unfolded`): a truncated module that is not zero
past rank k, or a config with some of those entries but not all, shows the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from loradrop_trainer import DropPlan
from loradrop_trainer.peft_keys import LORA_SUFFIXES
from loradrop_trainer.report import PLAN_FILE
from loradrop_trainer.truncate import alpha_at_rank, scaling_at_rank

from .atomic import atomic_directory, check_disjoint
from .base_model import warn_if_local, with_base_model
from .compact import write_compact
from .errors import CompactFileNotFoundError, CompactFormatError, PlanError
from .explicit import spelled_out
from .files import has_member, read_member
from .format import COMPACT_LAYOUT, CompactAdapter, check_config_types
from .jsonfile import MAX_JSON_BYTES, parse_json_object
from .modes import export_mode
from .plans import PlanSource, read_plan
from .truncation import (
    module_value,
    recorded_alpha_first,
    recorded_alpha_keys,
    refuse_kept_scaling,
    without_recorded_alpha,
)
from .tying import group_by_plan
from .validate import (
    check_adapter,
    check_counts,
    check_lora_fields,
    check_names,
    check_patterns,
    check_weights,
    lora_config,
)

logger = logging.get_logger(__name__)

_UNEQUAL = (
    "The adapter does not match the plan: {key!r} differs from {source!r}, whose LoRA the plan says it shares. The "
    "adapter was saved before the switch (or by another run than the plan's); compact a checkpoint saved after it, "
    "with the plan of the same run."
)


def compact_peft_adapter(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    plan: PlanSource = None,
    *,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the compact adapter of a plain PEFT adapter saved after the LoRA-drop switch; return `out_dir`.

    `load_compact(base, out_dir)` then gives the trained model's logits exactly.

    Args:
        peft_dir: a plain PEFT adapter directory (`trainer.save_model()`'s output, a `checkpoint-N/`).
        out_dir: where the compact adapter goes: missing, empty, or an earlier compact adapter (nothing but its
            files); a folder inside `peft_dir` (``out/compact``) is fine, `peft_dir` itself or a folder around it
            is not.
        plan: the run's plan (a `DropPlan`, a plan file's payload, or a path); default: the
            ``loradrop_plan.json`` in `peft_dir`, which the callback writes into every checkpoint after the switch.
        license: an SPDX licence id for the model card.
        base_model: the base model's Hub id ("org/name"), recorded in place of the path the training script
            loaded it from (see `hub_export.base_model`).
    """
    source = Path(peft_dir)
    if not source.is_dir():
        raise CompactFileNotFoundError(f"{source} is not a directory; pass the directory of a plain PEFT adapter.")
    _check_target(source, Path(out_dir))
    if not any(has_member(source, name) for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise CompactFileNotFoundError(_no_adapter(source))
    if plan is None and not has_member(source, PLAN_FILE):
        raise CompactFileNotFoundError(_no_plan(source))
    drop_plan, extra = read_plan(source if plan is None else plan)
    check_names(drop_plan.kinds, f"the plan for {source}")  # before any pattern is matched against them
    _check_adapter_name(source, drop_plan, source / PLAN_FILE if plan is None else plan)
    if license is not None:
        extra["license"] = license
    config = parse_json_object(
        read_member(source, CONFIG_NAME, MAX_JSON_BYTES),
        source / CONFIG_NAME,
        invalid=CompactFormatError,
        what="export it again.",
    )
    check_config_types(config, source / CONFIG_NAME)
    where = f"the adapter at {source}"
    weights = _read_weights(source)
    check_weights(weights, where)  # before comparing copies: NaN differs even from itself
    dropped_scaling = (extra.get("config") or {}).get("dropped_scaling")
    refuse_kept_scaling(dropped_scaling, f"The adapter at {source}")
    weights, config = unfolded(weights, config, drop_plan)
    mode = export_mode(drop_plan)
    mode.check_saved(weights, drop_plan)
    tying = group_by_plan(weights, drop_plan, same=torch.equal, differs=_UNEQUAL)  # checks truncated zero blocks
    peft_config = recorded_alpha_first(
        with_base_model({**config, "inference_mode": True}, base_model, near=source), drop_plan
    )
    peft_config = spelled_out(peft_config, drop_plan, where, lambda: _stored_settings(weights, peft_config, drop_plan))
    mode.check_config(lora_config(peft_config, f"The PEFT config of {where}"), drop_plan, where, PlanError)
    adapter = CompactAdapter(
        adapter_name=drop_plan.adapter_name,
        plan=drop_plan,
        plan_extra=extra,
        peft_config=peft_config,
        tensors=tying.tensors,
        members=tying.members,
        dropped=tying.dropped,
    )
    check_adapter(adapter, where)
    warn_if_local(adapter.peft_config, f"The compact adapter in {out_dir}")
    with atomic_directory(out_dir, COMPACT_LAYOUT) as staging:
        write_compact(adapter, staging)
    logger.info(
        f"LoRA-drop: compact adapter of {source} written to {out_dir} ({adapter.stored_bytes:,} of "
        f"{adapter.plain_bytes:,} bytes)."
    )
    return Path(out_dir)


def unfolded(
    weights: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], plan: DropPlan
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A saved adapter in the form the compact adapter describes: unchanged if its config has loradrop's
    `alpha_pattern` entries (checkpoints of earlier versions); else (what `save_pretrained` writes since issue 30,
    `loradrop_trainer.saved_form`) each truncated module's `lora_B` divided by the factor folded into it, and the
    entries recorded, first. Runs with `dropped_scaling="keep"`, which fold nothing, are refused before this.

    The factor is the module's rank-k scaling over its rank-r one, from its `lora_alpha` (the user's `alpha_pattern`,
    checked as readers check it, the names bounded, before it is matched) and its rank, the rows of its stored
    `lora_A`. A module without a matrix `lora_A` is left for the checks that follow to report.

    Args:
        weights: the saved adapter's tensors, by PEFT key.
        peft_config: its `adapter_config.json`.
        plan: the run's plan.
    """
    ours = recorded_alpha_keys(plan)
    alphas = peft_config.get("alpha_pattern") or {}
    if not ours or any(key in alphas for key in ours):
        return dict(weights), dict(peft_config)
    scaling_fields = {key: peft_config.get(key) for key in ("r", "lora_alpha")}
    check_lora_fields({**scaling_fields, "alpha_pattern": alphas}, "The PEFT config")  # the fields matched below
    modules = [key.removesuffix(LORA_SUFFIXES[0]) for key in weights if key.endswith(LORA_SUFFIXES[0])]
    check_names(modules, "the adapter's weights")
    check_counts({"alpha_pattern": alphas}, modules, "The PEFT config's alpha_pattern")
    k, rslora, out, recorded = plan.dropped_rank, bool(peft_config.get("use_rslora")), dict(weights), {}
    for key, name in ours.items():
        lora_a, lora_b = weights.get(name + LORA_SUFFIXES[0]), weights.get(name + LORA_SUFFIXES[1])
        if lora_a is None or lora_b is None or lora_a.dim() != 2:
            continue
        alpha, r = module_value(peft_config.get("lora_alpha"), alphas, name), lora_a.shape[0]
        if alpha:  # lora_alpha 0 scales the module by 0 at every rank: nothing was folded
            out[name + LORA_SUFFIXES[1]] = lora_b / (
                scaling_at_rank(alpha, k, rslora) / scaling_at_rank(alpha, r, rslora)
            )
        recorded[key] = alpha_at_rank(alpha, r, k, rslora)
    return out, {**peft_config, "alpha_pattern": {**recorded, **alphas}}


def _stored_settings(
    weights: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], plan: DropPlan
) -> dict[str, tuple[int | None, Any]]:
    """What PEFT gave each LoRA module of a saved adapter, `{module: (rank, lora_alpha)}` (`spelled_out`): every
    module with a stored lora_A, the plan's and any other (a run may prune only some), its rank the rows of that
    lora_A, and its entry in the user's `alpha_pattern`, matched only once that passes the readers' check on its own
    and the names are bounded (a module of the plan without weights is refused by the checks that follow)."""
    theirs = without_recorded_alpha(peft_config, plan).get("alpha_pattern") or {}
    lora_a = {key.removesuffix(LORA_SUFFIXES[0]): t for key, t in weights.items() if key.endswith(LORA_SUFFIXES[0])}
    check_names(lora_a, "the adapter's weights")
    check_counts({"alpha_pattern": theirs}, lora_a, "The PEFT config's alpha_pattern")
    check_patterns({"alpha_pattern": theirs}, "The PEFT config's alpha_pattern")
    return {
        name: (a.shape[0] if a.dim() == 2 else None, module_value(peft_config.get("lora_alpha"), theirs, name))
        for name, a in lora_a.items()
    }


def _check_adapter_name(source: Path, plan: DropPlan, plan_source: PlanSource) -> None:
    """Refuse a directory whose top-level adapter is not the plan's while the plan's is saved in it too.

    PEFT's `save_pretrained` (so `trainer.save_model()` and every checkpoint) writes the adapter 'default' at the top of
    the directory and every other one into the subfolder of its name. A run that trained another adapter
    (`LoraDropCallback(adapter_name=...)`) leaves its plan at the top, next to the weights of 'default', which the plan
    does not describe: compared with it, they would look saved before the switch.
    """
    name = plan.adapter_name
    if name == "default" or not has_member(source, f"{name}/{CONFIG_NAME}"):
        return
    saved = ", ".join(f"{adapter!r} in {path}" for adapter, path in _saved_adapters(source).items())
    plan_arg = plan_source if isinstance(plan_source, (str, os.PathLike)) else "PLAN"
    raise PlanError(
        f"{source} holds several PEFT adapters ({saved}), and the plan is of {name!r}, not of the 'default' one at its "
        f"top. Compact {name!r}: `loradrop compact {source / name} DST --plan {plan_arg}` "
        f"(compact_peft_adapter({str(source / name)!r}, out_dir, plan=...) in Python)."
    )


def _saved_adapters(directory: Path) -> dict[str, Path]:
    """The adapters PEFT saved into `directory`, by name: 'default' at its top, any other in the subfolder of its name
    (checkpoint folders, which hold adapters of their own, are not adapters of `directory`)."""
    saved = {"default": directory} if has_member(directory, CONFIG_NAME) else {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        folder, checkpoint = Path(entry.path), entry.name.startswith(PREFIX_CHECKPOINT_DIR)
        if entry.is_dir(follow_symlinks=False) and not checkpoint and has_member(folder, CONFIG_NAME):
            saved[entry.name] = folder
    return saved


def _check_target(source: Path, target: Path) -> None:
    """Refuse a target that is the source or holds it; a folder inside the source is fine (``out/compact`` of the
    Trainer's ``out``, as the quickstart writes it): the source is read by its adapter's own file names only, and the
    target is replaced only when it is missing, empty or an earlier compact adapter (`atomic_directory`)."""
    if source.resolve() not in target.resolve().parents:
        check_disjoint(source, target)


def _no_plan(source: Path) -> str:
    """Why `source` has no plan file, and which directory to compact instead: LoraDropCallback writes the plan into
    the output directory at the switch, and into every checkpoint saved after it."""
    above = source.absolute().parent
    if has_member(above, PLAN_FILE) and not source.name.startswith(PREFIX_CHECKPOINT_DIR):
        return (
            f"{source} has no {PLAN_FILE}. PEFT saves an adapter other than 'default' in a subfolder of the output "
            f"directory: its run's plan is probably {above / PLAN_FILE}; pass it, `loradrop compact {source} DST "
            f"--plan {above / PLAN_FILE}` (plan=... in Python)."
        )
    if has_member(above, PLAN_FILE):
        return (
            f"{source} has no {PLAN_FILE}: it was saved before the LoRA-drop switch (the run's plan is "
            f"{source.parent / PLAN_FILE}, and every checkpoint saved after the switch holds a copy), so it holds "
            f"plain LoRA, which no plan fits. Compact the output directory, `loradrop compact {source.parent} "
            f"{source.parent / 'compact'}`, or a checkpoint saved after the switch."
        )
    return (
        f"{source} has no {PLAN_FILE}: LoraDropCallback writes it into the output directory at the switch, and into "
        "every checkpoint saved after it. Without one, this adapter was saved before the switch, or by a run that did "
        "not prune (its log says why); it is plain LoRA, to load with PeftModel.from_pretrained as it is. Compact the "
        "output directory of a run that pruned, or pass that run's plan (--plan on the command line, plan=... in "
        "Python)."
    )


def _no_adapter(source: Path) -> str:
    """What a directory without any adapter file holds, and what to run instead."""
    held = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(source))
    holds = f"it holds {', '.join(held[:6])}{', ...' if len(held) > 6 else ''}" if held else "it is empty"
    return (
        f"{source} holds no PEFT adapter (no {CONFIG_NAME}; {holds}). loradrop compact reads what "
        f"trainer.save_model() or a checkpoint-N saved after the switch: save the trained model with "
        f"trainer.save_model(DIR), then run loradrop compact DIR DIR/compact."
    )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if not has_member(directory, SAFETENSORS_WEIGHTS_NAME) and has_member(directory, WEIGHTS_NAME):
        raise CompactFormatError(
            f"{directory} holds {WEIGHTS_NAME} (a pickle, which loradrop never loads: it can run code). Save the "
            "adapter with safetensors (the default of save_pretrained and the Trainer)."
        )
    data = read_member(directory, SAFETENSORS_WEIGHTS_NAME)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        message = f"{directory / SAFETENSORS_WEIGHTS_NAME} is not a readable safetensors file ({err})."
        raise CompactFormatError(message) from err
