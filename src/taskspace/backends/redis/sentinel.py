"""Redis behind Sentinel: ``redis+sentinel://`` URLs and the clients they name.

URL form::

    redis+sentinel://[[user]:password@]host1:port1[,host2:port2...]/service_name[/db][?options]

- ``host:port`` pairs are the **sentinels** (not the Redis servers), at least
  one; a port left out is 26379; IPv6 hosts go in brackets (``[::1]:26379``).
- ``service_name`` is the name the sentinels monitor (``sentinel monitor
  <service_name> ...``); ``db`` is the database number (default 0).
- ``user``/``password`` (percent-encoded) authenticate to the Redis servers
  of the service, as in a ``redis://`` URL.
- Options: ``namespace`` (taskspace's own, as for ``redis://``: several
  spaces can share one Redis) and ``sentinel_password`` (when the sentinels
  themselves require a password). Any other option is refused.

Example: ``redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/tasks/0?namespace=prod``.

Clients ask the sentinels for the current primary before each new
connection, so after a failover the next call (once the sentinels have
promoted a replica) reaches the new primary; calls in between raise
BackendError through the caller's ``conn.call``, like any Redis outage.

Failover and loss: Redis replicates asynchronously, so a failover can lose
the writes the old primary acknowledged but had not yet sent to the promoted
replica. Fencing tokens still never repeat (``next = max(last + 1, server
wall clock in microseconds)``, see ``base.py``): the promoted replica's
counter may be behind, but its wall clock is past every token the old
primary handed out, as long as the two servers' clocks agree to within the
failover's duration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from taskspace.backends.redis.conn import check_namespace, import_redis
from taskspace.errors import InvalidURL

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
OPTIONS = ("namespace", "sentinel_password")
URL_FORM = (
    "redis+sentinel://[[user]:password@]host1:port1[,host2:port2...]/service_name[/db]"
    "[?namespace=...&sentinel_password=...]"
)


@dataclass(frozen=True, slots=True)
class SentinelSettings:
    """A parsed ``redis+sentinel://`` URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    namespace: str | None = None


def _bad(url: str, what: str) -> InvalidURL:
    return InvalidURL(f"malformed Redis Sentinel URL {url!r}: {what}; expected {URL_FORM}")


def _host_port(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad(url, f"bad sentinel address {item!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _bad(url, f"sentinel address {item!r} names no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"bad port {port_text!r} in sentinel address {item!r}")
    return host, int(port_text)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None)


def _service_db(url: str, path: str) -> tuple[str, int]:
    parts = path.split("/")
    if parts and parts[-1] == "" and len(parts) > 1:  # a trailing slash
        parts.pop()
    if not parts or not parts[0]:
        raise _bad(url, "no service name (the name the sentinels monitor)")
    if len(parts) > 2:
        raise _bad(url, f"too many path segments in {'/' + path!r}")
    service = unquote(parts[0])
    if len(parts) == 1:
        return service, 0
    if not parts[1].isdigit():
        raise _bad(url, f"the database must be a number, got {parts[1]!r}")
    return service, int(parts[1])


def _options(url: str, query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidURL(
            f"unknown Redis Sentinel option(s) {', '.join(unknown)} in {url!r};"
            f" valid: {', '.join(OPTIONS)}"
        )
    return options


def parse_sentinel_url(url: str) -> SentinelSettings:
    """Parse a ``redis+sentinel://`` URL (with or without its ``namespace``
    option) without connecting to anything. Raises InvalidURL naming what is
    wrong: another scheme, no sentinel, a bad port, no service name, a
    database that is not a number, an unknown option or a bad namespace."""
    if not isinstance(url, str):
        raise InvalidURL(f"a Redis Sentinel URL must be a string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SCHEME:
        raise _bad(url, f"the scheme must be {SCHEME}://")
    if "#" in rest:
        raise _bad(url, "a URL fragment ('#') is not allowed")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    items = hosts.split(",")
    if not hosts or any(not item for item in items):
        raise _bad(url, "no sentinel address (host:port), or an empty one")
    sentinels = tuple(_host_port(url, item) for item in items)
    service, db = _service_db(url, path)
    username, password = _credentials(userinfo)
    options = _options(url, query)
    namespace = options.get("namespace")
    return SentinelSettings(
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password") or None,
        namespace=None if namespace is None else check_namespace(namespace),
    )


def _master_class(redis_mod: Any, sentinel: Any) -> Any:
    """A Redis client class whose ``close`` also closes the connections to the
    sentinels (they belong to the store, not to redis-py's shared state)."""

    class SentinelMaster(redis_mod.Redis):  # type: ignore[misc]
        def close(self) -> None:
            try:
                super().close()
            finally:
                for client in sentinel.sentinels:
                    client.close()

    return SentinelMaster


def sentinel_clients(
    url: str, socket_timeout: float, connect_timeout: float, read_timeout: float
) -> tuple[Any, Any]:
    """Two redis-py clients of the service's current primary, found through
    the sentinels of ``url``: the first with ``socket_timeout`` (scripts that
    change state), the second with the short ``read_timeout`` (reads and
    waits). Sentinels are queried with the short timeouts too.

    Nothing is connected here: a sentinel or primary that cannot be reached
    surfaces on first use as a redis-py ConnectionError (``MasterNotFoundError``
    when no sentinel names a healthy primary), which the caller's ``conn.call``
    turns into BackendError. Raises InvalidURL for a malformed URL and
    MissingDependency without redis-py."""
    settings = parse_sentinel_url(url)
    redis_mod = import_redis()
    fast_connect = min(connect_timeout, read_timeout)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": read_timeout,
        "socket_connect_timeout": fast_connect,
        # No retries per sentinel: each lookup already tries every sentinel in
        # turn, and the primary's clients retry the lookup (redis-py's default).
        "retry": redis_mod.retry.Retry(redis_mod.backoff.NoBackoff(), 0),
    }
    if settings.sentinel_password is not None:
        sentinel_kwargs["password"] = settings.sentinel_password
    try:
        sentinel = redis_mod.sentinel.Sentinel(
            list(settings.sentinels), sentinel_kwargs=sentinel_kwargs
        )
        common: dict[str, Any] = {
            "db": settings.db,
            "username": settings.username,
            "password": settings.password,
            "health_check_interval": 30,
            "redis_class": _master_class(redis_mod, sentinel),
        }
        client = sentinel.master_for(
            settings.service,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            **common,
        )
        reads = sentinel.master_for(
            settings.service,
            socket_timeout=read_timeout,
            socket_connect_timeout=fast_connect,
            **common,
        )
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"Redis Sentinel URL {url!r}: {exc}") from None
    return client, reads


__all__ = ["SCHEME", "SentinelSettings", "parse_sentinel_url", "sentinel_clients"]
