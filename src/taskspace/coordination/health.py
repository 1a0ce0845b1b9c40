"""Active health checks of the service registry: an HTTP(S) or TCP URL, probed
by the elected maintainer.

- ``http://`` / ``https://``: a GET; 2xx is ``passing``, 429 (Too Many
  Requests) ``warning``, any other status, a refused connection or an error
  ``critical``.
- ``tcp://host:port``: a TCP connect; connected is ``passing``, else
  ``critical``.

A check never takes longer than its ``timeout`` to *count*: one that has not
answered within it is ``critical`` ("timed out"), even if a slow server
trickles an answer in later (the socket timeout bounds each operation; the
elapsed time bounds the whole). A check never raises: every failure is a
``critical`` result with the reason as its output.

Checks connect directly, as Consul's do: ``http_proxy``/``https_proxy`` of
the maintainer's environment are ignored (a proxy would report its own
reachability, not the instance's). The one step ``timeout`` does not bound is
the host name lookup (``getaddrinfo`` has no timeout): a hung DNS lookup still
counts as ``critical`` after ``timeout``, but keeps its pool thread busy until
the resolver gives up (check numeric addresses to avoid it).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from taskspace.errors import ConfigError

Status = Literal["passing", "warning", "critical"]
STATUSES: tuple[Status, ...] = ("passing", "warning", "critical")
CHECK_SCHEMES = ("http", "https", "tcp")
OUTPUT_MAX = 256  # characters of a check's output kept in the registry
# No ProxyHandler from the environment: a check connects to the instance itself.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one check found; ``output`` says why in a few words."""

    status: Status
    output: str


def validate_check(url: object) -> str:
    """``url`` if it is a check URL this module can run; ConfigError naming it otherwise."""
    if not isinstance(url, str):
        raise ConfigError(f"check={url!r}: must be an http://, https:// or tcp://host:port URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"check={url!r}: {exc}") from None
    if parts.scheme not in CHECK_SCHEMES or not parts.hostname:
        raise ConfigError(f"check={url!r}: must be an http://, https:// or tcp://host:port URL")
    if parts.scheme == "tcp" and (port is None or parts.path not in ("", "/")):
        raise ConfigError(f"check={url!r}: a TCP check is tcp://host:port (no path)")
    return url


def run_check(url: str, timeout: float) -> CheckResult:
    """Probe ``url`` (see the module docstring) within ``timeout`` seconds."""
    start = time.monotonic()
    try:
        parts = urlsplit(url)
        result = _tcp(parts, timeout) if parts.scheme == "tcp" else _http(url, timeout)
    except Exception as exc:  # noqa: BLE001 - a check never raises: the failure is the result
        result = CheckResult("critical", f"{type(exc).__name__}: {exc}")
    if time.monotonic() - start > timeout:
        return CheckResult("critical", f"timed out after {timeout:g} s")
    return CheckResult(result.status, result.output[:OUTPUT_MAX])


def _tcp(parts: SplitResult, timeout: float) -> CheckResult:
    host, port = parts.hostname or "", parts.port or 0
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return CheckResult("passing", f"TCP connect to {host}:{port} succeeded")
    except TimeoutError:
        return CheckResult("critical", f"timed out after {timeout:g} s")
    except OSError as exc:
        return CheckResult("critical", f"TCP connect to {host}:{port} failed: {exc}")


def _http_status(code: int) -> Status:
    if 200 <= code < 300:
        return "passing"
    return "warning" if code == 429 else "critical"


def _http(url: str, timeout: float) -> CheckResult:
    request = urllib.request.Request(url, headers={"User-Agent": "taskspace-health-check"})
    try:
        with _OPENER.open(request, timeout=timeout) as reply:
            code = int(reply.status)
            body = reply.read(OUTPUT_MAX)
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read(OUTPUT_MAX) if exc.fp is not None else b""
    except TimeoutError:
        return CheckResult("critical", f"timed out after {timeout:g} s")
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return CheckResult("critical", f"timed out after {timeout:g} s")
        return CheckResult("critical", f"HTTP GET failed: {reason}")
    text = body.decode("utf-8", "replace").strip()
    return CheckResult(_http_status(code), f"HTTP {code}" + (f": {text}" if text else ""))
