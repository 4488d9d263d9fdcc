"""The compact adapter format: writing a tied model once per distinct LoRA, and reading it back with checks.

A compact adapter is a directory (format version 1):

- ``adapter_compact.safetensors``: each kept LoRA once and one A/B pair per shared kind, under PEFT's own state-dict
  keys (``base_model.model.<module>.lora_A.weight``); the safetensors metadata repeats the format version.
- ``loradrop_compact.json``: format name and version, adapter name, the plan with importances (plus the extra fields
  of the run's plan file: LoRA-drop settings, parameter counts, licence), ``tensors`` = stored key -> every PEFT key
  that takes it (itself first), ``dropped`` = PEFT key -> shape/dtype for modules whose LoRA is switched off (mode
  "drop"), and the SHA-256 of the weights file. Written last.
- ``adapter_config.json``: the PEFT config of the run, as PEFT writes it (inference_mode true).
- ``README.md`` (model card) and ``loradrop_importance.png`` (importance chart).

On disk it is about the kept fraction of a plain PEFT adapter of the same model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peft.utils import CONFIG_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

import loradrop_trainer
from loradrop_trainer import DropPlan
from loradrop_trainer.report import PLOT_FILE, plot_importance
from loradrop_trainer.sharding import barrier, is_writing_rank

from .atomic import atomic_directory
from .errors import CompactFileNotFoundError, CompactFormatError, UnsupportedFormatVersionError
from .jsonfile import read_json_object
from .model_card import CARD_FILE, render_model_card
from .plans import PlanSource, resolve_plan, split_payload
from .tying import TensorSpec, read_tying

logger = logging.get_logger(__name__)

FORMAT_NAME = "loradrop-compact"
FORMAT_VERSION = 1
MANIFEST_FILE = "loradrop_compact.json"
WEIGHTS_FILE = "adapter_compact.safetensors"
METADATA_VERSION_KEY = "loradrop_compact_version"


@dataclass
class CompactAdapter:
    """A compact adapter in memory: what `read_compact` returns and what `save_compact` writes."""

    adapter_name: str
    plan: DropPlan
    plan_extra: dict[str, Any]
    peft_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    members: dict[str, list[str]]
    dropped: dict[str, TensorSpec] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data in the compact weights file."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def plain_bytes(self) -> int:
        """Bytes of tensor data a plain PEFT adapter of the same model holds (every member and dropped key)."""
        shared = sum(t.numel() * t.element_size() * len(self.members[k]) for k, t in self.tensors.items())
        return shared + sum(spec.nbytes for spec in self.dropped.values())

    @property
    def stored_params(self) -> int:
        """LoRA parameters stored: what training after the switch actually had."""
        return sum(t.numel() for t in self.tensors.values())

    @property
    def plain_params(self) -> int:
        """LoRA parameters of the unpruned adapter: what the model had before the switch."""
        shared = sum(t.numel() * len(self.members[k]) for k, t in self.tensors.items())
        return shared + sum(torch.Size(spec.shape).numel() for spec in self.dropped.values())


def save_compact(
    model: nn.Module, out_dir: str | os.PathLike, plan: PlanSource = None, *, license: str | None = None
) -> Path:
    """Write `model`'s adapter as a compact LoRA-drop adapter into `out_dir`, atomically; return the directory.

    The tying is read from the model (shared Parameters, switched-off layers) and checked against the plan, which
    comes from `plan` or from the model itself when `load_compact` made it (see `hub_export.plans`). `license` (an
    SPDX id such as "apache-2.0") goes into the model card and is kept when the adapter is loaded and saved again.
    `out_dir` must be missing, empty or a previous adapter; it is replaced only once the new adapter is complete.

    In a distributed run only rank 0 writes, as `Trainer.save_model()` does. A model whose LoRA FSDP2 or DeepSpeed
    ZeRO-3 shards is gathered first: call `save_compact` on every rank then (it returns once the files are written).
    """
    drop_plan, extra = resolve_plan(model, plan)
    if license is not None:
        extra["license"] = license
    tying = read_tying(model, drop_plan)
    if not is_writing_rank():
        if tying.gathered:
            barrier()
        return Path(out_dir)
    adapter = CompactAdapter(
        adapter_name=drop_plan.adapter_name,
        plan=drop_plan,
        plan_extra=extra,
        peft_config=adapter_config_dict(model, drop_plan.adapter_name),
        tensors=tying.tensors,
        members=tying.members,
        dropped=tying.dropped,
    )
    with atomic_directory(out_dir) as staging:
        write_compact(adapter, staging)
    logger.info(
        f"LoRA-drop: compact adapter written to {out_dir} ({adapter.stored_bytes:,} of {adapter.plain_bytes:,} bytes "
        "of a plain adapter)."
    )
    if tying.gathered:
        barrier()
    return Path(out_dir)


def write_compact(adapter: CompactAdapter, directory: Path) -> None:
    """Write the files of `adapter` into an existing, empty `directory` (the manifest last)."""
    weights = directory / WEIGHTS_FILE
    # One metadata entry only: safetensors writes several in a random order, and the bytes must be reproducible.
    save_file(adapter.tensors, weights, metadata={METADATA_VERSION_KEY: str(adapter.format_version)})
    (directory / CONFIG_NAME).write_text(json.dumps(adapter.peft_config, indent=2, sort_keys=True), encoding="utf-8")
    plot_importance(adapter.plan, directory / PLOT_FILE)
    (directory / CARD_FILE).write_text(render_model_card(adapter, PLOT_FILE), encoding="utf-8")
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
    """Read and check a compact adapter directory; every problem is reported with the file and what to do."""
    directory = Path(path)
    if not directory.is_dir():
        raise CompactFileNotFoundError(f"No compact adapter at {directory}: the directory does not exist.")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        if (directory / CONFIG_NAME).is_file():
            raise CompactFileNotFoundError(
                f"{directory} has no {MANIFEST_FILE}: it is a plain PEFT adapter, not a LoRA-drop compact one. Load "
                "it with peft.PeftModel.from_pretrained."
            )
        raise CompactFileNotFoundError(
            f"{directory} has no {MANIFEST_FILE}: it is not a LoRA-drop compact adapter (write one with save_compact)."
        )
    manifest = _read_json(manifest_path)
    _check_version(manifest, manifest_path)
    peft_config = _read_json(directory / CONFIG_NAME)
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise CompactFormatError(
            f"{directory / CONFIG_NAME} describes a {peft_config.get('peft_type')!r} adapter; compact adapters hold "
            "LoRA only."
        )
    try:
        plan_payload = manifest["plan"]
        members = {key: list(keys) for key, keys in manifest["tensors"].items()}
        dropped = {
            key: TensorSpec(tuple(spec["shape"]), spec["dtype"]) for key, spec in manifest.get("dropped", {}).items()
        }
        weights_name, digest = manifest["weights_file"], manifest["weights_sha256"]
    except (KeyError, TypeError, AttributeError) as err:
        raise CompactFormatError(f"{manifest_path} lacks or garbles {err}; export the adapter again.") from err
    plan, extra = split_payload(plan_payload, str(manifest_path))
    tensors = _read_weights(directory / weights_name, digest, manifest["format_version"])
    if set(tensors) != set(members):
        missing = sorted(set(members) - set(tensors)) or sorted(set(tensors) - set(members))
        raise CompactFormatError(
            f"{directory / weights_name} and {manifest_path} disagree on the stored tensors (first: {missing[0]!r}); "
            "the adapter was assembled from different exports. Export it again."
        )
    return CompactAdapter(
        adapter_name=manifest.get("adapter_name", plan.adapter_name),
        plan=plan,
        plan_extra=extra,
        peft_config=peft_config,
        tensors=tensors,
        members=members,
        dropped=dropped,
        format_version=manifest["format_version"],
    )


def adapter_config_dict(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The adapter's PEFT config as `PeftModel.save_pretrained` writes it, with sets sorted so files are stable."""
    config = copy.deepcopy(model.peft_config[adapter_name])
    if config.base_model_name_or_path is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    data = config.to_dict()
    if config.task_type is None and hasattr(model, "_get_base_model_class"):
        base_class = model._get_base_model_class(is_prompt_tuning=False)
        data["auto_mapping"] = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    return {key: sorted(value) if isinstance(value, set) else value for key, value in data.items()}


