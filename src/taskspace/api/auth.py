"""Authentication for the API and the dashboard: one shared bearer token.

A server bound to a loopback address (127.0.0.1, ::1, localhost) may run
without a token; on any other address it refuses to start without one
(:func:`check_bind`). With a token, every API call and dashboard page needs
``Authorization: Bearer <token>`` or the cookie ``taskspace_token`` (what the
dashboard's login sets); the comparison is constant-time
(``hmac.compare_digest``). ``/api/health`` stays open (it says only whether
the backend answers).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from taskspace.api.errors import ApiError
from taskspace.errors import ConfigError

TOKEN_ENV = "TASKSPACE_API_TOKEN"
COOKIE = "taskspace_token"
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (a loopback IP or ``localhost``);
    ``0.0.0.0``, ``::`` and every other name are not loopback."""
    if not isinstance(host, str) or not host:
        raise ConfigError(f"host must be a non-empty string, got {host!r}")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


def check_token(token: str | None) -> str | None:
    """``token`` if it is usable (None, or a string of at least MIN_TOKEN_LENGTH
    printable characters without spaces); ConfigError otherwise."""
    if token is None:
        return None
    if (
        not isinstance(token, str)
        or len(token) < MIN_TOKEN_LENGTH
        or not token.isprintable()
        or any(c.isspace() for c in token)
    ):
        raise ConfigError(
            f"the API token must be at least {MIN_TOKEN_LENGTH} printable characters without"
            " spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse (ConfigError) to serve on a non-loopback ``host`` without a token."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host!r} without a token: anyone who can reach it could"
            f" submit and cancel tasks. Set ${TOKEN_ENV} (or --token-env NAME), or bind to"
            " 127.0.0.1"
        )


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.cookies.get(COOKIE) or None


def token_matches(presented: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())


def require_token(request: Request) -> None:
    """FastAPI dependency: pass if the app has no token (``app.state.token`` is
    None) or the request carries it as a bearer token or the ``taskspace_token``
    cookie; otherwise a 401 ``unauthorized`` JSON error."""
    token: str | None = getattr(request.app.state, "token", None)
    if token is None:
        return
    if not token_matches(_presented(request), token):
        raise ApiError(
            401,
            "unauthorized",
            f"missing or wrong token: send `Authorization: Bearer <token>` or the cookie {COOKIE}",
            headers={"WWW-Authenticate": "Bearer"},
        )


_bearer = HTTPBearer(auto_error=False, description="The server's API token.")
_cookie = APIKeyCookie(name=COOKIE, auto_error=False, description="The token, as a cookie.")


def require_token_documented(
    request: Request,
    _b: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _c: Annotated[str | None, Security(_cookie)],
) -> None:
    """:func:`require_token`, declaring both schemes in the OpenAPI document
    (used for the API routes of a server that has a token)."""
    require_token(request)
