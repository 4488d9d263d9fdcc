"""Writing a directory all at once: readers see the old adapter or the new one, never half of one.

Everything is written into a hidden temporary directory next to the target (same filesystem, so the final rename is
atomic), flushed to disk, and only then renamed onto the target. An existing target is moved aside only after the new
directory is complete, and removed after the new one is in place. POSIX cannot swap two directories in one step, so a
crash between those two renames leaves the previous adapter under a hidden ``.NAME.old-*`` name next to the target
rather than a partial one at the target; leftover hidden ``.NAME.tmp-*``/``.NAME.old-*`` directories never load as an
adapter and can be deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TargetExistsError

# A directory holding one of these was written by this package (or is a PEFT adapter) and may be replaced whole.
ADAPTER_MARKERS = ("loradrop_compact.json", "adapter_config.json")


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it is flushed and renamed to `target`.

    If the body raises, the temporary directory is removed and `target` is left exactly as it was. `target` may be
    missing, empty, or a previous adapter; any other existing path is refused, so a typo cannot wipe a directory of
    unrelated files (a Trainer output directory with checkpoints, say).
    """
    target = Path(target).absolute()
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(target, "tmp")
    try:
        yield staging
        _fsync_tree(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_replaceable(target: Path) -> None:
    """Refuse to overwrite anything but a missing path, an empty directory or an adapter directory."""
    if not target.exists():
        return
    if not target.is_dir():
        raise TargetExistsError(f"{target} exists and is not a directory; choose another output path.")
    if any(target.iterdir()) and not any((target / marker).is_file() for marker in ADAPTER_MARKERS):
        raise TargetExistsError(
            f"{target} exists and does not hold an adapter (no {' or '.join(ADAPTER_MARKERS)}); refusing to replace "
            "it. Choose a new directory, or remove this one first."
        )


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