def _missing(path: Path) -> str:
    return f"{path} is missing: the adapter is incomplete. Download or export it again."


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(
        path,
        missing=_missing(path),
        invalid=CompactFormatError,
        what="the file is corrupt or truncated.",
    )


def _check_version(manifest: dict[str, Any], path: Path) -> None:
    if manifest.get("format") != FORMAT_NAME:
        raise CompactFormatError(f"{path} is not a LoRA-drop compact manifest (format {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = (
            "Upgrade loradrop (pip install -U loradrop) to read it."
            if isinstance(version, int) and version > FORMAT_VERSION
            else "The manifest is corrupt; export the adapter again."
        )
        raise UnsupportedFormatVersionError(
            f"{path} is compact format version {version!r}; this loradrop {loradrop_trainer.__version__} reads "
            f"version {FORMAT_VERSION}. {hint}"
        )


def _read_weights(path: Path, digest: str, version: int) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CompactFileNotFoundError(_missing(path))
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise CompactFormatError(
            f"{path} is corrupt: its checksum differs from the one recorded in {MANIFEST_FILE}. Download or export "
            "the adapter again."
        )
    try:
        with safe_open(path, framework="pt") as weights:
            written = (weights.metadata() or {}).get(METADATA_VERSION_KEY)
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CompactFormatError(f"{path} is not a readable safetensors file ({err}); export it again.") from err
    if written != str(version):
        raise CompactFormatError(
            f"{path} says compact format version {written!r} but {MANIFEST_FILE} says {version}; the files come from "
            "different exports. Export the adapter again."
        )
    return tensors
