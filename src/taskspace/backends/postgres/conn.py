"""Connections to one PostgreSQL database: URL parsing, the pool, transactions,
the one error mapping, and bounded waits.

URLs: ``postgresql://``, ``postgres://`` and SQLAlchemy's ``postgresql+psycopg://``,
with libpq's own options (``sslmode``, ``application_name``…) passed through
and taskspace's:

- ``schema`` (alias ``namespace``): the schema that holds the space (default
  ``taskspace``); several spaces share one database under different schemas;
- ``pool_min`` / ``pool_max``: the connection pool's size (default 1 / 10; a
  worker grows the default to its concurrency plus its own loops, since each
  task may use the space; a ``pool_max`` given in the URL is kept as it is);
- ``connect_timeout`` / ``statement_timeout`` (seconds, default 5 / 30): no
  call waits longer than that for a server that is down or stuck;
- ``idle_in_transaction_timeout`` (seconds, default 3): the server ends the
  session of a client that stops in the middle of one of taskspace's
  transactions (SIGSTOP, a VM pause, a wedged process) after that long, so the
  row locks it held (a lease name, a queue row) block the other clients for
  at most that long, never until the client wakes. taskspace's transactions
  never wait between statements; a client that resumes finds its connection
  closed, and a transaction that had not committed is retried once;
- ``synchronous_commit`` (default: the server's, normally ``on``): ``off``
  makes every store write return before its commit record is flushed (several
  times faster on a slow disk; a server crash, never a client crash, can lose
  the last few hundred milliseconds of acknowledged writes).

Every connection has ``search_path`` set to the schema (a startup option, so
names in SQL are unqualified), ``statement_timeout`` and TCP keepalives with
a ``tcp_user_timeout``, so a call on a dead network raises within about
``statement_timeout`` instead of hanging. Every psycopg and pool error becomes
a :mod:`taskspace.errors` exception in :func:`map_error`, and nowhere else.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskspace.errors import (
    BackendError,
    ConfigError,
    InvalidURL,
    MissingDependency,
    TaskspaceError,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

log = logging.getLogger("taskspace.backends.postgres")
T = TypeVar("T")

SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
DEFAULT_SCHEMA = "taskspace"
# Schema names: a plain lower-case identifier, so it never needs quoting.
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
OPTIONS = (
    "schema",
    "namespace",
    "pool_min",
    "pool_max",
    "connect_timeout",
    "statement_timeout",
    "idle_in_transaction_timeout",
    "synchronous_commit",
)
SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
# A pooled connection idle longer than this is checked (one empty query)
# before use, so connections a server restart broke are replaced unseen.
CHECK_IDLE_S = 1.0
# SQLSTATEs that mean the connection or the server went away (class 08,
# admin/crash shutdown, cannot connect now): the transaction did not commit.
GONE_STATES = ("57P01", "57P02", "57P03")


def import_psycopg() -> Any:
    """The psycopg module, or MissingDependency naming the extra to install."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401 - checked here, imported where used
    except ImportError:
        raise MissingDependency(
            "the PostgreSQL backend needs psycopg 3 and psycopg-pool:"
            " pip install 'taskspace[postgres]'"
        ) from None
    return psycopg


@dataclass(frozen=True, slots=True)
class PgSettings:
    """A parsed PostgreSQL URL: libpq's part (``conninfo``) and taskspace's options."""

    url: str
    conninfo: str
    schema: str = DEFAULT_SCHEMA
    pool_min: int = 1
    pool_max: int = 10
    pool_max_given: bool = False  # the URL named pool_max: never resized by a worker
    connect_timeout: float = 5.0
    statement_timeout: float = 30.0
    idle_in_transaction_timeout: float = 3.0
    synchronous_commit: str | None = None


def _number(options: dict[str, str], key: str, default: float, url: str) -> float:
    if key not in options:
        return default
    try:
        value = float(options[key])
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidURL(f"{key}={options[key]!r} in {url!r} must be a positive number")
    return value


