"""Sharing LoRA-drop adapters through the Hugging Face Hub: push, pull, and load straight from a repo.

A repo holds the adapter in the forms its users load (`REPO_LAYOUT`). Its root is the uniform plain PEFT adapter
(``adapter_config.json`` and ``adapter_model.safetensors``, `hub_export.serving`): every module at one rank with its
own scaling folded into lora_B, no `rank_pattern` or `alpha_pattern`. `PeftModel.from_pretrained(base, "user/repo")`
gives the trained logits from it (bit for bit where the folded factors are powers of two, the default; the
rank-pattern form differs by float32 summation order), and so do the engines that ignore PEFT's patterns, which the
rank-pattern form is wrong in: vLLM scales every module by one `lora_alpha / r`, llama.cpp by `lora_alpha` over each
tensor's rank (README, "Serving"). In mode "truncate", ``rank_pattern/`` holds the smallest plain adapter, truncated
modules at rank k through `rank_pattern` (`expand_to_peft`), for PEFT and llama.cpp. ``loradrop/`` holds the compact
adapter (its manifest, weights, config and importance chart), which `load_from_hub` reads and which loads with the
modules tied as trained. The card at the root (``README.md``, `library_name: peft`) says which file serves which
engine, with the line that loads it. A pull writes the same layout, except that no plain adapter is ever downloaded:
both are written again from the compact one once that is checked, so a repo cannot ship a plain copy that computes
something else. Repos pushed before (the rank-pattern form at the root, or the compact adapter at the root and a plain
copy in ``peft/``) are still read, and a push into one moves it to this layout.

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
from huggingface_hub.errors import RepositoryNotFoundError
from peft import PeftModel
from torch import nn
from transformers.utils import logging

from loradrop_trainer.report import PLOT_FILE

from .atomic import Layout, atomic_directory, check_replaceable
from .base_model import check_publishable
from .compact import read_compact, save_compact, with_base, write_compact
from .errors import CompactFileNotFoundError, RepoVisibilityError
from .expand import PEFT_LAYOUT, write_peft
from .files import has_member, read_member
from .format import (
    CARD_FILE,
    COMPACT_LAYOUT,
    COMPACT_SUBFOLDER,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CompactAdapter,
    compact_folder,
)
from .loader import load_compact
from .model_card import model_card
from .modes import export_mode
from .remote import fetch, hub_errors
from .serving import check_form, write_uniform

logger = logging.get_logger(__name__)

# The compact adapter's files a repo holds in loradrop/ (its card is the repo's, at the root).
REPO_COMPACT_FILES = COMPACT_LAYOUT.files - {CARD_FILE}
# Where a repo holds the rank-pattern form (mode "truncate"), next to the uniform one at its root.
RANK_PATTERN_SUBFOLDER = "rank_pattern"
# A repo, and what a pull writes: the uniform PEFT adapter and the card at the root, the rank-pattern adapter in
# rank_pattern/, the compact adapter in loradrop/.
REPO_LAYOUT = Layout(
    "pulled LoRA-drop repo",
    PEFT_LAYOUT.files
    | {CARD_FILE}
    | {f"{RANK_PATTERN_SUBFOLDER}/{name}" for name in PEFT_LAYOUT.files}
    | {f"{COMPACT_SUBFOLDER}/{name}" for name in REPO_COMPACT_FILES},
    marker=f"{COMPACT_SUBFOLDER}/{MANIFEST_FILE}",
)
# What reading a repo downloads: the compact adapter's files, in loradrop/ or at the root of a repo pushed before.
_COMPACT_PATTERNS = sorted(REPO_COMPACT_FILES | {f"{COMPACT_SUBFOLDER}/{name}" for name in REPO_COMPACT_FILES})
# What a push deletes if an earlier push left it and this one does not upload it: the files of the layouts before this
# one that this one has not, and the rank-pattern form, which only an adapter in mode "truncate" has.
_SUPERSEDED = sorted(
    {MANIFEST_FILE, WEIGHTS_FILE, PLOT_FILE}
    | {f"peft/{name}" for name in PEFT_LAYOUT.files}
    | {f"{RANK_PATTERN_SUBFOLDER}/{name}" for name in PEFT_LAYOUT.files}
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
    base_model: str | None = None,
) -> PushInfo:
    """Upload a compact adapter (a directory, or a tied model saved on the fly) to `repo_id`; return the commit URL.

    The repo gets the layout of the module docstring: the uniform PEFT adapter at its root, for
    `PeftModel.from_pretrained(base, repo_id)` and the engines that ignore PEFT's patterns, the rank-pattern one in
    ``rank_pattern/`` (mode "truncate"), and the compact adapter's own files in ``loradrop/`` (read as regular
    files: a symbolic link among them is refused), with the card naming `repo_id` in its snippets. Files an earlier
    push left in the layout before this one are deleted, so they cannot go stale. The repo is created if needed, and
    so is the branch `revision`. `private` is the visibility asked for: a new repo gets it, and an existing repo of
    the other visibility is refused (`RepoVisibilityError`) before anything is uploaded. Unchanged files are not
    uploaded again; if nothing changed, no commit is made and the URL of the current head is returned. The result's
    `files` lists the repo paths of the adapter's files.

    The adapter must name its base model by its Hub id: `base_model="org/name"` records it (the configs and the model
    card of the uploaded copy are written anew with it); an adapter naming a local path is refused with
    `BaseModelPathError` before anything is sent.
    """
    with tempfile.TemporaryDirectory(prefix="loradrop-push-") as staging:
        source, where = _compact_source(model_or_dir, Path(staging) / "compact", base_model)
        folder = Path(staging) / "repo"
        folder.mkdir()
        adapter = _write_repo(source, folder, repo_id)
        files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        message = commit_message or (
            f"Upload LoRA-drop adapter ({len(adapter.plan.kept)}/{len(adapter.plan.kinds)} modules kept): uniform "
            f"PEFT adapter at the root, compact adapter in {COMPACT_SUBFOLDER}/"
        )
        api = HfApi(token=token)
        with hub_errors(repo_id, revision=revision, action="push to"):
            if base_model is None:  # one given is the Hub id it names, whatever directories are here
                check_publishable(adapter.peft_config, where, token)
            _check_visibility(api, repo_id, private)
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=message,
                delete_patterns=_SUPERSEDED,
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

    Only the compact adapter's files are downloaded (not the plain PEFT adapter at the root, nor anything else the
    repo holds). In offline mode (HF_HUB_OFFLINE=1) the cached copy is used.
    """
    directory = fetch_compact(repo_id, revision=revision, token=token)
    return load_compact(base_model, directory, adapter_name=adapter_name, is_trainable=is_trainable)


