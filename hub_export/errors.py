"""Every error `hub_export` raises on purpose, in one place.

Each one subclasses the builtin a caller would expect (a missing file is a `FileNotFoundError`, a bad file a
`ValueError`, a Hub failure an `OSError`) and `ExportError`, so the `loradrop` command can report any of them as a
one-line message without a traceback. Messages name the file or repo and say what to do.

An error the Hub answered with is also the `huggingface_hub.errors` type the client raised for it, with the same
`response` and `server_message`: code written against huggingface_hub (`except RepositoryNotFoundError`) catches a
missing repo from `load_from_hub` as it would from `snapshot_download`, and `except hub_export.RepoNotFoundError`
catches it too. The client's error stays attached as `__cause__`.
"""

from __future__ import annotations

from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


class ExportError(Exception):
    """Base class of the errors below."""


class CompactFileNotFoundError(ExportError, FileNotFoundError):
    """A path that should hold a compact adapter, or one of its files, does not exist."""


class CompactFormatError(ExportError, ValueError):
    """A compact adapter's files are corrupt, truncated or inconsistent with each other."""


class UnsupportedFormatVersionError(CompactFormatError):
    """The compact adapter was written in a format version this release cannot read."""


class TargetExistsError(ExportError, FileExistsError):
    """The output directory exists and holds something that is not an adapter written by this package."""


class PlanError(ExportError, ValueError):
    """No drop plan is available for a model, or the plan does not describe how the model is tied."""


class BaseModelMismatchError(ExportError, ValueError):
    """The base model has other modules or shapes than the one the adapter was trained on."""


class BaseModelPathError(ExportError, ValueError):
    """An adapter to publish names its base model by a local path (which nobody else has), not by its Hub id."""


class RepoVisibilityError(ExportError, ValueError):
    """A push asked for a private repo and the existing repo is public, or the reverse; nothing was uploaded."""


class HubError(ExportError, OSError):
    """A Hub operation failed: the Hub could not be reached, or answered with an error (the subclasses below)."""


class HubHTTPError(HubError, HfHubHTTPError):
    """The Hub answered with an HTTP error; also a `huggingface_hub.errors.HfHubHTTPError`."""


class RepoNotFoundError(HubHTTPError, RepositoryNotFoundError):
    """The repo does not exist or is not visible with the current token; also a `RepositoryNotFoundError`."""


class HubRevisionNotFoundError(HubHTTPError, RevisionNotFoundError):
    """The repo has no such branch, tag or commit; also a `huggingface_hub.errors.RevisionNotFoundError`."""


class HubAuthError(HubHTTPError):
    """The token is missing, invalid or lacks the rights the operation needs (HTTP 401 or 403)."""


class HubGatedRepoError(HubAuthError, GatedRepoError):
    """The repo is gated and the token's account has no access yet; also a `huggingface_hub.errors.GatedRepoError`."""


class HubOfflineError(HubError):
    """Offline mode (HF_HUB_OFFLINE=1) is on and the cache has no copy of what was asked for."""
