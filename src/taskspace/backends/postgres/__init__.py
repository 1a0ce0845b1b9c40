"""PostgreSQL backend: a space in one schema of a database teams already run.

Atomicity: every store operation is one transaction (READ COMMITTED); claims
are one statement (``SELECT … FOR UPDATE SKIP LOCKED`` inside an ``UPDATE …
RETURNING``), finishes one statement deciding every item by SQL generated
from ``outcomes.RUNNING_TRANSITIONS``. Finished tasks leave the hot table for
``done`` in the statement that ends them (schema.py).

Clock: ``clock_timestamp()`` plus a high-water mark in the space
(``clock.py``); fencing tokens from the SEQUENCE ``tokens``, never below the
wall clock in microseconds when a connection starts (schema.py).

Identity: ``meta.space_id`` in the schema; ``check_space`` raises SpaceLost
once the schema is dropped or recreated.

Wake-ups: LISTEN/NOTIFY, one listening connection per store; writers NOTIFY
only keys someone registered a wait on (``waiter.py``).

Faults: every psycopg error is a taskspace error (``conn.map_error``); every
call is bounded by ``connect_timeout`` and ``statement_timeout``; a pooled
connection a restart broke is replaced (and a transaction that certainly did
not commit is retried once); claims carry request ids (a retried claim
returns what the first leased), finishes are answered True again for the
accepted token. Durability is PostgreSQL's: with ``synchronous_commit = on``
(the default) a returned call survives a server crash.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from taskspace.backends.base import Closeable, TaskSpec
from taskspace.backends.postgres.clock import PgClock
from taskspace.backends.postgres.conn import PgConn, PgSettings, parse_url
from taskspace.backends.postgres.identity import check_space, open_space
from taskspace.backends.postgres.queue import CALLER_CONNECTION, PgQueue
from taskspace.backends.postgres.waiter import Waiter
from taskspace.errors import BackendError

__all__ = ["PgSettings", "PostgresStore", "parse_url"]

# The protocols PGSTATE implements: attribute -> (module, class). Each class
# takes (conn: PgConn, waiter: Waiter), but PgPubSub takes (conn) only.
STATE_PROTOCOLS = {
    "leases": ("taskspace.backends.postgres.leases", "PgLeases"),
    "kv": ("taskspace.backends.postgres.kv", "PgKV"),
    "streams": ("taskspace.backends.postgres.streams", "PgStreams"),
    "pubsub": ("taskspace.backends.postgres.pubsub", "PgPubSub"),
}


class _NotYet:
    """Stands in for a protocol whose module is not there yet."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise BackendError(f"the PostgreSQL {self._what} store is not implemented yet")


def _state_protocol(attr: str, conn: PgConn, waiter: Waiter) -> Any:
    module_name, class_name = STATE_PROTOCOLS[attr]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return _NotYet(attr)
    cls = getattr(module, class_name)
    return cls(conn) if attr == "pubsub" else cls(conn, waiter)


class PostgresStore(Closeable):
    """A space on PostgreSQL: one object per protocol (``queue``, ``leases``,
    ``kv``, ``streams``, ``pubsub``, ``clock``) on one pool (``conn``).

    Opening migrates the schema (schema.migrate) and reads the space id:
    ``create=False`` raises SpaceNotFound for a schema without a space;
    BackendError if the server cannot be reached; InvalidURL for a bad URL;
    ConfigError for a schema written by a newer taskspace."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self.conn = PgConn(parse_url(url))
        try:
            self.space_id: str = open_space(self.conn, create)
        except BaseException:
            self.conn.close()
            raise
        self.waiter = Waiter(self.conn)
        self.queue = PgQueue(self.conn, self.waiter)
        self.clock = PgClock(self.conn)
        self.leases: Any = _state_protocol("leases", self.conn, self.waiter)
        self.kv: Any = _state_protocol("kv", self.conn, self.waiter)
        self.streams: Any = _state_protocol("streams", self.conn, self.waiter)
        self.pubsub: Any = _state_protocol("pubsub", self.conn, self.waiter)

    @property
    def schema(self) -> str:
        """The schema that holds the space."""
        return self.conn.schema

    def push_in(self, connection: Any, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs`` in the caller's transaction on ``connection`` (see
        PgQueue.push_in): they exist if and only if the caller commits."""
        return self.queue.push_in(connection, specs)

    @contextmanager
    def transaction(self, connection: Any) -> Iterator[Any]:
        """Inside the block, every push of this store in this thread (or
        asyncio task) — ``task.submit``, ``submit_many``, ``space.push`` — is
        made in the caller's transaction on ``connection`` (a psycopg 3
        connection to the space's database): committed with the caller's data
        or not at all. The caller commits or rolls back; nothing is retried
        (a failed statement aborts the caller's transaction)."""
        token = CALLER_CONNECTION.set((self.queue, connection))
        try:
            yield connection
        finally:
            CALLER_CONNECTION.reset(token)

    def fit_pool(self, connections: int) -> None:
        """Let the connection pool grow to ``connections`` (see PgConn.fit)."""
        self.conn.fit(connections)

    def in_caller_transaction(self) -> bool:
        """Whether pushes of this thread now go to a caller's transaction (a
        failed push must then not be retried: the caller's transaction is
        aborted)."""
        bound = CALLER_CONNECTION.get()
        return bound is not None and bound[0] is self.queue

    def check_space(self) -> None:
        """SpaceLost if the schema was dropped or recreated since it was opened;
        BackendError if it cannot be read."""
        check_space(self.conn, self.space_id)

    def close(self) -> None:
        """Close the listener, subscriptions and pool; idempotent."""
        close = None if isinstance(self.pubsub, _NotYet) else getattr(self.pubsub, "close", None)
        if callable(close):
            close()
        self.waiter.close()
        self.conn.close()