def pull(repo_id: str, local_dir: str | os.PathLike, revision: str | None = None, *, token: str | None = None) -> Path:
    """Download the compact adapter of `repo_id` into `local_dir`, laid out as the repo is (see the module docstring).

    Only the compact adapter's files are downloaded; the plain PEFT adapter at the root of `local_dir` is expanded
    from them once they are checked, never taken from the repo. `local_dir` must be missing, empty or an earlier pull;
    it appears only once everything is written and checked, so a failed pull (network, auth, a repo that is not a
    compact adapter) leaves it as it was.
    """
    check_replaceable(Path(local_dir).absolute(), REPO_LAYOUT)  # before downloading anything
    snapshot = fetch_compact(repo_id, revision=revision, token=token)
    read_compact(snapshot)  # errors name the download, not the staging directory
    with atomic_directory(local_dir, REPO_LAYOUT) as staging:
        _write_repo(snapshot, staging, repo_id)
    logger.info(f"LoRA-drop: {repo_id} pulled into {local_dir}")
    return Path(local_dir)


def fetch_compact(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The snapshot (in the Hugging Face cache) of the compact adapter's files of `repo_id`, which `read_compact`
    reads whichever layout the repo has; nothing else the repo holds is downloaded."""
    snapshot = fetch(repo_id, revision=revision, token=token, allow_patterns=_COMPACT_PATTERNS)
    if not has_member(snapshot, compact_folder(snapshot) + MANIFEST_FILE):
        raise CompactFileNotFoundError(
            f"{repo_id}{f'@{revision}' if revision else ''} has no {COMPACT_SUBFOLDER}/{MANIFEST_FILE}: it is not a "
            f"LoRA-drop compact adapter. If it is a plain PEFT adapter, load it with "
            f"peft.PeftModel.from_pretrained(base, {repo_id!r})."
        )
    return snapshot


def _compact_source(
    model_or_dir: nn.Module | str | os.PathLike, staging: Path, base_model: str | None
) -> tuple[Path, str]:
    """The compact adapter to publish, checked, and how messages name it: the caller's directory as it is, or a copy
    written into `staging` (a model's adapter, or an adapter given the base model id `base_model`)."""
    if isinstance(model_or_dir, nn.Module):
        return save_compact(model_or_dir, staging, base_model=base_model), "The adapter of this model"
    adapter = read_compact(model_or_dir)  # errors name the caller's directory, not the staging copy
    if base_model is None:
        return Path(model_or_dir), f"The adapter in {model_or_dir}"
    staging.mkdir()
    write_compact(with_base(adapter, base_model), staging)
    return staging, f"The adapter in {model_or_dir}"


def _write_repo(source: Path, target: Path, repo_id: str) -> CompactAdapter:
    """Write the files of `repo_id` into the existing, empty `target`, from the compact adapter in `source` (a compact
    adapter directory, or a repo's download in any layout): its own files byte for byte into loradrop/, where they
    are read back and checked; from that copy, the uniform PEFT adapter at the root and, in mode "truncate", the
    rank-pattern one in rank_pattern/; the repo's card. Refused before anything is written where the uniform form
    cannot carry the adapter (`serving.check_form`)."""
    folder = compact_folder(source)
    (target / COMPACT_SUBFOLDER).mkdir()
    for name in sorted(REPO_COMPACT_FILES):
        if has_member(source, folder + name):
            (target / COMPACT_SUBFOLDER / name).write_bytes(read_member(source, folder + name))
    adapter = read_compact(target)  # what goes up, or into a pulled directory, is exactly what was checked
    check_form(adapter, "uniform", f"the adapter for {repo_id}")
    write_uniform(adapter, target)
    if export_mode(adapter.plan).rank_pattern_form:
        (target / RANK_PATTERN_SUBFOLDER).mkdir()
        write_peft(adapter, target / RANK_PATTERN_SUBFOLDER)
    model_card(adapter, f"{COMPACT_SUBFOLDER}/{PLOT_FILE}", repo_id).save(target / CARD_FILE)
    return adapter


def _check_visibility(api: HfApi, repo_id: str, private: bool | None) -> None:
    """Refuse to push into an existing repo of the other visibility than `private` asks for: `create_repo` applies it
    only to a repo it creates, so `private=True` would otherwise publish into a public repo."""
    if private is None:
        return
    try:
        is_private = api.repo_info(repo_id).private
    except RepositoryNotFoundError:
        return  # create_repo makes it with the visibility asked for
    if is_private != private:
        asked, found = ("private", "public") if private else ("public", "private")
        raise RepoVisibilityError(
            f"{repo_id} is a {found} repo, but the push asks for a {asked} one (private={private}); nothing was "
            f"uploaded. Change the repo's visibility in its settings on the Hub first, push to another repo, or leave "
            "the visibility unset (no --private) to push into it as it is."
        )
