"""Reading the small JSON files of an adapter (manifest, PEFT config, plan) with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CompactFileNotFoundError


def read_json_object(path: Path, *, missing: str, invalid: type[ValueError], what: str) -> dict[str, Any]:
    """The JSON object in `path`; raises `CompactFileNotFoundError` (with `missing`) or `invalid` (with `what`)."""
    if not path.is_file():
        raise CompactFileNotFoundError(missing)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise invalid(f"{path} cannot be read ({err}): {what}") from err
    return parse_json_object(data, path, invalid=invalid, what=what)


def parse_json_object(data: bytes, path: Path, *, invalid: type[ValueError], what: str) -> dict[str, Any]:
    """The JSON object in `data`, read from `path`; raises `invalid` (with `what`) for anything else."""
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise invalid(f"{path} is not valid JSON ({err}): {what}") from err
    if not isinstance(value, dict):
        raise invalid(f"{path} does not hold a JSON object: {what}")
    return value
