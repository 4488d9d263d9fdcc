"""Writing a tied model as a compact adapter (`save_compact`), and reading one back with every check (`read_compact`).

The format itself (its files, the `CompactAdapter` type, reading the files) is `hub_export.format`.

A Hub repo (and a pull of one) keeps these files, but the card, in the subfolder ``loradrop/``, next to the plain PEFT
adapter at its root (`hub_export.hub`); `read_compact` reads either directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import peft
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.utils import logging

import loradrop_trainer
from loradrop_trainer import DropPlan
from loradrop_trainer.lora_layers import named_modules
from loradrop_trainer.report import PLOT_FILE, plot_importance
from loradrop_trainer.sharding import barrier, is_writing_rank
from loradrop_trainer.truncate import rank_scaling

from .atomic import atomic_directory
from .base_model import warn_if_local, with_base_model
from .explicit import spelled_out
from .files import write_tensors
from .format import (
    CARD_FILE,
    COMPACT_LAYOUT,
    CONFIG_FILE,
    FORMAT_NAME,
    MANIFEST_FILE,
    METADATA_VERSION_KEY,
    WEIGHTS_FILE,
    CompactAdapter,
    read_files,
)
from .model_card import model_card
from .plans import PlanSource, resolve_plan
from .truncation import recorded_alpha_first, refuse_kept_scaling
from .tying import plan_layers, read_tying
from .validate import check_adapter

logger = logging.get_logger(__name__)


def save_compact(
    model: nn.Module,
    out_dir: str | os.PathLike,
    plan: PlanSource = None,
    *,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write `model`'s adapter as a compact LoRA-drop adapter into `out_dir`, atomically; return the directory.

    In a distributed run only rank 0 writes, as `Trainer.save_model()` does. A model whose LoRA FSDP2 or DeepSpeed
    ZeRO-3 shards is gathered first: call `save_compact` on every rank then (it returns once the files are written).

    Args:
        model: the tied PeftModel (trained with `LoraDropCallback`, or returned by `load_compact`).
        out_dir: missing, empty or an earlier compact adapter (nothing but its files); replaced only once the new
            adapter is complete.
        plan: the drop plan, when the model does not carry it (see `hub_export.plans`); the tying read from the
            model (shared Parameters, switched-off layers) is checked against it.
        license: an SPDX id such as "apache-2.0" for the model card; kept when the adapter is loaded and saved again.
        base_model: the Hub id of the base model ("org/name"), recorded in adapter_config.json and the model card in
            place of the path the model was loaded from (see `hub_export.base_model`). Without it, a base model
            loaded from a local directory is recorded as that path, with a warning: such an adapter cannot be pushed.
    """
    drop_plan, extra = resolve_plan(model, plan)
    if license is not None:
        extra["license"] = license
    tying = read_tying(model, drop_plan)  # a model never truncated is refused here, before it reads as "keep"
    refuse_kept_scaling(_dropped_scaling(model, drop_plan), "This model")
    if not is_writing_rank():
        if tying.gathered:
            barrier()
        return Path(out_dir)
    adapter = CompactAdapter(
        adapter_name=drop_plan.adapter_name,
        plan=drop_plan,
        plan_extra=extra,
        peft_config=spelled_out(
            recorded_alpha_first(
                with_base_model(adapter_config_dict(model, drop_plan.adapter_name), base_model), drop_plan
            ),
            drop_plan,
            "the adapter of this model",
            lambda: _layer_settings(model, drop_plan.adapter_name),
        ),
        tensors=tying.tensors,
        members=tying.members,
        dropped=tying.dropped,
    )
    check_adapter(adapter, "the adapter of this model")
    warn_if_local(adapter.peft_config, f"The compact adapter in {out_dir}")
    with atomic_directory(out_dir, COMPACT_LAYOUT) as staging:
        write_compact(adapter, staging)
    logger.info(
        f"LoRA-drop: compact adapter written to {out_dir} ({adapter.stored_bytes:,} of {adapter.plain_bytes:,} bytes "
        "of a plain adapter)."
    )
    if tying.gathered:
        barrier()
    return Path(out_dir)


