"""An in-process, Hub-compatible HTTP server so tests can drive the *real* ``huggingface_hub`` client offline.

The real Hub is unreachable from CI, and mocking ``HfApi`` methods would only test our assumptions about the client.
`FakeHub` instead speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.4.0 uses for ``create_repo``,
``upload_file``/``upload_folder``, ``snapshot_download``/``hf_hub_download`` and repo/ref/commit listings, so the
client's own request building, error mapping, caching and "skip unchanged files" logic all run for real.

Only the standard library is used (``http.server`` + ``threading``) and the server only ever binds 127.0.0.1.

Usage in a test module (``hub_env`` starts the server, points the client at it, isolates ``HF_HOME``, sets
``HF_TOKEN``; pytest's ``monkeypatch`` restores everything after the server is stopped)::

    from hub_server import FakeHub, hub_env  # or `from tests.hub_server import ...` under `python -m pytest`

    @pytest.fixture
    def hub(monkeypatch, tmp_path):
        yield from hub_env(monkeypatch, tmp_path)  # FakeHub(**kwargs) options may follow

    def test_push(hub):
        create_repo("fakehub-user/x")
        upload_folder(repo_id="fakehub-user/x", folder_path=...)
        assert hub.requests_matching("POST", r"/commit/")

Client facts this module relies on (read from huggingface_hub 2.4.0 sources):

* ``constants.ENDPOINT`` / ``HUGGINGFACE_CO_URL_TEMPLATE`` and every ``HF_*`` setting are read once at import, and
  ``hf_api.api`` (behind the module-level ``create_repo``/``upload_folder``/...) captured the endpoint on creation,
  so `configure_client` patches those attributes as well as the environment.
* Upload mode comes from ``POST .../preupload/{rev}``. Answering ``"lfs"`` sends the client to Xet/LFS, so every file
  is ``"regular"`` and travels base64-encoded inside the NDJSON commit. The answer's per-file ``oid`` is compared
  with the client's ``git_hash`` (git blob SHA-1) of the local file: equal means "unchanged" and the file is dropped
  from the commit; if nothing is left, ``create_commit`` sends no commit at all and returns the current head read via
  ``GET /api/models/{repo}/revision/{rev}``. ``shouldIgnore`` is only about ``.gitignore`` and is always false here.
* ``hf_raise_for_status`` maps ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo to
  ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError`` / ``GatedRepoError``. Its
  fallback "401 on a repo URL means RepoNotFound" only matches ``https://`` URLs, so this server always sends the
  header explicitly. A 401 whose ``X-Error-Message`` is "Invalid credentials in Authorization header" (a wrong token)
  stays a plain ``HfHubHTTPError`` with status 401, exactly as with the real Hub.
* Downloads do ``HEAD /{repo}/resolve/{rev}/{path}`` (needs ``X-Repo-Commit``, ``ETag``, ``Content-Length``; an
  ``X-Xet-Hash`` header would switch to Xet) followed by a ``GET`` that only carries ``Range`` when resuming.
* 5xx answers to ``preupload``, tree listings and ``HEAD resolve`` are retried by the client with 1-8 s back-off;
  ``POST .../commit`` is not retried. Use 4xx codes or target the commit endpoint in `FakeHub.fail_next` to keep
  tests fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TOKEN = "hf_fakehub_write_token"
DEFAULT_USER = "fakehub-user"
DEFAULT_BRANCH = "main"

# Same shape as the file the real Hub puts in the initial commit of every new repo.
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

# repo type -> URL prefix used by resolve URLs and by the `url` the Hub returns on repo creation.
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# "/api/<plural>/..." segment -> repo type.
API_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_HEX40 = re.compile(r"[0-9a-f]{40}")


def git_blob_sha(data: bytes) -> str:
    """Git blob id of ``data``: the client computes the same (``utils.sha.git_hash``) to spot unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """Timestamp in the exact format ``huggingface_hub.utils.parse_datetime`` expects."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer; `error_code` becomes ``X-Error-Code``, which is what the client uses to type errors."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


@dataclass
class RequestRecord:
    """One request as the server saw it, so tests can assert on traffic (e.g. "no commit was sent")."""

    method: str
    path: str  # percent-decoded path without the query string
    query: dict[str, list[str]]
    status: int  # 0 when the connection was dropped on purpose
    token: str | None
    body: bytes = field(repr=False, default=b"")


@dataclass
class CommitRecord:
    """What a ``POST .../commit`` actually changed; `bytes_received` counts decoded file content only."""

    repo_id: str
    revision: str
    oid: str
    added: list[str]
    deleted: list[str]
    bytes_received: int


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, str]  # path -> blob oid (a full snapshot: commits are immutable)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    gated: str | bool = False
    gated_tokens: set[str] = field(default_factory=set)

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    method: str | None
    status: int  # 0 = drop the connection without answering
    remaining: int
    message: str
    error_code: str | None


@dataclass
class _Request:
    method: str
    raw_path: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    token: str | None

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        """Boolean query flag; httpx sends Python booleans as ``true``/``false``."""
        return (self.param(name, "") or "").lower() in ("1", "true", "yes")

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


class FakeHub:
    """In-memory Hub: repos with branches, tags, linear history and files, served over HTTP on 127.0.0.1.

    Knobs for tests:

    * ``tokens`` may write and read everything, ``read_tokens`` may only read (writes get 403); any other bearer
      token gets 401 "Invalid credentials in Authorization header", as on the real Hub.
    * `fail_next` / `drop_next` make the next matching requests fail, to simulate a broken push or download.
    * `requests` / `requests_matching` / `commit_log` record traffic, e.g. to prove a re-push sent no file bytes.
    * `create_repo` / `commit` / `files_at` / `head` seed and inspect state without HTTP.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        *,
        read_tokens: Iterable[str] = (),
        user: str = DEFAULT_USER,
        tree_page_size: int = 1000,
        commits_page_size: int = 50,
        gitattributes: bool = True,
    ) -> None:
        self.user = user
        self.tree_page_size = tree_page_size
        self.commits_page_size = commits_page_size
        self.gitattributes = gitattributes
        self._write_tokens = set(tokens)
        self._read_tokens = set(read_tokens)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._failures: list[_Failure] = []
        self._requests: list[RequestRecord] = []
        self._commit_log: list[CommitRecord] = []
        self._counter = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        """Bind an ephemeral port on 127.0.0.1 (never another interface) and serve in a daemon thread."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut keep-alive connections so no handler thread outlives the test."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token(self) -> str:
        """A write token, handy for ``HF_TOKEN``."""
        return sorted(self._write_tokens)[0] if self._write_tokens else ""

    # ------------------------------------------------------------------ knobs

    def add_token(self, token: str, *, write: bool = True) -> None:
        with self._lock:
            (self._write_tokens if write else self._read_tokens).add(token)

    def fail_next(
        self,
        path_regex: str,
        status: int = 500,
        *,
        count: int = 1,
        method: str | None = None,
        message: str = "Injected failure",
        error_code: str | None = None,
    ) -> None:
        """Answer the next `count` requests whose decoded path matches `path_regex` (``re.search``) with `status`.

        Example: ``hub.fail_next(r"/commit/main$", 500)`` makes the next push fail after its preupload step.
        """
        with self._lock:
            self._failures.append(_Failure(re.compile(path_regex), method, status, count, message, error_code))

    def drop_next(self, path_regex: str, *, count: int = 1, method: str | None = None) -> None:
        """Close the connection without any answer, like a proxy dying mid-push (client sees a transport error)."""
        self.fail_next(path_regex, 0, count=count, method=method)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def requests_matching(self, method: str | None = None, path_regex: str | None = None) -> list[RequestRecord]:
        pattern = re.compile(path_regex) if path_regex else None
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (pattern is None or pattern.search(r.path))
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._commit_log.clear()

    @property
    def commit_log(self) -> list[CommitRecord]:
        with self._lock:
            return list(self._commit_log)

    # ------------------------------------------------------------------ direct state access (no HTTP)

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's usual initial commit (``.gitattributes`` unless disabled)."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            files = {".gitattributes": self._store_blob(GITATTRIBUTES)} if self.gitattributes else {}
            commit = self._new_commit(None, files, "initial commit", "", self.user)
            repo.commits[commit.oid] = commit
            repo.branches[DEFAULT_BRANCH] = commit.oid
            self._repos[key] = repo
            return repo

    def repo(self, repo_id: str, *, repo_type: str = "model") -> Repo:
        with self._lock:
            return self._repos[(repo_type, repo_id)]

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        deletions: Iterable[str] = (),
        revision: str = DEFAULT_BRANCH,
        message: str = "seed commit",
        repo_type: str = "model",
    ) -> str:
        """Commit `files` on branch `revision` directly (seeding remote state for a test) and return the oid."""
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            head = repo.commits[repo.branches[revision]]
            tree = dict(head.files)
            for path in deletions:
                tree.pop(path)
            tree.update({path: self._store_blob(data) for path, data in files.items()})
            commit = self._new_commit(head.oid, tree, message, "", self.user)
            repo.commits[commit.oid] = commit
            repo.branches[revision] = commit.oid
            return commit.oid

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> str:
        with self._lock:
            return self.repo(repo_id, repo_type=repo_type).branches[branch]

    def history(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> list[str]:
        """Commit oids reachable from `revision`, newest first."""
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            return [c.oid for c in self._walk(repo, self._resolve(repo, revision))]

    def files_at(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            commit = repo.commits[self._resolve(repo, revision)]
            return {path: self._blobs[oid] for path, oid in commit.files.items()}

    def set_gated(self, repo_id: str, *, allowed_tokens: Iterable[str] = (), repo_type: str = "model") -> None:
        """Gate file downloads: tokens not in `allowed_tokens` get ``X-Error-Code: GatedRepo``."""
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            repo.gated = "manual"
            repo.gated_tokens = set(allowed_tokens)

    # ------------------------------------------------------------------ internals: storage

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_sha(data)
        self._blobs[oid] = data
        return oid

    def _new_commit(self, parent: str | None, files: dict[str, str], title: str, message: str, author: str) -> Commit:
        """Commit ids are SHA-1s over parent, tree, message and a counter, so even empty commits get new ids."""
        self._counter += 1
        tree = json.dumps(sorted(files.items()))
        seed = f"parent {parent}\ntree {tree}\nauthor {author}\ncounter {self._counter}\n\n{title}\n\n{message}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        return Commit(oid, parent, title, message, author, _now(), dict(files))

    def _walk(self, repo: Repo, oid: str | None) -> Iterator[Commit]:
        while oid is not None:
            commit = repo.commits[oid]
            yield commit
            oid = commit.parent

    def _resolve(self, repo: Repo, revision: str | None) -> str:
        """Branch, tag, ``refs/...`` name or full commit sha -> commit oid; anything else is RevisionNotFound."""
        rev = revision or DEFAULT_BRANCH
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/") :] in repo.branches:
            return repo.branches[rev[len("refs/heads/") :]]
        if rev.startswith("refs/tags/") and rev[len("refs/tags/") :] in repo.tags:
            return repo.tags[rev[len("refs/tags/") :]]
        match = re.fullmatch(r"refs/pr/(\d+)", rev)
        if match and int(match.group(1)) in repo.pull_requests:
            return repo.pull_requests[int(match.group(1))]
        if _HEX40.fullmatch(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # ------------------------------------------------------------------ internals: auth

    def _check_token(self, req: _Request) -> None:
        """A bearer token that is not ours is rejected everywhere, even on public reads, like the real Hub."""
        if req.token is not None and req.token not in self._write_tokens | self._read_tokens:
            raise HubError(401, INVALID_CREDENTIALS)

    def _get_repo(self, req: _Request, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        """Look a repo up with the Hub's access rules (private/missing repos do not leak their existence)."""
        repo = self._repos.get((repo_type, repo_id))
        not_found = "Repository not found"
        if req.token is None and (write or repo is None or repo.private):
            # The Hub answers 401 for anonymous access to private, missing or write endpoints.
            raise HubError(401, not_found, "RepoNotFound")
        if repo is None:
            raise HubError(404, not_found, "RepoNotFound")
        if write and req.token not in self._write_tokens:
            raise HubError(403, f"You don't have the rights to write to {repo_type} repo {repo_id}: read-only token")
        return repo

    def _require_user(self, req: _Request, *, write: bool) -> None:
        if req.token is None:
            raise HubError(401, "Invalid username or password.")
        if write and req.token not in self._write_tokens:
            raise HubError(403, "You don't have the rights to perform this action: read-only token")

    # ------------------------------------------------------------------ internals: request handling

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and failure.method in (None, method) and failure.pattern.search(path):
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                    return failure
        return None

    def _record(self, req: _Request, status: int) -> None:
        with self._lock:
            self._requests.append(RequestRecord(req.method, req.path, req.query, status, req.token, req.body))

    def _dispatch(self, req: _Request) -> _Response:
        with self._lock:
            seg = req.segments
            if seg[:1] == ["api"]:
                return self._dispatch_api(req, seg[1:])
            repo_type = "model"
            if seg and seg[0] in ("datasets", "spaces"):
                repo_type, seg = API_REPO_TYPES[seg[0]], seg[1:]
            if len(seg) >= 5 and seg[2] in ("resolve", "raw") and req.method in ("GET", "HEAD"):
                self._check_token(req)
                return self._resolve_file(req, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
            raise HubError(404, "Not Found")

    def _dispatch_api(self, req: _Request, seg: list[str]) -> _Response:
        m = req.method
        if seg == ["agent-harnesses"] and m == "GET":
            # Fetched by the client's user-agent builder unless telemetry is off; an empty registry disables it.
            return _Response.json({"standardEnvVars": [], "harnesses": {}})
        self._check_token(req)
        if seg == ["whoami-v2"] and m == "GET":
            self._require_user(req, write=False)
            role = "write" if req.token in self._write_tokens else "read"
            auth = {"type": "access_token", "accessToken": {"displayName": "fakehub", "role": role}}
            return _Response.json({"type": "user", "id": "0" * 24, "name": self.user, "orgs": [], "auth": auth})
        if seg == ["validate-yaml"] and m == "POST":
            return self._validate_yaml(req)
        if seg == ["repos", "create"] and m == "POST":
            return self._api_create_repo(req)
        if seg == ["repos", "delete"] and m == "DELETE":
            return self._api_delete_repo(req)
        if len(seg) >= 3 and seg[0] in API_REPO_TYPES:
            repo_type, repo_id, rest = API_REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:]
            return self._dispatch_repo(req, repo_type, repo_id, rest)
        raise HubError(404, "Not Found")

    def _dispatch_repo(self, req: _Request, repo_type: str, repo_id: str, rest: list[str]) -> _Response:
        m = req.method
        action = rest[0] if rest else ""
        if m == "GET" and not rest:
            return self._repo_info(req, repo_type, repo_id, None)
        if m == "GET" and action == "revision" and len(rest) == 2:
            return self._repo_info(req, repo_type, repo_id, rest[1])
        if m == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(req, repo_type, repo_id, rest[1], "/".join(rest[2:]))
        if m == "POST" and action == "paths-info" and len(rest) == 2:
            return self._paths_info(req, repo_type, repo_id, rest[1])
        if m == "POST" and action == "preupload" and len(rest) == 2:
            return self._preupload(req, repo_type, repo_id, rest[1])
        if m == "POST" and action == "commit" and len(rest) == 2:
            return self._commit(req, repo_type, repo_id, rest[1])
        if m == "GET" and rest == ["refs"]:
            return self._refs(req, repo_type, repo_id)
        if m == "GET" and action == "commits" and len(rest) == 2:
            return self._commits(req, repo_type, repo_id, rest[1])
        if action == "branch" and len(rest) == 2 and m in ("POST", "DELETE"):
            return self._branch(req, repo_type, repo_id, rest[1])
        if action == "tag" and len(rest) == 2 and m in ("POST", "DELETE"):
            return self._tag(req, repo_type, repo_id, rest[1])
        if m == "PUT" and rest == ["settings"]:
            return self._settings(req, repo_type, repo_id)
        # Unknown sub-route on a repo: still say whether the repo exists, like the Hub does.
        self._get_repo(req, repo_type, repo_id)
        raise HubError(404, "Not Found")

    # ------------------------------------------------------------------ endpoints: account and repos

    def _validate_yaml(self, req: _Request) -> _Response:
        """Always JSON: the client calls ``response.json()`` before checking the status."""
        content = str(req.json().get("content", ""))
        if content.startswith("---") and "\n---" not in content[3:]:
            return _Response.json({"errors": [{"message": "metadata block is not closed with '---'"}]}, 400)
        return _Response.json({"errors": [], "warnings": []})

    def _api_create_repo(self, req: _Request) -> _Response:
        self._require_user(req, write=True)
        body = req.json()
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        repo_id = f"{body.get('organization') or self.user}/{name}"
        url = f"{self.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        if (repo_type, repo_id) in self._repos:
            # `create_repo(exist_ok=True)` reads `url` from this 409 body.
            return _Response.json({"error": "You already created this model repo", "url": url}, 409)
        self.create_repo(repo_id, repo_type=repo_type, private=private)
        return _Response.json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _api_delete_repo(self, req: _Request) -> _Response:
        self._require_user(req, write=True)
        body = req.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        self._get_repo(req, repo_type, repo_id, write=True)
        del self._repos[(repo_type, repo_id)]
        return _Response.json({})

    def _settings(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        body = req.json()
        if "private" in body:
            repo.private = bool(body["private"])
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        if "gated" in body:
            repo.gated = body["gated"]
        return _Response.json({})

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        commit = repo.commits[self._resolve(repo, revision)]
        blobs = req.flag("blobs")
        siblings = []
        for path, oid in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(self._blobs[oid]), blobId=oid)
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self._blobs[oid]) for oid in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if repo_type == "space":
            info.update(sdk="static", runtime=None)
        return _Response.json(info)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)

        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        data: dict[str, Any] = {
            "branches": [ref(n, f"refs/heads/{n}", o) for n, o in sorted(repo.branches.items())],
            "tags": [ref(n, f"refs/tags/{n}", o) for n, o in sorted(repo.tags.items())],
            "converts": [],
        }
        if req.flag("include_prs"):
            data["pullRequests"] = [ref(f"refs/pr/{n}", f"refs/pr/{n}", o) for n, o in repo.pull_requests.items()]
        return _Response.json(data)

    def _branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _Response.json({})
        if branch in repo.branches or branch in repo.tags:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = req.json().get("startingPoint")
        repo.branches[branch] = self._resolve(repo, start)
        return _Response.json({})

    def _tag(self, req: _Request, repo_type: str, repo_id: str, name: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        if req.method == "DELETE":
            if name not in repo.tags:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            del repo.tags[name]
            return _Response.json({})
        tag = req.json().get("tag")  # POST .../tag/{revision} with {"tag": name}
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = self._resolve(repo, name)
        return _Response.json({})

    # ------------------------------------------------------------------ endpoints: listing

    @staticmethod
    def _folders(files: Iterable[str]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _last_commit(self, repo: Repo, head: str, path: str, is_dir: bool) -> dict[str, str]:
        """Newest commit whose change touched `path` (what ``expand=True`` adds as ``lastCommit``)."""

        def snapshot(commit: Commit | None) -> dict[str, str]:
            if commit is None:
                return {}
            if is_dir:
                return {p: o for p, o in commit.files.items() if p.startswith(path + "/")}
            return {path: commit.files[path]} if path in commit.files else {}

        found = repo.commits[head]
        for commit in self._walk(repo, head):
            parent = repo.commits[commit.parent] if commit.parent else None
            if snapshot(commit) != snapshot(parent):
                found = commit
                break
        return {"id": found.oid, "title": found.title, "date": found.date}

    def _entry(self, repo: Repo, commit: Commit, path: str, folders: set[str], expand: bool) -> dict[str, Any]:
        if path in folders:
            children = sorted((p, o) for p, o in commit.files.items() if p.startswith(path + "/"))
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": hashlib.sha1(json.dumps(children).encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        else:
            oid = commit.files[path]
            entry = {"type": "file", "oid": oid, "size": len(self._blobs[oid]), "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit.oid, path, path in folders)
        return entry

    def _paginate(self, req: _Request, items: list[Any], page_size: int) -> _Response:
        """Cursor pagination through a ``Link: <...>; rel="next"`` header, which ``_paginate_pages`` follows."""
        try:
            start = int(base64.urlsafe_b64decode((req.param("cursor") or "MA==").encode()).decode())
        except ValueError as err:
            raise HubError(400, "Invalid cursor") from err
        page = items[start : start + page_size]
        headers = {}
        if start + page_size < len(items):
            query = {k: v for k, v in req.query.items() if k != "cursor"}
            query["cursor"] = [base64.urlsafe_b64encode(str(start + page_size).encode()).decode()]
            headers["Link"] = f'<{self.endpoint}{req.raw_path}?{urllib.parse.urlencode(query, doseq=True)}>; rel="next"'
        return _Response.json(page, headers=headers)

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, base: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        commit = repo.commits[self._resolve(repo, revision)]
        folders = self._folders(commit.files)
        base = base.strip("/")
        if base and base not in folders:
            raise HubError(404, f"{base} does not exist on {revision}", "EntryNotFound")
        prefix = f"{base}/" if base else ""
        paths = [p for p in sorted(set(commit.files) | folders) if p.startswith(prefix)]
        if not req.flag("recursive"):
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
            paths.sort(key=lambda p: (p not in folders, p))  # the Hub lists folders first
        entries = [self._entry(repo, commit, p, folders, req.flag("expand")) for p in paths]
        return self._paginate(req, entries, self.tree_page_size)

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        commit = repo.commits[self._resolve(repo, revision)]
        if req.headers.get("content-type", "").startswith("application/json"):
            body = req.json()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:  # the client sends a form: paths=a&paths=b&expand=False
            form = urllib.parse.parse_qs(req.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand", ["false"])[-1].lower() == "true")
        folders = self._folders(commit.files)
        wanted = [p.strip("/") for p in paths]
        found = [p for p in dict.fromkeys(wanted) if p in commit.files or p in folders]
        return _Response.json([self._entry(repo, commit, p, folders, expand) for p in found])

    def _commits(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._get_repo(req, repo_type, repo_id)
        formatted = "formatted" in req.query.get("expand[]", [])
        items = []
        for c in self._walk(repo, self._resolve(repo, revision)):
            item: dict[str, Any] = {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.message}
            items.append(item)
        return self._paginate(req, items, self.commits_page_size)

    # ------------------------------------------------------------------ endpoints: upload

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        """Every file is "regular"; ``oid`` is the current blob id so the client can skip unchanged files."""
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        commit = repo.commits[self._resolve(repo, revision)]
        files = req.json().get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a 'files' list")
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
            for f in files
        ]
        return _Response.json({"files": answer, "commitOid": commit.oid})

    @staticmethod
    def _check_path(path: Any) -> str:
        if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
            raise HubError(400, f"Invalid path: {path!r}")
        if any(part in ("", ".", "..", ".git") for part in path.split("/")):
            raise HubError(400, f"Invalid path: {path!r}")
        return path

    def _commit(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        """Apply an NDJSON commit: a ``header`` line, then ``file`` / ``deletedFile`` / ``deletedFolder`` lines."""
        repo = self._get_repo(req, repo_type, repo_id, write=True)
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON body: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the commit header")
        header = lines[0].get("value") or {}
        create_pr = req.param("create_pr") == "1"
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
        if branch in repo.branches:
            head = repo.branches[branch]
        elif pr_match and int(pr_match.group(1)) in repo.pull_requests:
            head = repo.pull_requests[int(pr_match.group(1))]
        else:
            self._resolve(repo, revision)  # RevisionNotFound for unknown names...
            raise HubError(400, f"Cannot commit to {revision}: not a branch")  # ...and tags/shas are read-only
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head].files)
        added: list[str] = []
        deleted: list[str] = []
        received = 0
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = self._check_path(value.get("path"))
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                data = base64.b64decode(value.get("content", ""))
                received += len(data)
                if path in self._folders(tree) or any(f in tree for f in self._folders([path])):
                    raise HubError(400, f"{path} conflicts with an existing file or folder")
                tree[path] = self._store_blob(data)
                added.append(path)
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
                deleted.append(path)
            elif key == "deletedFolder":
                gone = [p for p in tree if p.startswith(path + "/")]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
                deleted.extend(gone)
            elif key == "lfsFile":
                raise HubError(400, "FakeHub only accepts regular uploads (preupload never answers 'lfs')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        title, message = str(header.get("summary", "")), str(header.get("description", ""))
        commit = self._new_commit(head, tree, title, message, self.user)
        repo.commits[commit.oid] = commit
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = commit.oid
            answer["pullRequestUrl"] = f"{self.endpoint}/{repo.url_path}/discussions/{number}"
            answer["pullRequestRevision"] = f"refs/pr/{number}"
        elif pr_match and branch not in repo.branches:
            repo.pull_requests[int(pr_match.group(1))] = commit.oid
        else:
            repo.branches[branch] = commit.oid
        self._commit_log.append(CommitRecord(repo_id, revision, commit.oid, added, deleted, received))
        return _Response.json(answer)

    # ------------------------------------------------------------------ endpoints: download

    def _resolve_file(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        """``/{repo}/resolve/{rev}/{path}``: bytes plus the ``X-Repo-Commit`` and ``ETag`` the client requires."""
        repo = self._get_repo(req, repo_type, repo_id)
        oid = self._resolve(repo, revision)
        commit_header = {"X-Repo-Commit": oid}
        if repo.gated and req.token not in repo.gated_tokens:
            status = 401 if req.token is None else 403
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            raise HubError(status, message, "GatedRepo", commit_header)
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit_header)
        data = self._blobs[blob]
        headers = {
            **commit_header,
            "ETag": f'"{blob}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        range_header = req.headers.get("range")
        if range_header is None or req.method == "HEAD":
            return _Response(200, data, headers)
        start, end = _parse_range(range_header, len(data))
        if start is None:
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, data[start : end + 1], headers)


def _parse_range(value: str, size: int) -> tuple[int | None, int]:
    """Single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range; (None, 0) when not satisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not match or match.groups() == ("", ""):
        return None, 0
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return None, 0
    return start, end


class _Handler(BaseHTTPRequestHandler):
    """Turns raw HTTP into `_Request`, applies injected failures, records traffic and writes the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    server_version = "FakeHub/1.0"
    timeout = 30  # idle keep-alive connections end on their own
    # Headers and body leave in one segment: unbuffered writes + Nagle + delayed ACK cost ~40 ms per request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request stderr logging; `FakeHub.requests` is the log."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :].strip() if auth.lower().startswith("bearer ") else None
        req = _Request(
            method=self.command,
            raw_path=split.path,
            path=urllib.parse.unquote(split.path),
            segments=[urllib.parse.unquote(s) for s in split.path.split("/")[1:] if s != ""],
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
            token=token or None,
        )
        failure = self.hub._take_failure(req.method, req.path)
        if failure is not None and failure.status == 0:
            self.hub._record(req, 0)
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if failure is not None:
            response = _error_response(HubError(failure.status, failure.message, failure.error_code))
        else:
            try:
                response = self.hub._dispatch(req)
            except HubError as err:
                response = _error_response(err)
            except Exception as err:  # a server bug must surface as a 500, not a hung client
                response = _error_response(HubError(500, f"FakeHub internal error: {err!r}"))
        self.hub._record(req, response.status)
        self.send_response(response.status)
        for name, value in response.headers.items():
            # http.server encodes headers as strict latin-1; a non-ASCII path in a message must not kill the answer.
            self.send_header(name, value if value.isascii() else value.encode("ascii", "backslashreplace").decode())
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


def _error_response(err: HubError) -> _Response:
    """Errors carry ``X-Error-Message`` (+ ``X-Error-Code``) and a JSON ``error``, like the Hub."""
    headers = {"X-Error-Message": err.message, **err.headers}
    if err.error_code:
        headers["X-Error-Code"] = err.error_code
    return _Response.json({"error": err.message}, err.status, headers)


# ---------------------------------------------------------------------- client configuration


class Patcher(Protocol):
    """The part of pytest's ``monkeypatch`` used here, so `EnvPatcher` can stand in outside pytest."""

    def setattr(self, target: Any, name: str, value: Any, raising: bool = True) -> None: ...

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None: ...

    def delenv(self, name: str, raising: bool = True) -> None: ...


class EnvPatcher:
    """Minimal stdlib stand-in for ``monkeypatch`` (scripts, benchmarks); `undo` restores everything."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any, str, Any]] = []

    def setattr(self, target: Any, name: str, value: Any, raising: bool = True) -> None:
        old = getattr(target, name, self._MISSING)
        if old is self._MISSING and raising:
            raise AttributeError(f"{target!r} has no attribute {name!r}")
        self._undo.append(("attr", target, name, old))
        setattr(target, name, value)

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        self._undo.append(("env", os.environ, name, os.environ.get(name, self._MISSING)))
        os.environ[name] = value

    def delenv(self, name: str, raising: bool = True) -> None:
        if name not in os.environ and raising:
            raise KeyError(name)
        self._undo.append(("env", os.environ, name, os.environ.get(name, self._MISSING)))
        os.environ.pop(name, None)

    def undo(self) -> None:
        while self._undo:
            kind, target, name, old = self._undo.pop()
            if kind == "attr":
                if old is self._MISSING:
                    delattr(target, name)
                else:
                    setattr(target, name, old)
            elif old is self._MISSING:
                target.pop(name, None)
            else:
                target[name] = old


def configure_client(hub: FakeHub, patcher: Patcher, hf_home: Path, *, token: str | None = None) -> None:
    """Point an already-imported ``huggingface_hub`` at `hub` with an isolated cache and token.

    Env vars cover code that imports the library later (subprocesses); the module attributes cover this process,
    where ``huggingface_hub`` (pulled in by transformers/peft in conftest) has already read its settings.
    """
    import sys

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    hf_home = Path(hf_home)
    hf_home.mkdir(parents=True, exist_ok=True)
    hub_cache = str(hf_home / "hub")
    token = hub.token if token is None else token
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": token,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        patcher.setenv(name, value)
    for name in (
        "TRANSFORMERS_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HUGGINGFACE_HUB_CACHE",
        "HF_XET_CACHE",
        "HF_ASSETS_CACHE",
        "HF_OIDC_RESOURCE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HUGGINGFACE_CO_STAGING",
    ):
        patcher.delenv(name, raising=False)

    attrs: dict[str, Any] = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "default_cache_path": hub_cache,
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in attrs.items():
        if hasattr(constants, name):
            patcher.setattr(constants, name, value)
    patcher.setattr(hf_api.api, "endpoint", hub.endpoint)
    # Modules that copied a constant by value at import time.
    copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": hub_cache},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": str(hf_home / "assets")},
        "huggingface_hub.utils._git_credential": {"ENDPOINT": hub.endpoint},
        "huggingface_hub.cli.auth": {"ENDPOINT": hub.endpoint},
        "huggingface_hub.utils.tqdm": {"HF_HUB_DISABLE_PROGRESS_BARS": True},
    }
    for module_name, values in copies.items():
        module = sys.modules.get(module_name)
        for name, value in values.items():
            if module is not None and hasattr(module, name):
                patcher.setattr(module, name, value)
    # The shared httpx client keeps connections to earlier servers and read proxy settings when it was built.
    _http.close_session()


def set_offline(patcher: Patcher, offline: bool = True) -> None:
    """Toggle offline mode for this process: the env var alone is ignored after ``huggingface_hub`` import."""
    from huggingface_hub import constants

    patcher.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    patcher.setattr(constants, "HF_HUB_OFFLINE", offline)


def hub_env(patcher: Patcher, tmp_path: Path, **hub_kwargs: Any) -> Iterator[FakeHub]:
    """Body of a pytest fixture: a started `FakeHub` with the client pointed at it; use with ``yield from``.

    ``patcher`` is pytest's ``monkeypatch`` (it undoes the patches after this generator's cleanup has stopped the
    server); ``tmp_path`` gets a private ``hf_home``. Extra keyword arguments go to `FakeHub`.
    """
    from huggingface_hub.utils import _http

    hub = FakeHub(**hub_kwargs).start()
    try:
        configure_client(hub, patcher, Path(tmp_path) / "hf_home")
        yield hub
    finally:
        _http.close_session()
        hub.stop()


@contextmanager
def running_hub(hf_home: Path, **hub_kwargs: Any) -> Iterator[FakeHub]:
    """Same as `hub_env` without pytest: ``with running_hub(tmp) as hub: ...`` restores everything on exit."""
    from huggingface_hub.utils import _http

    patcher = EnvPatcher()
    hub = FakeHub(**hub_kwargs).start()
    try:
        configure_client(hub, patcher, Path(hf_home))
        yield hub
    finally:
        _http.close_session()
        hub.stop()
        patcher.undo()
