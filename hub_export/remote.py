"""Talking to the Hub through the official client, and turning its failures into errors that say what to do.

Nothing here passes an endpoint, cache directory or token default of its own: `huggingface_hub` reads HF_ENDPOINT,
HF_TOKEN (or the stored login), HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE as it does for every Hugging Face library.
The errors raised are `hub_export.errors` types that are also the client's own (see there).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import (
    CompactFileNotFoundError,
    HubAuthError,
    HubError,
    HubGatedRepoError,
    HubHTTPError,
    HubOfflineError,
    HubRevisionNotFoundError,
    RepoNotFoundError,
)

# The HTTP library's own error root (httpx2's in huggingface_hub 2, httpx's in 1): connection failures and
# timeouts raised by the client are its subclasses without being HfHubHTTPError.
_TRANSPORT_ERRORS = tuple(
    cls for cls in HfHubHTTPError.__mro__[1:] if cls.__module__.split(".")[0] not in ("builtins", "huggingface_hub")
)[-1:]


def fetch(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Download a repo snapshot (only `allow_patterns`) into the Hugging Face cache, or reuse the cached one.

    A revision holding none of `allow_patterns` is refused as holding no adapter: the client only warns, and returns
    the snapshot folder it would have filled, which does not exist.
    """
    with hub_errors(repo_id, revision=revision, action="download"), _our_error_for_no_match():
        path = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=allow_patterns))
    if not path.is_dir():
        raise CompactFileNotFoundError(
            f"{_where(repo_id, revision)} holds no LoRA-drop compact adapter (none of "
            f"{', '.join(allow_patterns or [])}). Check the repo id and the revision, or push an adapter there first "
            "(`loradrop push`)."
        )
    return path


@contextmanager
def _our_error_for_no_match() -> Iterator[None]:
    """Hold back huggingface_hub's "No files matched allow_patterns=[...]" warning: `fetch` raises its own error for
    that case right after, naming the repo and what to do, and the client's line before it only confuses."""
    client_logger = logging.getLogger(snapshot_download.__module__)

    def not_no_match(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files matched")

    client_logger.addFilter(not_no_match)
    try:
        yield
    finally:
        client_logger.removeFilter(not_no_match)


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}{f'@{revision}' if revision else ''} on {constants.ENDPOINT}"


@contextmanager
def hub_errors(repo_id: str, *, revision: str | None, action: str) -> Iterator[None]:
    """Re-raise the client's exceptions as `hub_export.errors` types with a message naming the repo and the fix."""
    where = _where(repo_id, revision)
    try:
        yield
    except GatedRepoError as err:
        raise _answered(
            HubGatedRepoError,
            f"Cannot {action} {where}: the repo is gated. Request access on its Hub page, then use a token of that "
            "account (HF_TOKEN or `hf auth login`).",
            err,
        ) from err
    except RevisionNotFoundError as err:
        raise _answered(
            HubRevisionNotFoundError,
            f"Cannot {action} {where}: revision {revision!r} does not exist. Check the branch, tag or commit id.",
            err,
        ) from err
    except RepositoryNotFoundError as err:
        raise _answered(
            RepoNotFoundError,
            f"Cannot {action} {where}: the repo does not exist, or it is private and the token in use cannot see it. "
            "Check the repo id, or log in (HF_TOKEN or `hf auth login`).",
            err,
        ) from err
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, RemoteEntryNotFoundError) as err:
        not_found = _file_not_found(err)
        if not_found is not None:
            raise CompactFileNotFoundError(
                f"Cannot {action} {where}: the repo lists {_requested_file(not_found)} but does not serve it (HTTP "
                "404). It is missing from the repo, which is therefore not a complete LoRA-drop compact adapter."
            ) from err
        if not constants.HF_HUB_OFFLINE:
            raise HubError(f"Cannot {action} {where}: the Hub is unreachable and nothing is cached ({err}).") from err
        if action != "download":
            raise HubOfflineError(f"Cannot {action} {where}: offline mode is on; unset HF_HUB_OFFLINE.") from err
        raise HubOfflineError(
            f"Cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE=1) and the cache "
            f"({constants.HF_HUB_CACHE}) has no copy of it. Go online once to cache it, or unset HF_HUB_OFFLINE."
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code
        detail = (err.server_message or str(err)).splitlines()[0]
        if status in (401, 403):
            raise _answered(
                HubAuthError,
                f"Cannot {action} {where}: authentication failed (HTTP {status}: {detail}). Set HF_TOKEN or run "
                f"`hf auth login` with a token that has {'write' if action.startswith('push') else 'read'} access.",
                err,
            ) from err
        raise _answered(HubHTTPError, f"Cannot {action} {where}: HTTP {status}: {detail}", err) from err
    except _TRANSPORT_ERRORS as err:
        raise HubError(f"Cannot {action} {where}: the Hub could not be reached ({type(err).__name__}: {err}).") from err


def _answered(error: type[HubHTTPError], message: str, cause: HfHubHTTPError) -> HubHTTPError:
    """`error` with `message`, carrying the Hub's answer as the client's `cause` does."""
    return error(message, response=cause.response, server_message=cause.server_message)


def _file_not_found(err: BaseException) -> HfHubHTTPError | None:
    """The 404 behind a failed file download: raised as is, or (without the Hub's error code) wrapped by the client
    into the "cannot reach the Hub, nothing cached" error."""
    cause = err if isinstance(err, RemoteEntryNotFoundError) else err.__cause__
    if isinstance(cause, HfHubHTTPError) and cause.response.status_code == 404:
        return cause
    return None


def _requested_file(err: HfHubHTTPError) -> str:
    """The repo path of the file a failed `/resolve/<revision>/<path>` request asked for."""
    path = urllib.parse.unquote(urllib.parse.urlparse(str(err.response.url)).path)
    _, found, rest = path.partition("/resolve/")
    return repr(rest.split("/", 1)[-1]) if found else "a file"
