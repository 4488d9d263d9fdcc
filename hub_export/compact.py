"""The compact adapter format: writing a tied model once per distinct LoRA, and reading it back with checks.

A compact adapter is a directory (format version 1):

- ``adapter_compact.safetensors``: each kept LoRA once and one A/B pair per shared kind (mode "share"), or each
  truncated module's LoRA at its rank k, ``lora_A[:k]`` and ``lora_B[:, :k]`` (mode "truncate"), under PEFT's own
  state-dict keys (``base_model.model.<module>.lora_A.weight``); the safetensors metadata repeats the format version.
- ``loradrop_compact.json``: format name and version, adapter name, the plan with importances (plus the extra fields
  of the run's plan file: LoRA-drop settings, parameter counts, licence), ``tensors`` = stored key -> every PEFT key
  that takes it (itself first), ``dropped`` = PEFT key -> shape/dtype for modules whose LoRA is switched off (mode
  "drop"), and the SHA-256 of the weights file. Written last.
- ``adapter_config.json``: the PEFT config of the run, as PEFT writes it (inference_mode true); in mode "truncate"
  that is every module at rank r, with the ``alpha_pattern`` entries that scale truncated modules as rank k.
- ``README.md`` (model card) and ``loradrop_importance.png`` (importance chart).

On disk it is about the kept fraction of a plain PEFT adapter of the same model. Reading one checks everything
`hub_export.validate` lists, from the format's own files only (`hub_export.files`).

A Hub repo (and a pull of one) keeps these files, but the card, in the subfolder ``loradrop/``, next to the plain PEFT
adapter at its root (`hub_export.hub`); `read_compact` reads either directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import peft
import torch
from peft.utils import CONFIG_NAME
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn
from transformers.utils import logging

import loradrop_trainer
from loradrop_trainer import DropPlan
from loradrop_trainer.report import PLOT_FILE, plot_importance
from loradrop_trainer.sharding import barrier, is_writing_rank

from .atomic import Layout, atomic_directory
from .base_model import warn_if_local, with_base_model
from .errors import CompactFileNotFoundError, CompactFormatError, PlanError, UnsupportedFormatVersionError
from .files import has_member, read_member, write_tensors
from .jsonfile import parse_json_object
from .model_card import CARD_FILE, model_card
from .plans import PlanSource, resolve_plan, split_payload
from .truncation import numel_at_rank, recorded_alpha_first, truncated_keys
from .tying import TensorSpec, read_tying, split_key
from .validate import check_adapter, lora_config, module_rank

logger = logging.get_logger(__name__)

FORMAT_NAME = "loradrop-compact"
FORMAT_VERSION = 1
MANIFEST_FILE = "loradrop_compact.json"
WEIGHTS_FILE = "adapter_compact.safetensors"
METADATA_VERSION_KEY = "loradrop_compact_version"
# Where a Hub repo, or a pull of one, keeps the compact adapter: its root is the plain PEFT adapter.
COMPACT_SUBFOLDER = "loradrop"
COMPACT_LAYOUT = Layout(
    "compact adapter", frozenset({MANIFEST_FILE, WEIGHTS_FILE, CONFIG_NAME, CARD_FILE, PLOT_FILE}), marker=MANIFEST_FILE
)


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
        """Bytes of tensor data the unpruned adapter holds: a plain PEFT adapter of the same model (every member and
        dropped key), with truncated modules at their full rank r."""
        shared = sum(self._plain_numel(k, t) * t.element_size() * len(self.members[k]) for k, t in self.tensors.items())
        return shared + sum(spec.nbytes for spec in self.dropped.values())

    @property
    def stored_params(self) -> int:
        """LoRA parameters stored (lora_A and lora_B only): what training after the switch actually had."""
        return sum(t.numel() for key, t in self.tensors.items() if split_key(key))

    @property
    def plain_params(self) -> int:
        """LoRA parameters of the unpruned adapter (lora_A and lora_B only): what the model had before the switch,
        truncated modules at their full rank r."""
        shared = sum(self._plain_numel(k, t) * len(self.members[k]) for k, t in self.tensors.items() if split_key(k))
        return shared + sum(torch.Size(spec.shape).numel() for spec in self.dropped.values())

    @cached_property
    def full_ranks(self) -> dict[str, int]:
        """`{stored key: rank r}` of the LoRA weights of truncated modules (mode "truncate"), which are stored at the
        plan's `dropped_rank` but have rank r in the trained model (r or `rank_pattern` of the PEFT config)."""
        keys = truncated_keys(self.plan)
        if not keys:
            return {}
        config = lora_config(self.peft_config, "The PEFT config of the compact adapter")
        return {key: module_rank(config, name) for key, name in keys.items()}

    def _plain_numel(self, key: str, tensor: torch.Tensor) -> int:
        rank = self.full_ranks.get(key)
        return tensor.numel() if rank is None else numel_at_rank(key, tensor, rank)

    @property
    def other_params(self) -> int:
        """Parameters of the modules PEFT trains in full alongside LoRA (`modules_to_save`, e.g. a classifier)."""
        return sum(t.numel() for key, t in self.tensors.items() if not split_key(key))


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
    tying = read_tying(model, drop_plan)
    if not is_writing_rank():
        if tying.gathered:
            barrier()
        return Path(out_dir)
    adapter = CompactAdapter(
        adapter_name=drop_plan.adapter_name,
        plan=drop_plan,
        plan_extra=extra,
        peft_config=recorded_alpha_first(
            with_base_model(adapter_config_dict(model, drop_plan.adapter_name), base_model), drop_plan
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


def write_compact(adapter: CompactAdapter, directory: Path) -> None:
    """Write the files of `adapter` into an existing, empty `directory` (the manifest last)."""
    weights = directory / WEIGHTS_FILE
    # One metadata entry only: safetensors writes several in a random order, and the bytes must be reproducible.
    write_tensors(adapter.tensors, weights, metadata={METADATA_VERSION_KEY: str(adapter.format_version)})
    (directory / CONFIG_NAME).write_text(config_text(adapter.peft_config), encoding="utf-8")
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
    """Read and check the compact adapter in the local directory `path` (see `hub_export.validate`).

    `path` is a compact adapter directory, or a pulled Hub repo (or a clone of one), whose ``loradrop/`` holds it.
    Every problem raises a `CompactFileNotFoundError` or `CompactFormatError` naming the file and what to do. Nothing
    is downloaded: Hub repos are read through `load_from_hub` and `pull`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CompactFileNotFoundError(
            f"No compact adapter at {directory}: it is a file, not a directory. Pass the adapter's directory."
            if directory.exists()
            else f"{directory} does not exist. (A Hub repo is read only when asked: load_from_hub(base_model, "
            "repo_id) or pull(repo_id, directory) in Python, hf://user/name on the loradrop command line.)"
        )
    folder = compact_folder(directory)
    if not has_member(directory, folder + MANIFEST_FILE):
        if has_member(directory, CONFIG_NAME):
            raise CompactFileNotFoundError(
                f"{directory} has no {MANIFEST_FILE}: it is a plain PEFT adapter, not a LoRA-drop compact one. Load "
                "it with peft.PeftModel.from_pretrained."
            )
        raise CompactFileNotFoundError(
            f"{directory} has no {MANIFEST_FILE}: it is not a LoRA-drop compact adapter (write one with save_compact)."
        )
    manifest_path = directory / folder / MANIFEST_FILE
    manifest = _read_json(directory, folder + MANIFEST_FILE)
    version = _check_version(manifest, manifest_path)
    peft_config = _read_json(directory, folder + CONFIG_NAME)
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise CompactFormatError(
            f"{directory / folder / CONFIG_NAME} describes a {peft_config.get('peft_type')!r} adapter; compact "
            "adapters hold LoRA only."
        )
    try:
        plan_payload = manifest["plan"]
        members = {key: _names(keys) for key, keys in manifest["tensors"].items()}
        dropped = _dropped_specs(manifest.get("dropped", {}), manifest_path)
        weights_name, digest = manifest["weights_file"], manifest["weights_sha256"]
    except (KeyError, TypeError, AttributeError) as err:
        raise CompactFormatError(f"{manifest_path} lacks or garbles {err}; export the adapter again.") from err
    if weights_name != WEIGHTS_FILE:  # refused before touching the disk: the answer must not depend on other paths
        raise CompactFormatError(
            f"{manifest_path} names weights_file {weights_name!r}; a compact adapter's weights are in "
            f"{WEIGHTS_FILE!r} next to it. Export the adapter again."
        )
    try:
        plan, extra = split_payload(plan_payload, str(manifest_path))
    except PlanError as err:
        raise CompactFormatError(f"{err}. Export the adapter again.") from err
    tensors = _read_weights(directory, folder + WEIGHTS_FILE, digest, version)
    if set(tensors) != set(members):
        missing = sorted(set(members) - set(tensors)) or sorted(set(tensors) - set(members))
        raise CompactFormatError(
            f"{directory / folder / WEIGHTS_FILE} and {manifest_path} disagree on the stored tensors (first: "
            f"{missing[0]!r}); the adapter was assembled from different exports. Export it again."
        )
    adapter = CompactAdapter(
        adapter_name=str(manifest.get("adapter_name", plan.adapter_name)),
        plan=plan,
        plan_extra=extra,
        peft_config=peft_config,
        tensors=tensors,
        members=members,
        dropped=dropped,
        format_version=version,
    )
    check_adapter(adapter, f"the compact adapter at {directory}")
    return adapter


def compact_folder(directory: Path) -> str:
    """Where in `directory` the compact adapter's files are, as a prefix of their names: "" for a compact adapter
    directory (and a Hub repo pushed before the plain PEFT adapter moved to its root), "loradrop/" for a Hub repo or
    a pull of one."""
    subfolder = f"{COMPACT_SUBFOLDER}/"
    if not has_member(directory, MANIFEST_FILE) and has_member(directory, subfolder + MANIFEST_FILE):
        return subfolder
    return ""


def with_base(adapter: CompactAdapter, base_model: str | None) -> CompactAdapter:
    """`adapter` naming the Hub id `base_model` as its base model (unchanged when it is None)."""
    return replace(adapter, peft_config=with_base_model(adapter.peft_config, base_model))


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


def _read_json(directory: Path, name: str) -> dict[str, Any]:
    return parse_json_object(
        read_member(directory, name),
        directory / name,
        invalid=CompactFormatError,
        what="the file is corrupt or truncated.",
    )


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise TypeError("'tensors' (each entry must be a list of key names)")
    return list(value)


def _dropped_specs(value: Any, path: Path) -> dict[str, TensorSpec]:
    if not isinstance(value, dict):
        raise TypeError("'dropped' (a mapping of key names to shapes and dtypes)")
    specs = {}
    for key, spec in value.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or "dtype" not in spec:
            raise CompactFormatError(
                f"{path} gives dropped {key!r} no {{'shape': [...], 'dtype': ...}}; export the adapter again."
            )
        specs[key] = TensorSpec(tuple(spec["shape"]), spec["dtype"])
    return specs


def _check_version(manifest: dict[str, Any], path: Path) -> int:
    if manifest.get("format") != FORMAT_NAME:
        raise CompactFormatError(f"{path} is not a LoRA-drop compact manifest (format {manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # `true == 1` in Python, but it is no version
        hint = (
            "Upgrade loradrop (pip install -U loradrop) to read it."
            if type(version) is int and version > FORMAT_VERSION
            else "The manifest is corrupt; export the adapter again."
        )
        raise UnsupportedFormatVersionError(
            f"{path} is compact format version {version!r}; this loradrop {loradrop_trainer.__version__} reads "
            f"version {FORMAT_VERSION}. {hint}"
        )
    return version


def _read_weights(directory: Path, name: str, digest: Any, version: int) -> dict[str, torch.Tensor]:
    """The stored tensors of the weights file `name` in `directory`, parsed from the very bytes whose checksum was
    verified."""
    path = directory / name
    data = read_member(directory, name)
    if hashlib.sha256(data).hexdigest() != digest:
        raise CompactFormatError(
            f"{path} is corrupt: its checksum differs from the one recorded in {MANIFEST_FILE}. Download or export "
            "the adapter again."
        )
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # the safetensors header
        written = (header.get("__metadata__") or {}).get(METADATA_VERSION_KEY)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, AttributeError) as err:
        raise CompactFormatError(f"{path} is not a readable safetensors file ({err}); export it again.") from err
    if written != str(version):
        raise CompactFormatError(
            f"{path} says compact format version {written!r} but {MANIFEST_FILE} says {version}; the files come from "
            "different exports. Export the adapter again."
        )
    return tensors
