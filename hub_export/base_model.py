"""The base model an adapter names: a Hub id that others can load, never a directory of the machine that trained it.

PEFT records `base_model_name_or_path` as the model was loaded, so training from a local copy (a cluster without Hub
access, the models `recipes.assets` fetches from PyPI) records that copy's path, and an adapter published that way
points everyone at a directory they do not have: the card cannot link its base model and its snippets do not run.
`base_model="org/name"` (`save_compact`, `expand_to_peft`, `push_to_hub`, `--base_model`) records the Hub id in
``adapter_config.json``, and from there in the model card; `push_to_hub` refuses to publish a local path.

Which one a name is, is decided from who gave it, the Hub's id grammar and the filesystem, and logged:

- a `base_model` argument is a Hub id, or refused: it must follow the grammar (`validate_repo_id`: "/data/base",
  "./base" or "~/base" never do), and a directory of the same name in the working directory changes nothing (a
  warning says so);
- a recorded name is a local path when it does not follow the grammar or when it is a directory here, which is what
  transformers' `from_pretrained` loaded it from. Training with LoraDropCallback records a relative directory by its
  absolute path, and so does writing an adapter (`anchored`), looking for it here and then in the adapter's own
  directory and those above it (where the training script ran), so "models/base" stays a local path wherever the
  adapter is pushed from, instead of passing for a Hub id there;
- a push publishes a recorded name only when it is a model on the Hub (`check_publishable`): one that is neither a
  directory here nor on the Hub is refused, with the call that names the base model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .errors import BaseModelPathError

logger = logging.get_logger(__name__)

BASE_KEY = "base_model_name_or_path"  # where PEFT's adapter_config.json names the base model


def is_hub_id(name: object) -> bool:
    """Whether `name` follows the Hub's model id grammar ("org/name" or "name"; huggingface_hub's own check). No path
    such as "/data/base", "./base", "../base" or "~/base" does; "models/base" does, and may still be a directory here
    (`names_local_path` tells a recorded name apart)."""
    if not isinstance(name, str) or not name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def names_local_path(name: object) -> bool:
    """Whether a recorded base model name is a local path: not a Hub id by its form, or a directory here, which
    `from_pretrained` loads without asking the Hub."""
    return not is_hub_id(name) or os.path.isdir(name)


def recorded_base(peft_config: Mapping[str, Any]) -> str | None:
    """The base model `peft_config` names, if any."""
    return peft_config.get(BASE_KEY) or None


def with_base_model(
    peft_config: Mapping[str, Any], base_model: str | None, near: str | os.PathLike | None = None
) -> dict[str, Any]:
    """`peft_config` naming `base_model` (a Hub id) as its base; when it is None, the recorded name `anchored` (with
    the directory `near`, the adapter's own)."""
    if base_model is None:
        return anchored(peft_config, near)
    if not is_hub_id(base_model):
        raise BaseModelPathError(
            f"base_model={base_model!r} is not a Hub model id; pass the id of the model on the Hub, such as "
            "'meta-llama/Llama-2-7b-hf', even when training read a local copy of it."
        )
    if os.path.isdir(base_model):
        logger.warning(
            f"LoRA-drop: base_model={base_model!r} is recorded as the Hub id {base_model!r}, not as the directory of "
            f"that name here ({os.path.abspath(base_model)}): base_model always names the model on the Hub."
        )
    else:
        logger.info(f"LoRA-drop: base model recorded as the Hub id {base_model!r}.")
    return {**peft_config, BASE_KEY: base_model}


def anchored(peft_config: Mapping[str, Any], near: str | os.PathLike | None = None) -> dict[str, Any]:
    """`peft_config` with a base model recorded by a relative path that names a directory made absolute.

    PEFT records the path the model was loaded from as given, relative to where the training script ran; read from
    anywhere else, "models/base" would pass for a Hub id, and a push would point everyone at a model nobody has. The
    path is looked up here, then in the adapter's directory `near` and each directory above it: a Trainer's output
    directory usually lies in the one its script ran in (`loradrop compact project/out ...`, run from elsewhere).
    """
    base = recorded_base(peft_config)
    if not isinstance(base, str) or os.path.isabs(base):
        return dict(peft_config)
    roots = [Path.cwd()] + ([Path(near).absolute(), *Path(near).absolute().parents] if near is not None else [])
    found = next((root / base for root in roots if (root / base).is_dir()), None)
    if found is None:
        return dict(peft_config)
    logger.info(f"LoRA-drop: base model {base!r} is a local directory, recorded as {str(found)!r}.")
    return {**peft_config, BASE_KEY: str(found)}


def warn_if_local(peft_config: Mapping[str, Any], where: str) -> None:
    """Log a warning when `peft_config` names its base model by a local path (fine locally, not for publishing)."""
    base = recorded_base(peft_config)
    if base is not None and names_local_path(base):
        logger.warning(
            f"LoRA-drop: {where} names its base model by the local path {base!r}. It loads here, but nobody else can "
            "load it from the Hub: record the Hub id of that model instead, with base_model='org/name' in Python or "
            "--base_model org/name on the loradrop command line."
        )


def check_publishable(peft_config: Mapping[str, Any], where: str, token: str | None = None) -> None:
    """Refuse to publish an adapter that names its base model by a local path, or by a name that is no model on the
    Hub (a relative path recorded where training ran passes for a Hub id by its form); `token` sees private models."""
    base = recorded_base(peft_config)
    if base is not None and names_local_path(base):
        raise BaseModelPathError(
            f"{where} names its base model by the local path {base!r}, which nobody who downloads it has. Pass the "
            "Hub id of that model: push_to_hub(..., base_model='org/name') or `loradrop push --base_model org/name`."
        )
    if base is None:
        logger.warning(
            f"LoRA-drop: {where} names no base model, so its card cannot link one; pass base_model='org/name'."
        )
    elif not HfApi(token=token).repo_exists(base):
        raise BaseModelPathError(
            f"{where} names its base model {base!r}, which is neither a directory here nor a model on the Hub (a path "
            "relative to where training ran?). Pass the Hub id of that model: push_to_hub(..., base_model='org/name') "
            "or `loradrop push --base_model org/name`."
        )
    else:
        logger.info(f"LoRA-drop: {where} names its base model by the Hub id {base!r}, a model on the Hub.")
