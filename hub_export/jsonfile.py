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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise invalid(f"{path} is not valid JSON ({err}): {what}") from err
    if not isinstance(data, dict):
        raise invalid(f"{path} does not hold a JSON object: {what}")
    return data
