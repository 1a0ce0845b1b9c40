"""Backend URLs, parsed once into typed settings, and the stores they open.

URLs follow SQLAlchemy's forms:

- ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db``, options
  ``synchronous`` (``normal`` | ``full`` | ``off``), ``busy_timeout`` (seconds)
  and ``poll_ms`` (cap of the idle polling backoff, milliseconds);
- ``memory://`` (a fresh store) or ``memory://name`` (shared in this process);
- ``redis://[:password@]host:port/db``, ``rediss://…`` (TLS) and
  ``unix:///path/to/redis.sock`` as redis-py parses them, plus taskspace's own
  ``namespace`` option (several spaces can share one Redis);
- ``redis+sentinel://…``: Redis behind Sentinels, which name the master
  (the form is documented in ``taskspace.backends.redis.sentinel``), with the
  same ``namespace`` option;
- ``postgresql://user@host:port/db``, ``postgres://…`` and
  ``postgresql+psycopg://…`` with libpq's options and taskspace's ``schema``
  (alias ``namespace``), ``pool_min``, ``pool_max``, ``connect_timeout`` and
  ``statement_timeout`` (``taskspace.backends.postgres.conn``).

Every scheme is imported explicitly here; an unknown scheme or option raises
:class:`~taskspace.errors.InvalidURL` naming what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskspace.backends.base import Clock, Store
from taskspace.backends.memory import MemoryStore, open_memory
from taskspace.backends.sqlite import SQLiteSettings, SQLiteStore
from taskspace.errors import InvalidURL, SpaceNotFound

SCHEMES = (
    "sqlite",
    "memory",
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "postgresql",
    "postgres",
    "postgresql+psycopg",
)
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
SQLITE_OPTIONS = ("synchronous", "busy_timeout", "poll_ms")
SYNCHRONOUS_MODES = ("normal", "full", "off")


def _sqlite_settings(url: str) -> SQLiteSettings:
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise InvalidURL(
            f"malformed SQLite URL {url!r}; use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db"
        )
    path, _, query = url[len(prefix) :].partition("?")
    if not path:
        raise InvalidURL(f"SQLite URL {url!r} names no database file")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(options) - set(SQLITE_OPTIONS))
    if unknown:
        raise InvalidURL(
            f"unknown SQLite option(s) {', '.join(unknown)} in {url!r};"
            f" valid: {', '.join(SQLITE_OPTIONS)}"
        )
    synchronous = options.get("synchronous", "normal").lower()
    if synchronous not in SYNCHRONOUS_MODES:
        raise InvalidURL(
            f"synchronous={synchronous!r} in {url!r}; valid: {', '.join(SYNCHRONOUS_MODES)}"
        )
    return SQLiteSettings(
        path=path,
        synchronous=synchronous,
        busy_timeout=_positive(options, "busy_timeout", 30.0, url),
        poll_ms=_positive(options, "poll_ms", 2.0, url),
    )


def _positive(options: dict[str, str], key: str, default: float, url: str) -> float:
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidURL(f"{key}={options[key]!r} in {url!r} must be a positive number")
    return value


def display_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def scheme_of(url: str) -> str:
    """The backend scheme of ``url``; raises InvalidURL if it is not one we support."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(
            f"malformed backend URL {url!r}; expected e.g. sqlite:///.taskspace/space.db"
            " or memory://"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise InvalidURL(
            f"unsupported backend {scheme!r} in {url!r}; supported: {', '.join(SCHEMES)}"
        )
    return scheme


def _check_redis_url(url: str) -> None:
    if url.split("://", 1)[0].lower() == "redis+sentinel":
        from taskspace.backends.redis.sentinel import parse_sentinel_url

        parse_sentinel_url(url)  # the namespace option included
        return
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidURL(f"malformed port in Redis URL {url!r}") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise InvalidURL(f"Redis database must be a number in {url!r}, got {db!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise InvalidURL(f"Redis URL {url!r} names no host")


def validate_url(url: str) -> str:
    """Check ``url`` fully without opening anything; return its scheme."""
    scheme = scheme_of(url)
    if scheme == "sqlite":
        _sqlite_settings(url)
    elif scheme in REDIS_SCHEMES:
        _check_redis_url(url)
    elif scheme in POSTGRES_SCHEMES:
        from taskspace.backends.postgres.conn import parse_url

        parse_url(url)
    elif urlsplit(url).query:
        raise InvalidURL(f"memory:// takes no options, got {url!r}")
    return scheme


def _with_schema(url: str, namespace: str) -> str:
    """``url`` with its schema set to ``namespace`` (Space(namespace=...))."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("schema", "namespace")]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", namespace)])))


def open_store(
    url: str, clock: Clock | None = None, namespace: str | None = None, create: bool = True
) -> Store:
    """Open the store that ``url`` names. ``clock`` (a test's ManualClock)
    applies to memory:// and SQLite, ``namespace`` to Redis only (a SQLite
    space is namespaced by its file).

    ``create=False`` (read-only commands): a space that does not exist raises
    SpaceNotFound and nothing is created (a SQLite file that does not exist, a
    Redis namespace without a space id; memory spaces always exist)."""
    scheme = validate_url(url)
    if clock is not None and scheme in (*REDIS_SCHEMES, *POSTGRES_SCHEMES):
        raise InvalidURL(f"an injected clock is not valid for {url!r} (its clock is the server's)")
    if scheme in REDIS_SCHEMES:
        from taskspace.backends.redis import RedisStore

        return RedisStore(url, namespace=namespace, create=create)
    if scheme in POSTGRES_SCHEMES:
        from taskspace.backends.postgres import PostgresStore

        if namespace is not None:
            url = _with_schema(url, namespace)
        return PostgresStore(url, create=create)
    if namespace is not None:
        raise InvalidURL(f"namespace applies to Redis and PostgreSQL spaces only, not {url!r}")
    if scheme == "memory":
        name = url.split("://", 1)[1]
        return MemoryStore(clock=clock, url=url) if clock is not None else open_memory(name, url)
    settings = _sqlite_settings(url)
    if not create and settings.path != ":memory:" and not Path(settings.path).is_file():
        raise SpaceNotFound(f"no space at {url}: file {settings.path} does not exist")
    return SQLiteStore(settings, url, clock=clock)


__all__ = [
    "POSTGRES_SCHEMES",
    "SCHEMES",
    "MemoryStore",
    "SQLiteStore",
    "display_url",
    "open_store",
    "scheme_of",
    "validate_url",
]
