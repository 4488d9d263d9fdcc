"""The real ``huggingface_hub`` client against `FakeHub`: proves the fake is faithful enough for hub_export tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_file,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

try:  # rootdir on sys.path (python -m pytest) or tests/ on sys.path (pytest's default rootdir-less import)
    from tests.hub_server import DEFAULT_USER, FakeHub, git_blob_sha, hub_env, running_hub, set_offline
except ImportError:  # pragma: no cover - depends on how pytest was started
    from hub_server import DEFAULT_USER, FakeHub, git_blob_sha, hub_env, running_hub, set_offline

REPO = f"{DEFAULT_USER}/adapter"
WEIGHTS = bytes(range(256)) * 256 + b"\x00tail"  # 64 KiB of binary incl. NUL bytes
README = "---\nlicense: apache-2.0\ntags:\n- lora\n---\n# Adapter\n"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    yield from hub_env(monkeypatch, tmp_path)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    (folder / "nested").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (folder / "README.md").write_text(README)
    (folder / "nested" / "adapter_config.json").write_text('{"r": 4}')
    return folder


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_environment_points_at_fake_hub(hub: FakeHub, tmp_path: Path) -> None:
    assert constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
    assert constants.HF_HUB_CACHE.startswith(str(tmp_path))
    assert constants.HF_HUB_DISABLE_XET and constants.HF_HUB_DISABLE_TELEMETRY
    assert HfApi().whoami()["name"] == DEFAULT_USER  # token comes from HF_TOKEN


def test_running_hub_restores_client_settings(tmp_path: Path) -> None:
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT"))
    with running_hub(tmp_path / "home") as hub:
        assert hub.endpoint == constants.ENDPOINT
        create_repo(REPO)
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT")) == before


def test_create_repo(hub: FakeHub) -> None:
    url = create_repo(REPO)
    assert url == f"{hub.endpoint}/{REPO}"
    assert url.repo_id == REPO
    assert create_repo(REPO, exist_ok=True) == url  # 409 body carries `url`
    with pytest.raises(HfHubHTTPError) as err:
        create_repo(REPO)
    assert err.value.response.status_code == 409
    api = HfApi()
    assert api.repo_exists(REPO)
    info = api.model_info(REPO)
    assert len(info.sha) == 40 and not info.private
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    assert create_repo("private-one", private=True).repo_id == f"{DEFAULT_USER}/private-one"  # user namespace
    assert api.model_info(f"{DEFAULT_USER}/private-one").private


def test_upload_folder_then_snapshot_is_byte_identical(hub: FakeHub, adapter_dir: Path) -> None:
    create_repo(REPO)
    info = upload_folder(repo_id=REPO, folder_path=adapter_dir, commit_message="add adapter")
    assert info.oid == hub.head(REPO)
    assert len(info.oid) == 40 and info.oid == info.oid.lower()

    hub.tree_page_size = 2  # force the client through several `Link: rel="next"` pages
    local = Path(snapshot_download(REPO))
    assert local.name == info.oid  # snapshots/<commit sha>
    assert _local_files(local) == {".gitattributes": hub.files_at(REPO)[".gitattributes"], **_local_files(adapter_dir)}
    assert len(hub.requests_matching("GET", r"/tree/")) > 1

    api = HfApi()
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *_local_files(adapter_dir)])
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {
        "nested": "RepoFolder",
        ".gitattributes": "RepoFile",
        "README.md": "RepoFile",
        "adapter_model.safetensors": "RepoFile",
    }
    (weights,) = api.get_paths_info(REPO, ["adapter_model.safetensors", "missing.bin"], expand=True)
    assert (weights.size, weights.blob_id) == (len(WEIGHTS), git_blob_sha(WEIGHTS))
    assert weights.last_commit is not None and weights.last_commit.oid == info.oid
    assert api.file_exists(REPO, "nested/adapter_config.json")
    assert not api.file_exists(REPO, "nope.txt")
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["add adapter", "initial commit"]
    assert api.list_repo_refs(REPO).branches[0].target_commit == info.oid

    # resolve answers as the client needs: ETag = git blob sha, X-Repo-Commit, no Xet, Range support.
    url = f"{hub.endpoint}/{REPO}/resolve/main/adapter_model.safetensors"
    head = get_session().head(url)
    assert head.headers["ETag"] == f'"{git_blob_sha(WEIGHTS)}"'
    assert head.headers["X-Repo-Commit"] == info.oid
    assert int(head.headers["Content-Length"]) == len(WEIGHTS)
    assert "X-Xet-Hash" not in head.headers
    part = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == WEIGHTS[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"


def test_revision_pinning_by_commit_sha(hub: FakeHub, tmp_path: Path) -> None:
    create_repo(REPO)
    first = upload_file(path_or_fileobj=b"v1", path_in_repo="weights.bin", repo_id=REPO).oid
    second = upload_file(path_or_fileobj=b"v2", path_in_repo="weights.bin", repo_id=REPO).oid
    assert first != second and hub.history(REPO)[:2] == [second, first]

    assert Path(hf_hub_download(REPO, "weights.bin", revision=first)).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "weights.bin")).read_bytes() == b"v2"
    assert (Path(snapshot_download(REPO, revision=first)) / "weights.bin").read_bytes() == b"v1"
    local_dir = tmp_path / "pinned"
    snapshot_download(REPO, revision=first, local_dir=local_dir)
    assert (local_dir / "weights.bin").read_bytes() == b"v1"

    api = HfApi()
    api.create_branch(REPO, branch="release/v1", revision=first)
    assert Path(hf_hub_download(REPO, "weights.bin", revision="release/v1")).read_bytes() == b"v1"
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "weights.bin", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")


def test_reupload_of_unchanged_files_sends_no_commit(hub: FakeHub, adapter_dir: Path) -> None:
    create_repo(REPO)
    first = upload_folder(repo_id=REPO, folder_path=adapter_dir)
    hub.clear_requests()

    again = upload_folder(repo_id=REPO, folder_path=adapter_dir)

    # 2.4.0 skips files whose preupload `oid` equals the local git blob sha; with nothing left it sends no commit
    # and returns the current head (read via GET /api/models/{repo}/revision/main).
    assert again.oid == first.oid == hub.head(REPO)
    assert hub.requests_matching("POST", r"/commit/") == []
    assert hub.commit_log == []
    assert sum(len(r.body) for r in hub.requests) < len(WEIGHTS)  # only preupload's 512-byte samples travelled
    assert [r.path for r in hub.requests_matching("POST", r"/preupload/")] == [f"/api/models/{REPO}/preupload/main"]

    (adapter_dir / "nested" / "adapter_config.json").write_text('{"r": 8}')
    changed = upload_folder(repo_id=REPO, folder_path=adapter_dir)
    (record,) = hub.commit_log
    assert record.added == ["nested/adapter_config.json"]  # unchanged weights were not re-sent
    assert record.bytes_received == len('{"r": 8}')
    assert changed.oid == record.oid == hub.head(REPO)


def test_missing_repo_and_entries_raise_typed_errors(hub: FakeHub) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{DEFAULT_USER}/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=f"{DEFAULT_USER}/missing")
    assert not api.repo_exists(f"{DEFAULT_USER}/missing")

    create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "absent.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)


def test_auth_failures(hub: FakeHub) -> None:
    create_repo(REPO)
    head = hub.head(REPO)

    # A wrong token is a plain 401 HfHubHTTPError ("Invalid credentials in Authorization header"), not "not found".
    with pytest.raises(HfHubHTTPError) as err:
        upload_file(path_or_fileobj=b"x", path_in_repo="x.bin", repo_id=REPO, token="hf_wrong")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as err:
        snapshot_download(REPO, token="hf_wrong")
    assert err.value.response.status_code == 401

    # No token on a write endpoint or a private repo: 401 + X-Error-Code RepoNotFound, as the Hub does.
    with pytest.raises(RepositoryNotFoundError):
        upload_file(path_or_fileobj=b"x", path_in_repo="x.bin", repo_id=REPO, token=False)
    create_repo("secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/secret", ".gitattributes", token=False)

    hub.add_token("hf_read_only", write=False)
    with pytest.raises(HfHubHTTPError) as err:
        upload_file(path_or_fileobj=b"x", path_in_repo="x.bin", repo_id=REPO, token="hf_read_only")
    assert err.value.response.status_code == 403
    assert hf_hub_download(REPO, ".gitattributes", token="hf_read_only")

    create_repo("gated")
    hub.set_gated(f"{DEFAULT_USER}/gated")
    with pytest.raises(GatedRepoError):
        hf_hub_download(f"{DEFAULT_USER}/gated", ".gitattributes")
    assert HfApi().repo_exists(f"{DEFAULT_USER}/gated")

    assert hub.head(REPO) == head and hub.commit_log == []


def test_injected_failures_leave_remote_untouched(hub: FakeHub, adapter_dir: Path) -> None:
    create_repo(REPO)
    head = hub.head(REPO)

    hub.fail_next(r"/commit/main$", 500)
    with pytest.raises(HfHubHTTPError) as err:
        upload_folder(repo_id=REPO, folder_path=adapter_dir)
    assert err.value.response.status_code == 500
    assert hub.head(REPO) == head

    hub.drop_next(r"/commit/", method="POST")
    with pytest.raises(httpx2.TransportError):
        upload_folder(repo_id=REPO, folder_path=adapter_dir)
    assert hub.head(REPO) == head
    assert [r.status for r in hub.requests_matching("POST", r"/commit/")] == [500, 0]

    assert upload_folder(repo_id=REPO, folder_path=adapter_dir).oid == hub.head(REPO) != head


def test_offline_mode_uses_cache_and_fails_cleanly_without(
    hub: FakeHub, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_repo(REPO)
    upload_folder(repo_id=REPO, folder_path=adapter_dir)
    online = snapshot_download(REPO)
    weights = hf_hub_download(REPO, "adapter_model.safetensors")
    hub.clear_requests()

    set_offline(monkeypatch)

    assert snapshot_download(REPO) == online
    assert _local_files(Path(online))["adapter_model.safetensors"] == WEIGHTS
    assert hf_hub_download(REPO, "adapter_model.safetensors") == weights
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(f"{DEFAULT_USER}/never-downloaded")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/never-downloaded", "config.json")
    assert hub.requests == []  # offline really means no traffic


def test_prs_tags_deletions_datasets_and_unicode_paths(hub: FakeHub) -> None:
    api = HfApi()
    create_repo(REPO)
    upload_file(path_or_fileobj=b"u", path_in_repo="sub/ünï code.txt", repo_id=REPO)
    assert Path(hf_hub_download(REPO, "sub/ünï code.txt")).read_bytes() == b"u"
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/ünï code.txt"]

    pr = upload_file(path_or_fileobj=b"pr", path_in_repo="a.txt", repo_id=REPO, create_pr=True)
    assert (pr.pr_num, pr.pr_revision) == (1, "refs/pr/1")
    assert Path(hf_hub_download(REPO, "a.txt", revision="refs/pr/1")).read_bytes() == b"pr"
    assert not api.file_exists(REPO, "a.txt")  # main untouched
    (pr_ref,) = api.list_repo_refs(REPO, include_pull_requests=True).pull_requests
    assert pr_ref.target_commit == pr.oid

    api.create_tag(REPO, tag="v1")
    api.delete_file("sub/ünï code.txt", REPO)
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert "sub/ünï code.txt" in api.list_repo_files(REPO, revision="v1")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("never-there.txt", REPO)

    stale_parent = hub.history(REPO)[1]
    with pytest.raises(HfHubHTTPError) as err:
        upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO, parent_commit=stale_parent)
    assert err.value.response.status_code == 412

    create_repo("data", repo_type="dataset")
    upload_file(path_or_fileobj=b"a,b\n", path_in_repo="d.csv", repo_id=f"{DEFAULT_USER}/data", repo_type="dataset")
    assert Path(hf_hub_download(f"{DEFAULT_USER}/data", "d.csv", repo_type="dataset")).read_bytes() == b"a,b\n"
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