def _dropped_scaling(model: nn.Module, plan: DropPlan) -> str:
    """How the model scales its truncated modules: "keep" when as a LoRA of the adapter's rank r
    (`LoraDropConfig(dropped_scaling="keep")`), else "rank"."""
    adapter, layers = plan.adapter_name, plan_layers(model, plan)
    for name in plan.truncated:
        layer = layers[name]
        kept, truncated = (rank_scaling(layer, adapter, rank) for rank in (layer.r[adapter], plan.dropped_rank))
        if layer.scaling[adapter] == kept != truncated:
            return "keep"
    return "rank"


def _layer_settings(model: nn.Module, adapter: str) -> dict[str, tuple[int, float]]:
    """What PEFT gave each LoRA module of the trained model's `adapter`, `{module: (rank, lora_alpha)}`
    (`spelled_out`): those the plan prunes and those it leaves alone (`LoraDropConfig(target=..., exclude=...)`)."""
    return {
        name: (layer.r[adapter], layer.lora_alpha[adapter])
        for name, layer in named_modules(model)
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A
    }


def write_compact(adapter: CompactAdapter, directory: Path) -> None:
    """Write the files of `adapter` into an existing, empty `directory` (the manifest last)."""
    weights = directory / WEIGHTS_FILE
    # One metadata entry only: safetensors writes several in a random order, and the bytes must be reproducible.
    write_tensors(adapter.tensors, weights, metadata={METADATA_VERSION_KEY: str(adapter.format_version)})
    (directory / CONFIG_FILE).write_text(config_text(adapter.peft_config), encoding="utf-8")
    plot_importance(adapter.plan, directory / PLOT_FILE, adapter.plan_extra.get("config"))
    model_card(adapter, PLOT_FILE).save(directory / CARD_FILE)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": adapter.format_version,
        "adapter_name": adapter.adapter_name,
        "written_by": {"loradrop": loradrop_trainer.__version__, "peft": peft.__version__},
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "plan": {**adapter.plan.to_dict(), **adapter.plan_extra},
        "tensors": adapter.members,
        "dropped": {key: {"shape": list(spec.shape), "dtype": spec.dtype} for key, spec in adapter.dropped.items()},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def read_compact(path: str | os.PathLike) -> CompactAdapter:
    """Read and check the compact adapter in the local directory `path` (`hub_export.format.read_files`, then
    everything `hub_export.validate` lists).

    `path` is a compact adapter directory, or a pulled Hub repo (or a clone of one), whose ``loradrop/`` holds it.
    Every problem raises a `CompactFileNotFoundError` or `CompactFormatError` naming the file and what to do. Nothing
    is downloaded: Hub repos are read through `load_from_hub` and `pull`.
    """
    adapter = read_files(path)
    check_adapter(adapter, f"the compact adapter at {path}")
    return adapter


def with_base(adapter: CompactAdapter, base_model: str | None, near: str | os.PathLike | None = None) -> CompactAdapter:
    """`adapter` naming the Hub id `base_model` as its base model; when it is None, its recorded name `anchored` (a
    relative path looked up here and near `near`, the adapter's directory)."""
    return replace(adapter, peft_config=with_base_model(adapter.peft_config, base_model, near))


def config_text(peft_config: dict[str, Any]) -> str:
    """`adapter_config.json` as this package writes it: its fields sorted, so the bytes are reproducible, but the
    entries of `rank_pattern` and `alpha_pattern` in their own order, which is meaning to PEFT (it takes the first key
    that matches a module, and loradrop's entries for truncated modules come before the user's)."""
    return json.dumps({key: peft_config[key] for key in sorted(peft_config)}, indent=2)


def adapter_config_dict(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The adapter's PEFT config as `PeftModel.save_pretrained` writes it, with sets sorted so files are stable, and
    `modules_to_save` listing each module once: PEFT's classification models append their head's names to the list
    of the config they are built from, so a model loaded from an adapter lists them twice."""
    config = copy.deepcopy(model.peft_config[adapter_name])
    if config.base_model_name_or_path is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    data = config.to_dict()
    if config.task_type is None and hasattr(model, "_get_base_model_class"):
        base_class = model._get_base_model_class(is_prompt_tuning=False)
        data["auto_mapping"] = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    if isinstance(data.get("modules_to_save"), list):
        data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
    return {key: sorted(value) if isinstance(value, set) else value for key, value in data.items()}
