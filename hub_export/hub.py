"""Sharing compact adapters through the Hugging Face Hub: push, pull, and load straight from a repo.

All transfers go through the official `huggingface_hub` client (`HfApi.create_repo`/`upload_folder`,
`snapshot_download`), so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, the cache, progress bars and the "skip unchanged
files" logic behave as in every Hugging Face library. Only the adapter's own files travel: a push uploads a staged
copy of them (never another file of the directory, never the target of a link), a pull or load downloads nothing
else. A push never touches the local files; a pull writes its target directory only once everything is downloaded
and checked.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from peft import PeftModel
from torch import nn
from transformers.utils import logging

from .atomic import Layout, atomic_directory, check_replaceable
from .base_model import check_publishable
from .compact import read_compact, save_compact, with_base, write_compact
from .expand import PEFT_LAYOUT, write_peft
from .files import has_member, read_member
from .format import COMPACT_LAYOUT, CompactAdapter
from .loader import load_compact
from .remote import PEFT_SUBFOLDER, fetch, hub_errors

logger = logging.get_logger(__name__)

# What a pull writes: the compact adapter, and the plain PEFT copy in peft/ when the repo was pushed with it.
PULLED_LAYOUT = Layout(
    "pulled compact adapter",
    COMPACT_LAYOUT.files | {f"{PEFT_SUBFOLDER}/{name}" for name in PEFT_LAYOUT.files},
    marker=COMPACT_LAYOUT.marker,
)


class PushInfo(str):
    """The commit URL a push made (or the head's, if nothing changed); `files` lists what the repo got from it.

    A `str`, as `huggingface_hub.CommitInfo` is, so it prints and compares as the URL.
    """

    files: list[str]

    def __new__(cls, commit_url: str, files: list[str]) -> PushInfo:
        info = super().__new__(cls, commit_url)
        info.files = files
        return info


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    expanded: bool = False,
    base_model: str | None = None,
) -> PushInfo:
    """Upload a compact adapter (a directory, or a tied model saved on the fly) to `repo_id`; return the commit URL.

    Only the compact adapter's own files go up (read as regular files: a symbolic link among them is refused), with
    the plain PEFT adapter in the `peft/` subfolder of the same commit when `expanded=True`, for
    `PeftModel.from_pretrained(base, repo_id, subfolder="peft")`; without it, a `peft/` subfolder left by an earlier
    push is deleted so it cannot go stale. The repo is created if needed (`private` applies only then), and so is the
    branch `revision`. Unchanged files are not uploaded again; if nothing changed, no commit is made and the URL of
    the current head is returned. The result's `files` lists the repo paths of the adapter's files.

    The adapter must name its base model by its Hub id: `base_model="org/name"` records it (the config and the model
    card of the uploaded copy are written anew with it); an adapter naming a local path is refused with
    `BaseModelPathError` before anything is sent.
    """
    with tempfile.TemporaryDirectory(prefix="loradrop-push-") as staging:
        folder = Path(staging) / "adapter"
        adapter = _stage(model_or_dir, folder, expanded, base_model)
        files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        message = commit_message or (
            f"Upload LoRA-drop compact adapter ({len(adapter.plan.kept)}/{len(adapter.plan.kinds)} modules kept"
            f"{', with plain PEFT copy in peft/' if expanded else ''})"
        )
        api = HfApi(token=token)
        with hub_errors(repo_id, revision=revision, action="push to"):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=message,
                delete_patterns=[f"{PEFT_SUBFOLDER}/*"],
            )
    logger.info(f"LoRA-drop: pushed {', '.join(files)} to {info.commit_url}")
    return PushInfo(str(info.commit_url), files)


def load_from_hub(
    base_model: nn.Module,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """`load_compact` from a Hub repo at `revision` (branch, tag or commit id), through the Hugging Face cache.

    Only the compact adapter's files are downloaded (not the plain PEFT copy in `peft/`, nor anything else the repo
    holds). In offline mode (HF_HUB_OFFLINE=1) the cached copy is used.
    """
    directory = fetch(repo_id, revision=revision, token=token, allow_patterns=sorted(COMPACT_LAYOUT.files))
    return load_compact(base_model, directory, adapter_name=adapter_name, is_trainable=is_trainable)


def pull(repo_id: str, local_dir: str | os.PathLike, revision: str | None = None, *, token: str | None = None) -> Path:
    """Download the compact adapter of `repo_id` (and its `peft/` copy, if pushed) into `local_dir`.

    Nothing but the adapter's files is downloaded. `local_dir` must be missing, empty or an earlier pull; it appears
    only once the download is complete and checked, so a failed pull (network, auth, a repo that is not a compact
    adapter) leaves it as it was.
    """
    check_replaceable(Path(local_dir).absolute(), PULLED_LAYOUT)  # before downloading anything
    snapshot = fetch(repo_id, revision=revision, token=token, allow_patterns=sorted(PULLED_LAYOUT.files))
    read_compact(snapshot)
    with atomic_directory(local_dir, PULLED_LAYOUT) as staging:
        _copy_members(snapshot, staging, PULLED_LAYOUT)
    logger.info(f"LoRA-drop: {repo_id} pulled into {local_dir}")
    return Path(local_dir)


def _stage(
    model_or_dir: nn.Module | str | os.PathLike, folder: Path, expanded: bool, base_model: str | None
) -> CompactAdapter:
    """Write the files to upload into the new directory `folder`, checked before anything is sent."""
    if isinstance(model_or_dir, nn.Module):
        save_compact(model_or_dir, folder, base_model=base_model)
    elif base_model is not None:
        folder.mkdir()
        write_compact(with_base(read_compact(model_or_dir), base_model), folder)
    else:
        read_compact(model_or_dir)  # errors name the caller's directory, not the staging copy
        _copy_members(Path(model_or_dir), folder, COMPACT_LAYOUT)
    adapter = read_compact(folder)  # what is uploaded is exactly what was checked
    source = "The adapter of this model" if isinstance(model_or_dir, nn.Module) else f"The adapter in {model_or_dir}"
    if base_model is None:  # one given is the Hub id it names, whatever directories are here (`with_base_model`)
        check_publishable(adapter.peft_config, source)
    if expanded:
        (folder / PEFT_SUBFOLDER).mkdir()
        write_peft(adapter, folder / PEFT_SUBFOLDER)
    return adapter


def _copy_members(source: Path, target: Path, layout: Layout) -> None:
    """Copy the files of `layout` that `source` has into `target`, as regular files only (see `hub_export.files`)."""
    for name in sorted(layout.files):
        if has_member(source, name):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(read_member(source, name))