def parse_url(url: str) -> PgSettings:
    """Parse a PostgreSQL URL (InvalidURL naming what is wrong; nothing is opened)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidURL(f"not a PostgreSQL URL: {url!r}; use postgresql://user@host/db")
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in OPTIONS}
    if "schema" in ours and "namespace" in ours and ours["schema"] != ours["namespace"]:
        raise InvalidURL(f"schema and namespace differ in {url!r}; give one")
    schema = ours.get("schema", ours.get("namespace", DEFAULT_SCHEMA))
    if not SCHEMA_NAME.match(schema):
        raise InvalidURL(
            f"schema {schema!r} in {url!r} must be a lower-case identifier"
            " (letters, digits, underscores; at most 63)"
        )
    pool_min = int(_number(ours, "pool_min", 1, url))
    pool_max = int(_number(ours, "pool_max", max(10, pool_min), url))
    if pool_max < pool_min:
        raise InvalidURL(f"pool_max={pool_max} is below pool_min={pool_min} in {url!r}")
    commit = ours.get("synchronous_commit")
    if commit is not None and commit not in SYNCHRONOUS_COMMIT:
        raise InvalidURL(
            f"synchronous_commit={commit!r} in {url!r}; valid: {', '.join(SYNCHRONOUS_COMMIT)}"
        )
    rest = urlencode([(k, v) for k, v in query if k not in OPTIONS])
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=rest))
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise InvalidURL(f"malformed port in PostgreSQL URL {url!r}") from None
    return PgSettings(
        url=url,
        conninfo=conninfo,
        schema=schema,
        pool_min=pool_min,
        pool_max=pool_max,
        pool_max_given="pool_max" in ours,
        connect_timeout=_number(ours, "connect_timeout", 5.0, url),
        statement_timeout=_number(ours, "statement_timeout", 30.0, url),
        idle_in_transaction_timeout=_number(ours, "idle_in_transaction_timeout", 3.0, url),
        synchronous_commit=commit,
    )


def map_error(exc: BaseException, what: str, url: str = "") -> TaskspaceError:
    """THE mapping of psycopg and pool errors to taskspace errors: a number out
    of range is the caller's mistake (ConfigError); everything else is a
    BackendError naming the operation, the SQLSTATE and the server's message."""
    if isinstance(exc, TaskspaceError):
        return exc
    if isinstance(exc, OverflowError):
        return ConfigError(f"a number is out of PostgreSQL's range in {what}: {exc}")
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "22003":  # numeric_value_out_of_range
        return ConfigError(f"a number is out of PostgreSQL's 64-bit range in {what}: {exc}")
    where = f" at {url}" if url else ""
    code = f" [{sqlstate}]" if sqlstate else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return BackendError(f"PostgreSQL {what}{where} failed: {type(exc).__name__}{code}: {message}")


def _end_implicit_transaction(pipe: Any) -> None:
    """Queue a Sync in ``pipe`` without waiting: the statements before it
    commit before the ones after it start (in one implicit transaction they
    would commit together, and a later statement's snapshot would not follow
    the earlier one's commit). Falls back to a full sync (a round trip)."""
    enqueue = getattr(pipe, "_enqueue_sync", None)
    if callable(enqueue):
        enqueue()
    else:  # pragma: no cover - a psycopg without the private helper
        pipe.sync()


