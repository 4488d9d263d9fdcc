"""The compact adapter format: its files, the `CompactAdapter` they hold, and reading them.

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

On disk it is about the kept fraction of a plain PEFT adapter of the same model. This module is the bottom of
`hub_export`'s imports: the writers (`compact`, `model_card`), the checks (`validate`) and the loaders import it, and
it imports none of them, nor PEFT. `read_files` reads an adapter's files, from the format's own names only
(`hub_export.files`), and checks what the format itself says (version, checksum, the manifest against the weights
file); `hub_export.compact.read_compact` adds every check of `hub_export.validate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

import loradrop_trainer
from loradrop_trainer import DropPlan
from loradrop_trainer.peft_keys import LORA_SUFFIXES
from loradrop_trainer.report import PLAN_FILE, PLOT_FILE

from .atomic import Layout
from .errors import CompactFileNotFoundError, CompactFormatError, PlanError, UnsupportedFormatVersionError
from .files import has_member, read_member
from .jsonfile import MAX_JSON_BYTES, parse_json_object
from .plans import split_payload
from .truncation import module_value, numel_at_rank, truncated_keys

FORMAT_NAME = "loradrop-compact"
FORMAT_VERSION = 1
MANIFEST_FILE = "loradrop_compact.json"
WEIGHTS_FILE = "adapter_compact.safetensors"
METADATA_VERSION_KEY = "loradrop_compact_version"
CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME, the name PEFT reads a LoRA config from
CARD_FILE = "README.md"
# Where a Hub repo, or a pull of one, keeps the compact adapter: its root is the plain PEFT adapter.
COMPACT_SUBFOLDER = "loradrop"
COMPACT_LAYOUT = Layout(
    "compact adapter", frozenset({MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, PLOT_FILE}), marker=MANIFEST_FILE
)

_JSON_TYPES = {
    "a string": lambda value: isinstance(value, str),
    "true or false": lambda value: isinstance(value, bool),
    "an integer": lambda value: type(value) is int,
    "a number": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "null": lambda value: value is None,
    "a list of strings": lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),
    "a list of integers": lambda value: isinstance(value, list) and all(type(item) is int for item in value),
    "an object": lambda value: isinstance(value, dict),
}
# The fields of a PEFT LoRA config that PEFT or loradrop reads, and the JSON types PEFT writes them as.
_CONFIG_TYPES = {
    "peft_type": ("a string",),
    "task_type": ("a string", "null"),
    "base_model_name_or_path": ("a string", "null"),
    "revision": ("a string", "null"),
    "target_modules": ("a string", "a list of strings", "null"),
    "exclude_modules": ("a string", "a list of strings", "null"),
    "modules_to_save": ("a list of strings", "null"),
    "layers_to_transform": ("an integer", "a list of integers", "null"),
    "layers_pattern": ("a string", "a list of strings", "null"),
    "rank_pattern": ("an object",),
    "alpha_pattern": ("an object",),
    "lora_dropout": ("a number",),
    "bias": ("a string",),
    "use_rslora": ("true or false",),
    "fan_in_fan_out": ("true or false",),
    "inference_mode": ("true or false",),
    "init_lora_weights": ("true or false", "a string"),
    "auto_mapping": ("an object", "null"),
}
_LORA_KEY = re.compile(r"^(?P<module>.+?)(?P<suffix>\.lora_[AB]\.[^.]+)$")


def split_key(key: str) -> tuple[str, str] | None:
    """`(module name, suffix)` of a LoRA weight key such as `...v_proj.lora_B.weight`; None for other keys."""
    match = _LORA_KEY.match(key)
    return (match["module"], match["suffix"]) if match else None


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that is not stored (the LoRA of a dropped module), to rebuild it on expansion."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.torch_dtype).element_size()


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
        plan's `dropped_rank` but have rank r in the trained model (r or `rank_pattern` of the PEFT config, whose
        types `hub_export.validate` checks)."""
        r, pattern = self.peft_config.get("r"), self.peft_config.get("rank_pattern") or {}
        return {key: module_value(r, pattern, name) for key, name in truncated_keys(self.plan).items()}

    @cached_property
    def lora_modules(self) -> list[str]:
        """Every LoRA module the adapter holds weights for (modules the plan never scored, by `exclude`, included)."""
        keys = [*(key for keys in self.members.values() for key in keys), *self.dropped]
        return sorted({key.removesuffix(LORA_SUFFIXES[0]) for key in keys if key.endswith(LORA_SUFFIXES[0])})

    @property
    def uniform_rank(self) -> int:
        """The largest rank a LoRA module of the trained model has: the rank of every module in the uniform form
        (`hub_export.serving`)."""
        r, pattern = self.peft_config["r"], self.peft_config.get("rank_pattern") or {}
        return max(module_value(r, pattern, name) for name in self.lora_modules)

    def _plain_numel(self, key: str, tensor: torch.Tensor) -> int:
        rank = self.full_ranks.get(key)
        return tensor.numel() if rank is None else numel_at_rank(key, tensor, rank)

    @property
    def other_params(self) -> int:
        """Parameters of the modules PEFT trains in full alongside LoRA (`modules_to_save`, e.g. a classifier)."""
        return sum(t.numel() for key, t in self.tensors.items() if not split_key(key))


