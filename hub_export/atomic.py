"""Writing a directory all at once: readers see the old adapter or the new one, never half of one.

Everything is written into a hidden temporary directory next to the target (same filesystem, so the final rename is
atomic), flushed to disk, and only then renamed onto the target. An existing target is moved aside only after the new
directory is complete, and removed after the new one is in place. POSIX cannot swap two directories in one step, so a
crash between those two renames leaves the previous adapter under a hidden ``.NAME.old-*`` name next to the target
rather than a partial one at the target; leftover hidden ``.NAME.tmp-*``/``.NAME.old-*`` directories never load as an
adapter and can be deleted.

Only a directory that holds nothing but the files this package writes for that kind of output (a `Layout`) is ever
replaced: a Trainer output directory or a ``checkpoint-N/`` also holds ``adapter_config.json``, next to the optimizer
state and everything else the user cannot get back.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import TargetExistsError

_SHOWN = 6  # foreign entries named in an error message


@dataclass(frozen=True)
class Layout:
    """The files one kind of output consists of: `what` names it in messages, `files` are paths relative to it."""

    what: str
    files: frozenset[str]


@contextmanager
def atomic_directory(target: str | os.PathLike, layout: Layout) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it is flushed and renamed to `target`.

    If the body raises, the temporary directory is removed and `target` is left exactly as it was. `target` may be
    missing, empty, or hold nothing but files of `layout` (an earlier output of the same kind); anything else is
    refused with `TargetExistsError`, so a typo cannot wipe a directory of the user's files.
    """
    target = Path(target).absolute()
    check_replaceable(target, layout)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(target, "tmp")
    try:
        yield staging
        _fsync_tree(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(target: Path, layout: Layout) -> None:
    """Refuse to overwrite anything but a missing path, an empty directory or a directory of `layout`'s files."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise TargetExistsError(f"{target} exists and is not a directory; choose another output path.")
    foreign = _foreign_entries(target, layout.files)
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


def _replace(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fresh_sibling(target: Path, tag: str) -> Path:
    """Create a hidden empty directory next to `target`, with the permissions a normal `mkdir` gives (umask)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _fsync_tree(root: Path) -> None:
    """Flush every file, and give files the permissions a plain `open` would (safetensors writes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (the renames into it); only POSIX can open a directory for fsync."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
