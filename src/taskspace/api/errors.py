"""The API's error bodies and the stable code of every taskspace error.

Every error response is ``{"error": {"code": "<stable code>", "message": "..."}}``.
The codes are part of the API: clients (``taskspace.client``) map them back to
the exception classes of :mod:`taskspace.errors`. Bad input is a 4xx that
changed nothing; a backend that is down is a 503 (``backend_unavailable``, or
``space_lost`` when the space was wiped or replaced, which needs a restart).
"""

from __future__ import annotations

import re
from typing import Any

from taskspace import errors as E

# (exception class, HTTP status, code), most specific first: the first match wins.
ERROR_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (E.InvalidURL, 422, "invalid_url"),
    (E.ConfigError, 422, "invalid_argument"),
    (E.PayloadTooLarge, 413, "payload_too_large"),
    (E.SerializationError, 422, "serialization_error"),
    (E.UnknownTask, 404, "unknown_task"),
    (E.TaskNotFound, 404, "task_not_found"),
    (E.TaskCancelled, 409, "task_cancelled"),
    (E.TaskFailed, 409, "task_failed"),
    (E.ResultTimeout, 504, "result_timeout"),
    (E.NoCurrentTask, 409, "no_current_task"),
    (E.TaskTimeout, 504, "task_timeout"),
    (E.ProcessDied, 500, "process_died"),
    (E.SpaceNotFound, 404, "space_not_found"),
    (E.Compacted, 410, "compacted"),
    (E.NotAnInteger, 422, "not_an_integer"),
    (E.LeaseLost, 409, "lease_lost"),
    (E.LockTimeout, 409, "lock_timeout"),
    (E.UpdateTimeout, 409, "update_timeout"),
    (E.VersionConflict, 409, "version_conflict"),
    (E.CachedError, 409, "cached_error"),
    (E.RateLimited, 429, "rate_limited"),
    (E.SpaceLost, 503, "space_lost"),
    (E.SubscriptionLost, 503, "backend_unavailable"),
    (E.BackendError, 503, "backend_unavailable"),
    (E.MissingDependency, 501, "missing_dependency"),
    (E.TaskspaceError, 500, "internal_error"),
)

# Codes that are not a taskspace exception raised by the space.
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "invalid_state",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_argument",
    500: "internal_error",
    503: "backend_unavailable",
}

# The exception a client raises for each code (the reverse of ERROR_TABLE, plus the HTTP codes).
CODE_EXCEPTIONS: dict[str, type[E.TaskspaceError]] = {
    code: cls for cls, _status, code in reversed(ERROR_TABLE) if issubclass(cls, E.TaskspaceError)
}
CODE_EXCEPTIONS.update(
    {
        "invalid_argument": E.ConfigError,
        "invalid_state": E.ConfigError,
        "id_conflict": E.ConfigError,
        "invalid_host": E.ConfigError,
        "request_too_large": E.ConfigError,
        "bad_request": E.ConfigError,
        "unsupported_media_type": E.ConfigError,
        "backend_unavailable": E.BackendError,
        "unauthorized": E.ConfigError,
        "forbidden": E.ConfigError,
        "not_found": E.ConfigError,
        "method_not_allowed": E.ConfigError,
    }
)


class ApiError(Exception):
    """An error the API answers with ``status`` and ``{"error": {code, message}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def classify(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and stable code of a taskspace exception (500
    ``internal_error`` for anything else)."""
    for cls, status, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


def body(code: str, message: str) -> dict[str, Any]:
    """The JSON error body."""
    return {"error": {"code": code, "message": message}}


# -- redaction: what the API and the dashboard show of a URL -------------------------------

_SECRET_PARAM = re.compile(
    r"([?&;][^=&#;\s]*(?:password|token|secret)[^=&#;\s]*=)[^&#;\s]*", re.IGNORECASE
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]+")


def redact_url(url: str) -> str:
    """``url`` with every secret replaced by ``***``: the password of its
    userinfo (``user:***@host``) and the value of every query parameter whose
    name contains ``password``, ``token`` or ``secret`` (case-insensitive, e.g.
    ``sentinel_password``). A string that is not a URL is returned with its
    query-like secrets redacted; never raises."""
    if not isinstance(url, str):
        return "(invalid url)"
    scheme, sep, rest = url.partition("://")
    if sep:
        end = len(rest)
        for stop in "/?#":
            i = rest.find(stop)
            if i != -1:
                end = min(end, i)
        netloc = rest[:end]
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            rest = f"{user}:***@{hosts}{rest[end:]}"
        url = f"{scheme}{sep}{rest}"
    return _SECRET_PARAM.sub(r"\1***", url)


def redact_text(text: str) -> str:
    """``text`` (an error message) with every URL in it passed through
    :func:`redact_url`: the one redaction used for every message the API and
    the dashboard show."""

    def one(match: re.Match[str]) -> str:
        url = match.group()
        core = url.rstrip(".,:;)]}")  # punctuation after a URL stays as it was
        return redact_url(core) + url[len(core) :]

    return _URL_IN_TEXT.sub(one, str(text))
