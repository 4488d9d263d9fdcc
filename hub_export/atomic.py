"""Replacing an output directory only when it holds nothing but what this package writes there.

The writing itself is `loradrop_trainer.atomic.staged_directory` (staged next to the target, flushed, renamed into
place; readers see the old adapter or the new one, never half of one). What this module adds is the refusal: only a
directory that holds nothing but the files this package writes for that kind of output (a `Layout`) is ever
replaced, since a Trainer output directory or a ``checkpoint-N/`` also holds ``adapter_config.json``, next to the
optimizer state and everything else the user cannot get back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loradrop_trainer.atomic import staged_directory

from .errors import TargetExistsError

_SHOWN = 6  # foreign entries named in an error message


@dataclass(frozen=True)
class Layout:
    """The files one kind of output consists of: `what` names it in messages, `files` are paths relative to it, and
    `marker` is the one file every such output has (a README.md or a config alone may be the user's own)."""

    what: str
    files: frozenset[str]
    marker: str


@contextmanager
def atomic_directory(target: str | os.PathLike, layout: Layout) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it is flushed and renamed to `target`.

    If the body raises, the temporary directory is removed and `target` is left exactly as it was. `target` may be
    missing, empty, or hold nothing but files of `layout` (an earlier output of the same kind); anything else is
    refused with `TargetExistsError`, so a typo cannot wipe a directory of the user's files. It is checked again
    just before it is replaced, so files another process wrote into it while the new one was being written are
    refused too, not deleted.
    """
    check_replaceable(Path(target).absolute(), layout)
    with staged_directory(target, check=lambda path: check_replaceable(path, layout)) as staging:
        yield staging


def check_replaceable(target: Path, layout: Layout) -> None:
    """Refuse to overwrite anything but a missing path, an empty directory or a directory of `layout`'s files."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise TargetExistsError(f"{target} exists and is not a directory; choose another output path.")
    foreign = _foreign_entries(target, layout.files)
    if not foreign and any(os.scandir(target)) and not (target / layout.marker).is_file():
        foreign = [entry.name for entry in sorted(os.scandir(target), key=lambda e: e.name)]  # no output of ours
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise TargetExistsError(
            f"{target} holds {shown}, which are no files of a {layout.what}; refusing to replace it (only a missing "
            f"or empty directory, or an earlier {layout.what}, is replaced). Choose another output directory, or move "
            "those files away first."
        )


def check_disjoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Refuse a `target` that is `source`, lies inside it or contains it: writing it would destroy the source."""
    source_path, target_path = Path(source).resolve(), Path(target).resolve()
    if source_path == target_path:
        relation = "is"
    elif source_path in target_path.parents:
        relation = "is inside"
    elif target_path in source_path.parents:
        relation = "contains"
    else:
        return
    raise TargetExistsError(
        f"The output directory {target} {relation} the source adapter {source}; writing it would destroy the source. "
        "Choose an output directory outside it."
    )


def _foreign_entries(directory: Path, files: frozenset[str], prefix: str = "") -> list[str]:
    """Entries of `directory` (recursively, as relative paths; folders end in "/") that are not regular files of
    `files`. Symbolic links are foreign whatever they point to."""
    foreign = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = f"{prefix}{entry.name}"
        if entry.is_dir(follow_symlinks=False) and any(name.startswith(f"{path}/") for name in files):
            foreign += _foreign_entries(Path(entry.path), files, f"{path}/")
        elif not (entry.is_file(follow_symlinks=False) and path in files):
            foreign.append(f"{path}/" if entry.is_dir(follow_symlinks=False) else path)
    return foreign
