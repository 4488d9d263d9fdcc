"""A Hub-compatible HTTP server on 127.0.0.1, so tests drive the *real* ``huggingface_hub`` client offline.

Mocking ``HfApi`` would only test our assumptions about the client. `FakeHub` instead answers the requests that
hub_export, the ``loradrop`` command and the Hugging Face loaders they rely on send, so the client's own request
building, error typing, caching and "skip unchanged files" logic all run for real (standard library only):

* ``POST /api/repos/create`` (a 409 still carries ``url``: ``create_repo(exist_ok=True)`` reads it),
  ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml`` (model cards);
* uploads: ``POST .../preupload/{rev}`` answers every file "regular" (never "lfs", which sends the client to Xet)
  with the current blob id, which the client compares with its git hash of the local file to leave unchanged files
  out; then ``POST .../commit/{rev}`` (NDJSON: header, base64 ``file`` and ``deletedFile`` lines), or no commit at all
  when nothing changed;
* downloads: ``GET /api/models/{repo}[/revision/{rev}]``, ``GET .../tree/{rev}`` and ``HEAD``/``GET
  /{repo}/resolve/{rev}/{path}``, which must send ``X-Repo-Commit`` and ``ETag`` (and never ``X-Xet-Hash``).

Errors are typed by the ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound), as on the Hub. A
wrong token gets 401 "Invalid credentials in Authorization header" and a read-only one 403 on writes.

The client is configured only through its public settings (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_XET, ...),
which huggingface_hub reads once, when it is imported. So `serve_for_session` starts one server for the whole test
session and sets them before anything imports huggingface_hub (tests/conftest.py calls it first); each test that uses
the Hub starts from an empty Hub and an empty cache (`FakeHub.reset`), and child processes (a test's subprocess with
HF_HUB_OFFLINE=1, say) inherit the settings and talk to the same server.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import urllib.parse
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_TOKEN = "hf_fakehub_write_token"
DEFAULT_USER = "fakehub-user"
DEFAULT_BRANCH = "main"
# What the Hub puts in the first commit of every new repo (a download that filters files must skip it).
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def git_blob_sha(data: bytes) -> str:
    """Git blob id of `data`: the client computes the same (``utils.sha.git_hash``) to spot unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error answer; `error_code` becomes ``X-Error-Code``, which is what the client types errors by."""

    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


@dataclass
class Request:
    """One request as the server saw it, so tests can assert on traffic ("no commit was sent")."""

    method: str
    path: str  # percent-decoded, without the query string
    segments: list[str]  # the path's percent-decoded parts (a revision "refs/heads/x" is one part)
    token: str | None
    body: bytes = field(repr=False, default=b"")

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, str]  # path -> blob id: a full snapshot, commits are immutable


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    status: int
    remaining: int
    message: str
    error_code: str | None


class FakeHub:
    """In-memory model repos (branches, linear history, files), served over HTTP on 127.0.0.1.

    Knobs for tests: `add_token` (a read-only token gets 403 on writes), `fail_next` (make the next matching requests
    fail), `requests`/`requests_matching`/`clear_requests` (the traffic), and `create_repo`/`commit`/`head`/
    `files_at`/`repo` to seed and inspect state without HTTP.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="FakeHub", daemon=True)
        self.reset()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget every repo, token, injected failure and request: a fresh Hub for the next test."""
        with self._lock:
            self._write_tokens, self._read_tokens = {DEFAULT_TOKEN}, set()
            self._repos: dict[str, Repo] = {}
            self._blobs: dict[str, bytes] = {}
            self._failures: list[_Failure] = []
            self._requests: list[Request] = []
            self._counter = 0

    # ------------------------------------------------------------------ knobs

    def add_token(self, token: str, *, write: bool = True) -> None:
        with self._lock:
            (self._write_tokens if write else self._read_tokens).add(token)

    def fail_next(
        self,
        path_regex: str,
        status: int,
        *,
        count: int = 1,
        message: str = "Injected failure",
        error_code: str | None = None,
    ) -> None:
        """Answer the next `count` requests whose decoded path matches `path_regex` (``re.search``) with `status`."""
        with self._lock:
            self._failures.append(_Failure(re.compile(path_regex), status, count, message, error_code))

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def requests_matching(self, method: str, path_regex: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(path_regex, r.path)]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ state without HTTP

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create a repo with the Hub's usual initial commit (``.gitattributes``)."""
        with self._lock:
            repo = self._repos[repo_id] = Repo(private=private)
            commit = self._new_commit(None, {".gitattributes": self._store_blob(GITATTRIBUTES)}, "initial commit")
            repo.commits[commit.oid] = commit
            repo.branches[DEFAULT_BRANCH] = commit.oid
            return repo

    def repo(self, repo_id: str) -> Repo:
        with self._lock:
            return self._repos[repo_id]

    def commit(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Commit `files` on the default branch directly (seeding remote state for a test); return the commit id."""
        with self._lock:
            repo = self.repo(repo_id)
            head = repo.commits[repo.branches[DEFAULT_BRANCH]]
            tree = {**head.files, **{path: self._store_blob(data) for path, data in files.items()}}
            commit = self._new_commit(head.oid, tree, "seed commit")
            repo.commits[commit.oid] = commit
            repo.branches[DEFAULT_BRANCH] = commit.oid
            return commit.oid

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str:
        with self._lock:
            return self.repo(repo_id).branches[branch]

    def files_at(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        with self._lock:
            repo = self.repo(repo_id)
            return {path: self._blobs[oid] for path, oid in repo.commits[self._resolve(repo, revision)].files.items()}

    # ------------------------------------------------------------------ internals

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_sha(data)
        self._blobs[oid] = data
        return oid

    def _new_commit(self, parent: str | None, files: dict[str, str], title: str) -> Commit:
        """Commit ids are SHA-1s over parent, tree, title and a counter, so even equal commits get new ids."""
        self._counter += 1
        seed = f"{parent}\n{sorted(files.items())}\n{self._counter}\n{title}"
        return Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, dict(files))

    def _resolve(self, repo: Repo, revision: str | None) -> str:
        """Branch name or full commit id -> commit id; anything else is RevisionNotFound."""
        rev = (revision or DEFAULT_BRANCH).removeprefix("refs/heads/")
        if rev in repo.branches:
            return repo.branches[rev]
        if _COMMIT_ID.fullmatch(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _get_repo(self, req: Request, repo_id: str, *, write: bool = False) -> Repo:
        """Look a repo up with the Hub's access rules (a private or missing repo does not reveal which it is)."""
        repo = self._repos.get(repo_id)
        if req.token is None and (write or repo is None or repo.private):
            raise HubError(401, "Repository not found", "RepoNotFound")
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and req.token not in self._write_tokens:
            raise HubError(403, f"You don't have the rights to write to {repo_id}: read-only token")
        return repo

    def _take_failure(self, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.pattern.search(path):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _answer(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self._requests.append(req)
            failure = self._take_failure(req.path)
            try:
                if failure is not None:
                    raise HubError(failure.status, failure.message, failure.error_code)
                if req.token is not None and req.token not in self._write_tokens | self._read_tokens:
                    raise HubError(401, INVALID_CREDENTIALS)  # everywhere, even on public reads, like the Hub
                return self._route(req)
            except HubError as err:  # errors carry X-Error-Message (+ X-Error-Code) and a JSON `error`, like the Hub
                headers = {
                    "X-Error-Message": err.message,
                    **({"X-Error-Code": err.error_code} if err.error_code else {}),
                }
                return _json({"error": err.message}, err.status, headers)

    def _route(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        segments = req.segments
        if segments[:1] != ["api"]:
            if len(segments) >= 5 and segments[2] == "resolve" and req.method in ("GET", "HEAD"):
                return self._resolve_file(req, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
            raise HubError(404, "Not Found")
        route = (req.method, *segments[1:3])
        if route == ("POST", "repos", "create"):
            return self._create_repo(req)
        if route == ("POST", "validate-yaml"):
            return _json({"errors": [], "warnings": []})  # the client reads JSON before the status
        if segments[1:2] != ["models"] or len(segments) < 4:
            raise HubError(404, "Not Found")
        repo_id, action, rest = "/".join(segments[2:4]), segments[4] if len(segments) > 4 else "", segments[5:]
        repo = self._get_repo(req, repo_id, write=req.method == "POST")
        if req.method == "GET" and action in ("", "revision"):
            return self._repo_info(repo_id, repo, rest[0] if rest else None)
        if req.method == "GET" and action == "tree" and rest:
            return self._tree(repo, rest[0])
        if req.method == "POST" and action == "preupload" and rest:
            return self._preupload(req, repo, rest[0])
        if req.method == "POST" and action == "commit" and rest:
            return self._commit(req, repo_id, repo, rest[0])
        if req.method == "POST" and action == "branch" and rest:
            if rest[0] in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rest[0]}")
            repo.branches[rest[0]] = self._resolve(repo, req.json().get("startingPoint"))
            return _json({})
        raise HubError(404, "Not Found")

    def _create_repo(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        if req.token is None:
            raise HubError(401, "Invalid username or password.")
        if req.token not in self._write_tokens:
            raise HubError(403, "You don't have the rights to perform this action: read-only token")
        body = req.json()
        repo_id = f"{body.get('organization') or DEFAULT_USER}/{body.get('name')}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            return _json({"error": "You already created this model repo", "url": url}, 409)
        self.create_repo(repo_id, private=body.get("visibility") == "private")
        return _json({"url": url, "name": repo_id})

    def _repo_info(self, repo_id: str, repo: Repo, revision: str | None) -> tuple[int, bytes, dict[str, str]]:
        commit = repo.commits[self._resolve(repo, revision)]
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return _json(
            {"id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}
        )

    def _tree(self, repo: Repo, revision: str) -> tuple[int, bytes, dict[str, str]]:
        """The recursive listing (files and folders) the client pages through; one page is enough here."""
        files = repo.commits[self._resolve(repo, revision)].files
        folders = sorted({path.rsplit("/", 1)[0] for path in files if "/" in path})
        entries = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": path} for path in folders]
        entries += [{"type": "file", "oid": oid, "size": len(self._blobs[oid]), "path": p} for p, oid in files.items()]
        return _json(entries)

    def _preupload(self, req: Request, repo: Repo, revision: str) -> tuple[int, bytes, dict[str, str]]:
        files = repo.commits[self._resolve(repo, revision)].files
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
            for f in req.json().get("files", [])
        ]
        return _json({"files": answer})

    def _commit(self, req: Request, repo_id: str, repo: Repo, revision: str) -> tuple[int, bytes, dict[str, str]]:
        """Apply an NDJSON commit to a branch: a ``header`` line, then ``file`` and ``deletedFile`` lines."""
        branch = revision.removeprefix("refs/heads/")
        head = repo.commits[self._resolve(repo, branch)]
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        tree = dict(head.files)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = self._store_blob(base64.b64decode(value["content"]))
            elif line["key"] == "deletedFile":
                del tree[value["path"]]
            else:
                raise HubError(400, f"FakeHub does not take {line['key']!r} operations")
        commit = self._new_commit(head.oid, tree, str(lines[0]["value"].get("summary", "")))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return _json(
            {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}"}
        )

    def _resolve_file(self, req: Request, repo_id: str, revision: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        repo = self._get_repo(req, repo_id)
        oid = self._resolve(repo, revision)
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob}"', "Content-Type": "application/octet-stream"}
        return 200, self._blobs[blob], headers


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}


class _Handler(BaseHTTPRequestHandler):
    """Turns raw HTTP into a `Request` for `FakeHub._answer` and writes its answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    # Headers and body leave in one segment: unbuffered writes + Nagle + delayed ACK cost ~40 ms per request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: `FakeHub.requests` is the log."""

    def _handle(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        auth = self.headers.get("Authorization", "")
        request = Request(
            method=self.command,
            path=urllib.parse.unquote(path),
            segments=[urllib.parse.unquote(part) for part in path.strip("/").split("/")],
            token=auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None,
            body=self.rfile.read(int(self.headers.get("Content-Length") or 0)),
        )
        status, content, headers = self.server.hub._answer(request)  # type: ignore[attr-defined]
        self.send_response(status)
        for name, value in headers.items():
            # http.server encodes headers as strict latin-1; a non-ASCII path in a message must not kill the answer.
            self.send_header(name, value.encode("ascii", "backslashreplace").decode())
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_HEAD = do_POST = _handle


# ---------------------------------------------------------------------- the session's Hub and client settings

_SESSION_ENDPOINT = "LORADROP_TEST_HUB"  # set by the process that serves the session's Hub, inherited by children


def serve_for_session() -> FakeHub | None:
    """Start the session's `FakeHub` and point huggingface_hub at it, with a private HF_HOME and the write token.

    Returns None in a child process of the session (it uses its parent's server, whose settings it inherited).
    Raises if huggingface_hub was imported already: it would not see these settings.
    """
    if os.environ.get(_SESSION_ENDPOINT):
        return None
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("huggingface_hub was imported before the test Hub was set up; it reads its settings once.")
    hub = FakeHub().start()
    home = Path(tempfile.mkdtemp(prefix="loradrop-hf-home-"))
    settings = {
        _SESSION_ENDPOINT: hub.endpoint,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_TOKEN": DEFAULT_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    os.environ.update(settings)
    for name in (  # settings of the machine's own that would win over HF_HOME or reach elsewhere
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_XET_CACHE",
        "HF_ASSETS_CACHE",
        "HF_TOKEN_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
    ):
        os.environ.pop(name, None)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    atexit.register(hub.stop)
    return hub


def clear_client_cache() -> None:
    """Empty the huggingface_hub cache of the session (HF_HOME/hub), as on a machine that never downloaded."""
    with suppress(FileNotFoundError):
        shutil.rmtree(Path(os.environ["HF_HOME"]) / "hub")
