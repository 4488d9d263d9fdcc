"""The base model an adapter names: a Hub id that others can load, never a directory of the machine that trained it.

PEFT records `base_model_name_or_path` as the model was loaded, so training from a local copy (a cluster without Hub
access, the models `recipes.assets` fetches from PyPI) records that copy's path, and an adapter published that way
points everyone at a directory they do not have: the card cannot link its base model and its snippets do not run.
`base_model="org/name"` (`save_compact`, `expand_to_peft`, `push_to_hub`, `--base_model`) records the Hub id in
``adapter_config.json``, and from there in the model card; `push_to_hub` refuses to publish a local path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .errors import BaseModelPathError

logger = logging.get_logger(__name__)

BASE_KEY = "base_model_name_or_path"  # where PEFT's adapter_config.json names the base model


def is_hub_id(name: object) -> bool:
    """Whether `name` reads as a Hub model id ("org/name" or "name") and is not a local directory."""
    if not isinstance(name, str) or not name or os.path.isabs(os.path.expanduser(name)) or os.path.isdir(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def recorded_base(peft_config: Mapping[str, Any]) -> str | None:
    """The base model `peft_config` names, if any."""
    return peft_config.get(BASE_KEY) or None


def with_base_model(peft_config: Mapping[str, Any], base_model: str | None) -> dict[str, Any]:
    """`peft_config` naming `base_model` (a Hub id) as its base, or unchanged when `base_model` is None."""
    if base_model is None:
        return dict(peft_config)
    if not is_hub_id(base_model):
        raise BaseModelPathError(
            f"base_model={base_model!r} is not a Hub model id; pass the id of the model on the Hub, such as "
            "'meta-llama/Llama-2-7b-hf', even when training read a local copy of it."
        )
    return {**peft_config, BASE_KEY: base_model}


def warn_if_local(peft_config: Mapping[str, Any], where: str) -> None:
    """Log a warning when `peft_config` names its base model by a local path (fine locally, not for publishing)."""
    base = recorded_base(peft_config)
    if base is not None and not is_hub_id(base):
        logger.warning(
            f"LoRA-drop: {where} names its base model by the local path {base!r}. It loads here, but nobody else can "
            "load it from the Hub: record the Hub id of that model instead, with base_model='org/name' in Python or "
            "--base_model org/name on the loradrop command line."
        )


def check_publishable(peft_config: Mapping[str, Any], where: str) -> None:
    """Refuse to publish an adapter that names its base model by a local path."""
    base = recorded_base(peft_config)
    if base is not None and not is_hub_id(base):
        raise BaseModelPathError(
            f"{where} names its base model by the local path {base!r}, which nobody who downloads it has. Pass the "
            "Hub id of that model: push_to_hub(..., base_model='org/name') or `loradrop push --base_model org/name`."
        )
    if base is None:
        logger.warning(
            f"LoRA-drop: {where} names no base model, so its card cannot link one; pass base_model='org/name'."
        )