def read_files(path: str | os.PathLike) -> CompactAdapter:
    """The compact adapter in the local directory `path`, as its files hold it, checked only as far as the format
    goes: its version, the weights' checksum, and the manifest against the weights file. `read_compact` checks the
    rest (`hub_export.validate`) before anything uses it.

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
        raise CompactFileNotFoundError(_not_compact(directory))
    manifest_path = directory / folder / MANIFEST_FILE
    manifest = _read_json(directory, folder + MANIFEST_FILE)
    version = _check_version(manifest, manifest_path)
    peft_config = _read_json(directory, folder + CONFIG_FILE)
    check_config_types(peft_config, directory / folder / CONFIG_FILE)
    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise CompactFormatError(
            f"{directory / folder / CONFIG_FILE} describes a {peft_config.get('peft_type')!r} adapter; compact "
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
        raise CompactFormatError(f"{str(err).rstrip('.')}. Export the adapter again.") from err
    tensors = _read_weights(directory, folder + WEIGHTS_FILE, digest, version)
    if set(tensors) != set(members):
        missing = sorted(set(members) - set(tensors)) or sorted(set(tensors) - set(members))
        raise CompactFormatError(
            f"{directory / folder / WEIGHTS_FILE} and {manifest_path} disagree on the stored tensors (first: "
            f"{missing[0]!r}); the adapter was assembled from different exports. Export it again."
        )
    adapter_name = manifest.get("adapter_name", plan.adapter_name)
    if not isinstance(adapter_name, str):
        raise CompactFormatError(f"{manifest_path} gives adapter_name {adapter_name!r}, not a name; export it again.")
    return CompactAdapter(
        adapter_name=adapter_name,
        plan=plan,
        plan_extra=extra,
        peft_config=peft_config,
        tensors=tensors,
        members=members,
        dropped=dropped,
        format_version=version,
    )


def check_config_types(peft_config: dict[str, Any], path: Path) -> None:
    """Refuse a PEFT config field of another JSON type than PEFT writes and reads there (`_CONFIG_TYPES`): it would
    end a reader with a TypeError, or be written on into the expanded adapter. Ranks, `lora_alpha` and the pattern
    fields' values are checked with their bounds (`hub_export.validate.check_lora_fields`)."""
    for name, kinds in _CONFIG_TYPES.items():
        if name in peft_config and not any(_JSON_TYPES[kind](peft_config[name]) for kind in kinds):
            raise CompactFormatError(
                f"{path} gives {name} {peft_config[name]!r}; PEFT reads {' or '.join(kinds)} there. Export the adapter "
                "again."
            )


def compact_folder(directory: Path) -> str:
    """Where in `directory` the compact adapter's files are, as a prefix of their names: "" for a compact adapter
    directory (and a Hub repo pushed before the plain PEFT adapter moved to its root), "loradrop/" for a Hub repo or
    a pull of one."""
    subfolder = f"{COMPACT_SUBFOLDER}/"
    if not has_member(directory, MANIFEST_FILE) and has_member(directory, subfolder + MANIFEST_FILE):
        return subfolder
    return ""


def _not_compact(directory: Path) -> str:
    """Why `directory`, which has no manifest, is no compact adapter, and what to do with it instead."""
    if has_member(directory, PLAN_FILE) and has_member(directory, CONFIG_FILE):
        return (
            f"{directory} has no {MANIFEST_FILE}: it is the plain PEFT adapter a run with LoraDropCallback saved "
            f"(its {PLAN_FILE} is next to it), not a compact one. Write the compact adapter first: `loradrop compact "
            f"{directory} {directory / 'compact'}` (compact_peft_adapter in Python), then use that directory."
        )
    if has_member(directory, CONFIG_FILE):
        return (
            f"{directory} has no {MANIFEST_FILE}: it is a plain PEFT adapter, not a LoRA-drop compact one. Load it "
            "with peft.PeftModel.from_pretrained."
        )
    return f"{directory} has no {MANIFEST_FILE}: it is not a LoRA-drop compact adapter (write one with save_compact)."


def _read_json(directory: Path, name: str) -> dict[str, Any]:
    return parse_json_object(
        read_member(directory, name, MAX_JSON_BYTES),
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
    except (SafetensorError, ValueError, AttributeError, RecursionError, MemoryError) as err:
        raise CompactFormatError(f"{path} is not a readable safetensors file ({err}); export it again.") from err
    if written != str(version):
        raise CompactFormatError(
            f"{path} says compact format version {written!r} but {MANIFEST_FILE} says {version}; the files come from "
            "different exports. Export the adapter again."
        )
    return tensors
