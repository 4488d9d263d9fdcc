"""Writing files and directories all at once: a reader sees the old version or the new one, never half of one.

Everything is written under a hidden temporary name next to its target (same filesystem, so the final rename is
atomic), flushed to disk, and only then renamed onto the target; if writing fails, the temporary file or directory is
removed and the target is left as it was. What lands gets the permissions an ordinary `open`/`mkdir` would give
(the umask's), not the 0600/0700 of `tempfile` or of the libraries that wrote into the staging directory.

POSIX cannot swap two directories in one step, so `staged_directory` moves an existing target aside only once the
new directory is complete, and removes it after the new one is in place: a crash between those two renames leaves the
previous version under a hidden ``.NAME.old-*`` name next to the target rather than a partial one at the target.
Leftover hidden ``.NAME.tmp-*``/``.NAME.old-*`` entries are never read and can be deleted.

This module replaces whatever is at the target; deciding whether it may (the user's files are never replaced) is the
caller's job, e.g. `hub_export.atomic`, which decides before writing and again, through `staged_directory`'s
`check`, just before the replacement.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write `data` to the file `path` atomically and durably; return the path.

    Args:
        path: the file to create or replace; its directory is created if missing.
        data: the whole content (`str` is encoded with `encoding`).
        encoding: the text encoding of a `str` `data`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = data.encode(encoding) if isinstance(data, str) else data
    tmp = _hidden_sibling(path, "tmp")
    fd = os.open(tmp, _FILE_FLAGS, 0o666)  # the umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def staged_directory(target: str | os.PathLike, *, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty hidden directory next to `target`; on a clean exit it is flushed and replaces `target`.

    If the body raises, the staging directory is removed and `target` is left exactly as it was. An existing
    `target` (a directory) is replaced as the module docstring says.

    Args:
        target: the directory to create or replace.
        check: called with `target` once the new directory is complete, just before `target` is replaced; if it
            raises, the staging directory is removed and `target` is left as it is. Writing takes time, and another
            process may put files into `target` meanwhile: a caller that decided up front that `target` may be
            replaced decides again here, so those files are refused rather than deleted with the old version.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(target, "tmp")
    staging.mkdir()  # the umask's permissions, unlike tempfile.mkdtemp's 0700
    try:
        yield staging
        _fsync_tree(staging)
        if check is not None:
            check(target)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, target: Path) -> None:
    old = None
    if os.path.lexists(target):
        old = _hidden_sibling(target, "old")
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


def _hidden_sibling(target: Path, tag: str) -> Path:
    """A fresh name next to `target` (64 random bits: creating it with O_EXCL/mkdir never meets an existing one)."""
    return target.parent / f".{target.name}.{tag}-{secrets.token_hex(8)}"


def _fsync_tree(root: Path) -> None:
    """Flush every file, and give files the permissions a plain `open` (or, for executables, `mkdir`) would under the
    umask, which writers such as safetensors (0600) and `tempfile` do not."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_file():
            ordinary = 0o777 if path.stat().st_mode & stat.S_IXUSR else 0o666
            os.chmod(path, ordinary & ~umask)
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
