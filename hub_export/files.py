"""Reading an adapter's own files, which may come from anyone: fixed names only, regular files only.

A cloned repo or a crafted directory can hold symbolic links (to ``~/.ssh/id_rsa``, to a file elsewhere with the
right checksum) or FIFOs under an adapter's file names. Files are opened without following links and checked to be
regular before a byte is read, and callers pass only the format's own names, so nothing outside the directory is
ever read. The one exception is a snapshot of huggingface_hub's own cache (``<cache>/<repo>/snapshots/<commit>/``,
where `load_from_hub`, `pull` and ``hf://`` sources download to), whose files are links the client itself made into
the repo's ``blobs/``: there a link is followed, but only to a file in that blob store. The cache is the one
huggingface_hub reports (`constants.HF_HUB_CACHE`, from HF_HOME/HF_HUB_CACHE), resolved: folders that are merely
named ``snapshots/`` and ``blobs/`` elsewhere (a cloned repo, a crafted archive) get no exception.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from huggingface_hub import constants
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import CompactFileNotFoundError, CompactFormatError

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block


def missing_message(path: Path) -> str:
    return f"{path} is missing: the adapter is incomplete. Download or export it again."


def has_member(directory: Path, name: str) -> bool:
    """Whether `directory` has an entry `name` at all (a link or a folder included: reading it then says what)."""
    return os.path.lexists(directory / name)


def read_member(directory: Path, name: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the adapter file `name` (a fixed name, possibly in one subfolder) of `directory`; one larger than
    `max_bytes` is refused before it is read."""
    path = directory / name
    for folder in reversed(Path(name).parents[:-1]):
        if (directory / folder).is_symlink():
            raise CompactFormatError(f"{directory / folder} is a symbolic link; an adapter's folders are real ones.")
        if not (directory / folder).is_dir():
            raise CompactFileNotFoundError(missing_message(path))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CompactFileNotFoundError(missing_message(path)) from None
    real = _cache_blob(directory, path) if stat.S_ISLNK(info.st_mode) else path
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as err:
        raise CompactFormatError(f"{path} cannot be opened ({err.strerror}); export the adapter again.") from err
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CompactFormatError(
                f"{path} is not a regular file; an adapter consists of regular files. Export the adapter again."
            )
        if max_bytes is not None and info.st_size > max_bytes:
            raise CompactFormatError(
                f"{path} holds {info.st_size:,} bytes, more than the {max_bytes:,} any adapter needs; export it again."
            )
        return handle.read()


def _cache_blob(directory: Path, link: Path) -> Path:
    """Where a link of a snapshot in huggingface_hub's cache points, if that is a file of the repo's blob store."""
    snapshot, cache = directory.resolve(), Path(constants.HF_HUB_CACHE).resolve()
    repo = snapshot.parent.parent
    if snapshot.parent.name == "snapshots" and repo.parent == cache:
        real = link.resolve()
        if real.parent == (repo / "blobs").resolve():
            return real
    raise CompactFormatError(
        f"{link} is a symbolic link; an adapter's files must be regular files inside its directory (links are "
        f"followed only in a snapshot of huggingface_hub's cache, {cache}, into its blob store). Replace the link "
        "with the file."
    )


def write_tensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, whose failures to write (a full disk, a lost mount) become an `OSError` that
    says which file: safetensors reports them as its own error type, with Rust's debug text."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        raise OSError(f"Could not write {path} ({err}); nothing was replaced. Free some space and try again.") from err
