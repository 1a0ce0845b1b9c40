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
import re
from collections.abc import Iterable
from typing import Annotated
from urllib.parse import urlsplit

import orjson
from fastapi import Request, Security
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from taskspace.api.errors import ApiError, body
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


# -- Host check (DNS rebinding) ------------------------------------------------------

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9\-.]*[a-z0-9])?\.?|\[[0-9a-f:.]+\]", re.IGNORECASE)


def host_name(value: str) -> str | None:
    """The lower-cased name of a ``Host`` header value (``name``, ``name:port``,
    ``[v6]`` or ``[v6]:port``; an IPv6 address in brackets, a trailing dot
    dropped); None if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    if not name or not _HOST_NAME.fullmatch(name):
        return None
    return name.rstrip(".") if not name.startswith("[") else name


def allowed_host_names(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server bound to ``bound`` serves: the loopback names,
    ``bound`` itself and ``extra`` (host names or IP addresses, without a
    port); ConfigError naming ``allowed_hosts`` for a value that is not one."""
    if isinstance(extra, str):
        raise ConfigError(f"allowed_hosts must be a sequence of host names, got {extra!r}")
    names = set(LOOPBACK_NAMES)
    for value in [bound, *extra]:
        label = "host" if value is bound else "allowed_hosts"
        if not isinstance(value, str):
            raise ConfigError(f"{label}: a host name must be a string, got {value!r}")
        try:
            bare = ipaddress.ip_address(value.strip("[]"))
            name = f"[{bare}]" if bare.version == 6 else str(bare)
        except ValueError:
            name = host_name(value) or ""
            if not name or name != value.lower().rstrip("."):
                raise ConfigError(
                    f"{label}: {value!r} is not a host name or IP address (give it without"
                    " a scheme or port, e.g. dash.example.com)"
                ) from None
        names.add(name)
    return frozenset(names)


class HostCheck:
    """ASGI middleware: refuse (400 ``invalid_host``) an HTTP request whose
    ``Host`` header names a host outside ``allowed`` (see
    :func:`allowed_host_names`; a request without a Host header is served:
    browsers always send one), and (403 ``forbidden``) a POST whose ``Origin``
    is neither an allowed host nor one of ``cors_origins``."""

    def __init__(
        self, app: ASGIApp, allowed: frozenset[str], cors_origins: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.allowed = allowed
        self.cors_origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        host = headers.get(b"host")
        if host is not None and host_name(host.decode("latin-1")) not in self.allowed:
            shown = host.decode("latin-1")[:100]
            await _refuse(send, 400, "invalid_host",
                          f"Host {shown!r} is not served here (DNS rebinding guard); start"
                          " the server with --allowed-host NAME to serve it")  # fmt: skip
            return
        origin = headers.get(b"origin")
        if scope["method"] == "POST" and origin is not None and not self._origin_ok(origin):
            await _refuse(
                send, 403, "forbidden", "cross-site POST refused (its Origin is not served)"
            )
            return
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: bytes) -> bool:
        text = origin.decode("latin-1").strip().lower()
        if text.rstrip("/") in self.cors_origins:
            return True
        try:
            netloc = urlsplit(text).netloc
        except ValueError:
            return False
        return bool(netloc) and host_name(netloc) in self.allowed


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    data = orjson.dumps(body(code, message))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
