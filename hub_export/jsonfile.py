"""Reading the small JSON files of an adapter (manifest, PEFT config, plan) with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CompactFileNotFoundError

MAX_JSON_BYTES = 64 * 2**20  # a manifest lists every LoRA weight key: a few MB for the largest models
MAX_JSON_DEPTH = 32  # adapter files nest 5 levels at most


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
    """The JSON object in `data`, read from `path`; raises `invalid` (with `what`) for anything else.

    The files may come from anyone: their size and nesting are bounded (`MAX_JSON_BYTES`, `MAX_JSON_DEPTH`), since
    Python's parser recurses once per level (a few KB of brackets end it with a RecursionError) and everything that
    reads or writes the values again recurses as well."""
    if len(data) > MAX_JSON_BYTES:
        raise invalid(f"{path} holds {len(data):,} bytes, more than the {MAX_JSON_BYTES:,} any adapter needs: {what}")
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise invalid(f"{path} is not valid JSON ({err}): {what}") from err
    except (RecursionError, MemoryError) as err:
        raise invalid(f"{path} nests its JSON too deeply to be read ({type(err).__name__}): {what}") from err
    if not isinstance(value, dict):
        raise invalid(f"{path} does not hold a JSON object: {what}")
    if _depth(value) > MAX_JSON_DEPTH:
        raise invalid(f"{path} nests its JSON more than {MAX_JSON_DEPTH} levels deep, which no adapter does: {what}")
    return value


def _depth(value: Any) -> int:
    """How deeply `value` (parsed JSON) nests lists and objects; without recursion, since it may be very deep."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
