"""Sharing compact adapters through the Hugging Face Hub: push, pull, and load straight from a repo.

All transfers go through the official `huggingface_hub` client (`HfApi.create_repo`/`upload_folder`,
`snapshot_download`), so HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, the cache, progress bars and the "skip unchanged
files" logic behave as in every Hugging Face library. A push never touches the local files; a pull writes its target
directory only once everything is downloaded and checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from peft import PeftModel
from torch import nn
from transformers.utils import logging

from .atomic import atomic_directory
from .compact import CompactAdapter, read_compact, save_compact
from .expand import expand_to_peft
from .loader import load_compact
from .remote import PEFT_SUBFOLDER, fetch, hub_errors

logger = logging.get_logger(__name__)


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    expanded: bool = False,
) -> str:
    """Upload a compact adapter (a directory, or a tied model saved on the fly) to `repo_id`; return the commit URL.

    The repo is created if needed (`private` applies only then), and so is the branch `revision`. With
    `expanded=True` the plain PEFT adapter goes into the `peft/` subfolder of the same commit, for
    `PeftModel.from_pretrained(base, repo_id, subfolder="peft")`; without it, a `peft/` subfolder left by an earlier
    push is deleted so it cannot go stale. Unchanged files are not uploaded again; if nothing changed, no commit is
    made and the URL of the current head is returned.
    """
    with tempfile.TemporaryDirectory(prefix="loradrop-push-") as staging:
        folder, adapter = _stage(model_or_dir, Path(staging), expanded)
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
                ignore_patterns=None if expanded else [f"{PEFT_SUBFOLDER}/*"],
                delete_patterns=[f"{PEFT_SUBFOLDER}/*"],
            )
    logger.info(f"LoRA-drop: pushed to {info.commit_url}")
    return str(info.commit_url)


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

    The plain PEFT copy in `peft/` is not downloaded. In offline mode (HF_HUB_OFFLINE=1) the cached copy is used.
    """
    directory = fetch(repo_id, revision=revision, token=token, ignore_patterns=[f"{PEFT_SUBFOLDER}/*"])
    return load_compact(base_model, directory, adapter_name=adapter_name, is_trainable=is_trainable)


def pull(repo_id: str, local_dir: str | os.PathLike, revision: str | None = None, *, token: str | None = None) -> Path:
    """Download `repo_id` into `local_dir`, which appears only once the download is complete and checked.

    A failed pull (network, auth, a repo that is not a compact adapter) leaves `local_dir` as it was.
    """
    snapshot = fetch(repo_id, revision=revision, token=token)
    read_compact(snapshot)
    with atomic_directory(local_dir) as staging:
        shutil.copytree(snapshot, staging, dirs_exist_ok=True)
    logger.info(f"LoRA-drop: {repo_id} pulled into {local_dir}")
    return Path(local_dir)


def _stage(model_or_dir: nn.Module | str | os.PathLike, staging: Path, expanded: bool) -> tuple[Path, CompactAdapter]:
    """The folder to upload (the given directory itself, or a staging copy when a model or expansion is involved),
    checked before anything is sent."""
    if isinstance(model_or_dir, nn.Module):
        folder = save_compact(model_or_dir, staging / "adapter")
        adapter = read_compact(folder)
    else:
        adapter = read_compact(model_or_dir)
        folder = Path(model_or_dir)
        if expanded:  # the plain copy goes next to a copy, never into the caller's directory
            folder = Path(shutil.copytree(folder, staging / "adapter", ignore=shutil.ignore_patterns(PEFT_SUBFOLDER)))
    if expanded:
        expand_to_peft(folder, folder / PEFT_SUBFOLDER)
    return folder, adapter