def _gone(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """Whether ``exc`` says the connection or the server went away."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate.startswith("08") or sqlstate in GONE_STATES:
        return True
    return conn is not None and (conn.closed or conn.broken)


class PgConn:
    """The pool of one space's database, shared by every protocol object of a
    store: ``transaction()``, ``run()``, ``read()``, ``execute()``, ``tokens()``,
    ``dedicated()``; the waiter and clock are attached by the store."""

    def __init__(self, settings: PgSettings) -> None:
        import_psycopg()
        self.settings = settings
        self.schema = settings.schema
        self.url = settings.url
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        # Keys to NOTIFY after the transaction on a connection commits (see after_commit).
        self._pending: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
        self.on_commit: Callable[[psycopg.Connection[Any], list[str]], None] | None = None
        self._closed = False
        self._fitted = 0  # a worker's wish (fit): the pool may grow to this

    # -- connections ---------------------------------------------------------

    def connect_kwargs(self) -> dict[str, Any]:
        """libpq parameters every connection of the space uses (timeouts, keepalives,
        ``search_path``)."""
        s = self.settings
        timeout_ms = int(s.statement_timeout * 1000)
        idle_ms = int(s.idle_in_transaction_timeout * 1000)
        options = (
            f"-c search_path={s.schema} -c statement_timeout={timeout_ms}"
            f" -c idle_in_transaction_session_timeout={idle_ms}"
        )
        if s.synchronous_commit is not None:
            options += f" -c synchronous_commit={s.synchronous_commit}"
        kwargs: dict[str, Any] = {
            "connect_timeout": max(1, round(s.connect_timeout)),
            "options": options,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": timeout_ms,
        }
        if "application_name=" not in s.conninfo:  # the URL's own name wins
            kwargs["application_name"] = "taskspace"
        return kwargs

    def dedicated(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        """A new connection of its own (LISTEN, a long wait), not from the pool;
        the caller closes it. BackendError if the server cannot be reached."""
        psycopg = import_psycopg()
        try:
            return psycopg.Connection.connect(  # type: ignore[no-any-return]
                self.settings.conninfo, autocommit=autocommit, **self.connect_kwargs()
            )
        except psycopg.Error as exc:
            raise map_error(exc, "connect", self.display) from exc

    @property
    def display(self) -> str:
        from taskspace.backends import display_url

        return display_url(self.url)

    def pool(self) -> ConnectionPool[Any]:
        """The pool (opened on first use, and again in a forked child)."""
        if self._closed:
            raise BackendError(f"the PostgreSQL store at {self.display} is closed")
        if self._pool is not None and os.getpid() == self._pid:
            return self._pool
        from psycopg_pool import ConnectionPool

        with self._lock:
            if self._pool is None or os.getpid() != self._pid:
                self._pid = os.getpid()  # a forked child never touches the parent's sockets
                self._used = weakref.WeakKeyDictionary()
                kwargs = {"autocommit": True, **self.connect_kwargs()}
                self._pool = ConnectionPool(
                    self.settings.conninfo,
                    kwargs=kwargs,
                    min_size=self.settings.pool_min,
                    max_size=self._max_size(),
                    timeout=self.settings.connect_timeout,
                    check=self._check,
                    configure=self._configure,
                    reconnect_timeout=self.settings.connect_timeout,
                    name=f"taskspace-{self.schema}",
                    open=True,
                )
            return self._pool

    def fit(self, connections: int) -> None:
        """Let the pool grow to ``connections`` (a worker: one per task slot,
        since a task may use the space, plus its own loops) unless the URL set
        ``pool_max``; never shrinks it. Idle connections still close after the
        pool's ``max_idle``."""
        if self.settings.pool_max_given or connections <= self._max_size():
            return
        self._fitted = connections
        pool = self._pool
        if pool is not None and os.getpid() == self._pid:
            pool.resize(min_size=self.settings.pool_min, max_size=connections)

    def _max_size(self) -> int:
        return max(self.settings.pool_max, self._fitted)

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        """Run by the pool on every new connection: the counters' ``next_token``
        rule (schema.py). A schema not created yet has no such function."""
        psycopg = import_psycopg()
        with suppress(psycopg.errors.UndefinedFunction):
            conn.execute("SELECT bump_counters()")

    def _suspect_all(self) -> None:
        """A connection turned out broken (a server restart, every backend
        terminated): its pool-mates likely are too, so each is checked before
        it is handed out again, and the retry gets a live one."""
        self._used = weakref.WeakKeyDictionary()

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        """Run by the pool before handing out a connection: one that sat idle
        longer than CHECK_IDLE_S answers an empty query first (a server restart
        broke it: the pool opens another one)."""
        last = self._used.get(conn)
        if last is not None and time.monotonic() - last < CHECK_IDLE_S:
            return
        conn.execute("")

    @contextmanager
    def connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; errors of getting one are mapped."""
        pool = self.pool()
        try:
            cm = pool.connection()
            conn = cm.__enter__()
        except Exception as exc:  # PoolTimeout, PoolClosed, connect failures
            raise map_error(exc, f"{what} (getting a connection)", self.display) from exc
        try:
            yield conn
        except BaseException as exc:
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            self._used[conn] = time.monotonic()
            cm.__exit__(None, None, None)

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def transaction(self, what: str = "transaction") -> Iterator[psycopg.Cursor[Any]]:
        """One READ COMMITTED transaction on a pooled connection: commits when
        the block ends, rolls back on any error; every driver error is mapped.
        Not retried (see :meth:`run` for a body that may be)."""
        psycopg = import_psycopg()
        with self.connection(what) as conn:
            self._pending[conn] = []
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                raise map_error(exc, what, self.display) from exc
            finally:
                keys = self._pending.pop(conn, [])
            self._committed(conn, keys)

    def run(self, fn: Callable[[psycopg.Cursor[Any]], T], what: str, retry: bool = True) -> T:
        """``fn(cursor)`` in one transaction. With ``retry``, a connection that
        broke before COMMIT was sent (the transaction certainly did not commit)
        is replaced and ``fn`` runs once more; a failure during COMMIT is never
        retried (it may have committed): it raises BackendError."""
        psycopg = import_psycopg()
        for attempt in range(2):
            with self.connection(what) as conn:
                committing = False
                self._pending[conn] = []
                try:
                    with conn.transaction():
                        with conn.cursor() as cur:
                            out = fn(cur)
                        committing = True
                except psycopg.Error as exc:
                    if retry and attempt == 0 and not committing and _gone(exc, conn):
                        log.info("PostgreSQL connection lost before %s committed; retrying", what)
                        self._suspect_all()
                        continue
                    raise map_error(exc, what, self.display) from exc
                finally:
                    keys = self._pending.pop(conn, [])
                self._committed(conn, keys)
                return out
        raise AssertionError("unreachable")

    def after_commit(self, cur: psycopg.Cursor[Any], keys: Sequence[str]) -> bool:
        """Queue ``keys`` to be NOTIFYed once the transaction of ``cur`` (one of
        :meth:`run` / :meth:`transaction`) has committed; False if ``cur`` is
        not in such a transaction (a caller's own connection)."""
        pending = self._pending.get(cur.connection)
        if pending is None:
            return False
        pending.extend(keys)
        return True

    def _committed(self, conn: psycopg.Connection[Any], keys: list[str]) -> None:
        """Send the NOTIFYs a committed transaction queued (on_commit, set by the
        waiter). A failure here never fails the committed write: waiters then
        wake by their timeouts."""
        if keys and self.on_commit is not None:
            try:
                self.on_commit(conn, keys)
            except Exception as exc:  # noqa: BLE001 - the write is committed already
                log.warning("PostgreSQL NOTIFY after commit failed: %s", exc)

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """Rows of one read-only statement (autocommit); retried once on a fresh
        connection if the first one turned out broken."""
        psycopg = import_psycopg()
        for attempt in range(2):
            with self.connection("read") as conn:
                try:
                    cur = conn.execute(sql, params)
                    return cur.fetchall() if cur.description else []
                except psycopg.Error as exc:
                    if attempt == 0 and _gone(exc, conn):
                        self._suspect_all()
                        continue
                    raise map_error(exc, "read", self.display) from exc
        raise AssertionError("unreachable")

    def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] = (), retry: bool = False
    ) -> list[Any]:
        """Rows of one statement in its own transaction (autocommit). ``retry``
        (only for statements safe to repeat: idempotent, or deduplicated by a
        request id or token): run once more on a fresh connection if the first
        one turned out broken; otherwise a broken connection raises
        BackendError (whether it committed is unknown)."""
        return self.pipeline([(sql, params)], retry=retry)[-1]

    def pipeline(
        self,
        steps: Sequence[tuple[str, Sequence[Any] | dict[str, Any]]],
        retry: bool = False,
        together: int = 1,
    ) -> list[list[Any]]:
        """Several statements in ONE round trip (psycopg pipeline mode), each
        committed on its own (a Sync after each) before the next starts; the
        rows of each. The first ``together`` steps share one transaction
        instead (each still takes its own snapshot: READ COMMITTED). A
        failing statement raises (mapped) and the ones after it do not run.
        ``retry`` as in :meth:`execute` (every step must be safe to repeat)."""
        psycopg = import_psycopg()
        for attempt in range(2):
            with self.connection("statement") as conn:
                try:
                    if len(steps) == 1:
                        cur = conn.execute(steps[0][0], steps[0][1])
                        return [cur.fetchall() if cur.description else []]
                    with conn.pipeline() as pipe:
                        cursors = [conn.cursor() for _ in steps]
                        for i, (cur, (sql, params)) in enumerate(zip(cursors, steps, strict=True)):
                            if i >= together:
                                _end_implicit_transaction(pipe)
                            cur.execute(sql, params)
                        pipe.sync()  # the one round trip: every result is in
                        return [c.fetchall() if c.description else [] for c in cursors]
                except psycopg.Error as exc:
                    if retry and attempt == 0 and _gone(exc, conn):
                        self._suspect_all()
                        continue
                    raise map_error(exc, "statement", self.display) from exc
        raise AssertionError("unreachable")

    # -- counters --------------------------------------------------------------

    @staticmethod
    def tokens(cur: psycopg.Cursor[Any], n: int) -> list[int]:
        """``n`` fresh fencing tokens from the space's one SEQUENCE (``tokens``),
        increasing, in the caller's transaction (see schema.py for the
        ``next_token`` rule)."""
        if n <= 0:
            return []
        cur.execute("SELECT nextval('tokens') FROM generate_series(1, %s)", (n,))
        return [int(row[0]) for row in cur.fetchall()]

    def close(self) -> None:
        """Close the pool; idempotent."""
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and os.getpid() == self._pid:
            try:
                pool.close(timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - closing must never raise
                log.warning("closing the PostgreSQL pool failed: %s", exc)
