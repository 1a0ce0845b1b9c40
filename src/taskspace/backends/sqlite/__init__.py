"""Embedded backend on one SQLite file: safe for many processes on one host.

Atomicity: every write runs in one ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock up front, so read-decide-write sequences (claim,
fenced finish, compare-and-set) cannot interleave with another writer.

Durability: WAL journal. ``synchronous=normal`` (the default) survives any
process crash, including SIGKILL mid-transaction; ``synchronous=full``
(``sqlite:///path.db?synchronous=full``) also survives power loss, at the
cost of an fsync per commit.

Errors: every driver error becomes :class:`~taskspace.errors.BackendError`
naming the cause (a full disk, a lock held too long); a connection a failure
left in an unknown state is replaced, so the store works again as soon as the
cause is gone.

Clock: the host's CLOCK_MONOTONIC (shared by every process on the host and
immune to wall-clock jumps) plus an offset stored in the file. Write
transactions keep a high-water mark of the clock in the file, ahead of every
time they used. The file also records the kernel's boot id; opened after a
reboot, the clock restarts from the high-water mark — delays and TTLs keep
their remaining time, give or take the downtime — and every lease is expired,
so a reset monotonic clock can never make a lease valid twice.

Identity: the file holds a random ``space_id`` (a row of ``meta``), created
with the schema; ``check_space`` reads it on a fresh connection, so a file
that was deleted or replaced raises SpaceLost. The schema is versioned: files
of earlier layouts are migrated in place when opened, and a file written by a
newer taskspace is refused.

Retries: request ids (claim, KV txn and incr, stream appends) are ignored: a
local transaction's reply cannot be lost (a driver error means it did not
commit), so nothing is retried after it took effect.

Storage stays bounded: ``queue.reap`` deletes finished tasks past their
``result_ttl``; ``kv.reap`` records expiries and compacts the change feed to
its newest KV_CHANGES_KEEP changes; expired grants are deleted by the next
``acquire``; pub/sub messages are kept MESSAGE_RETENTION_S; streams are
trimmed by their writers (``maxlen``, ``trim``).

Clocks: ``clock.now()`` is the lease clock above; ``clock.wall()`` is
``time.time()``. An injected clock (a test's ManualClock) replaces both.

Wake-ups: idle workers, result waiters and waits on leases, KV changes and
streams poll ``PRAGMA data_version`` (a read of shared memory that changes
when another connection commits) with a short backoff capped at ``poll_ms``,
and are woken at once by commits made in the same process.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from pathlib import Path

from taskspace.backends.base import Clock
from taskspace.backends.sqlite.base import (
    BOOT_ID_PATH,
    SQLiteClock,
    SQLiteConn,
    SQLiteSettings,
    boot_id,
    driver_error,
)
from taskspace.backends.sqlite.kv import SQLiteKV
from taskspace.backends.sqlite.leases import SQLiteLeases
from taskspace.backends.sqlite.pubsub import SQLitePubSub, SQLiteSubscription
from taskspace.backends.sqlite.queue import SQLiteQueue
from taskspace.backends.sqlite.schema import initialise
from taskspace.backends.sqlite.streams import SQLiteStreams
from taskspace.backends.sqlite.waiter import Waiter
from taskspace.errors import BackendError, SpaceLost

INIT_ATTEMPTS = 50


class SQLiteStore:
    """The store protocols on one SQLite file (see the module docstring): ``queue``,
    ``leases``, ``kv``, ``streams``, ``pubsub`` and ``clock`` share one
    connection layer (``conn``)."""

    def __init__(self, settings: SQLiteSettings, url: str, clock: Clock | None = None) -> None:
        self.url = url
        self.settings = settings
        if settings.path != ":memory:":
            try:
                Path(settings.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendError(
                    f"SQLite cannot create the directory of {settings.path!r}: {exc}"
                ) from exc
        self.conn = SQLiteConn(settings, clock)
        self.space_id = self._initialise()
        waiter = Waiter(self.conn)
        self.queue = SQLiteQueue(self.conn, waiter)
        self.leases = SQLiteLeases(self.conn, waiter)
        self.kv = SQLiteKV(self.conn, waiter)
        self.streams = SQLiteStreams(self.conn, waiter)
        self.pubsub = SQLitePubSub(self.conn)
        self.clock: Clock = self.conn.clock

    def _initialise(self) -> str:
        for attempt in range(INIT_ATTEMPTS):
            try:
                return initialise(self.conn)
            except BackendError as exc:
                # Another process creating the file at the same moment holds the lock.
                if "locked" not in str(exc) or attempt == INIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def check_space(self) -> None:
        """SpaceLost if the file at the path is gone, or holds another space (or
        none); BackendError if it cannot be read. Never creates the file: it is
        opened without create on a fresh connection, so a deleted file that this
        store's connections still hold open is noticed."""
        path = self.settings.path
        if path == ":memory:":
            return
        lost = SpaceLost(
            f"the space at {self.url} was wiped or replaced since it was opened"
            f" (space {self.space_id}); what it held is gone"
        )
        if not Path(path).is_file():
            raise lost
        try:
            db = sqlite3.connect(
                f"{Path(path).resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=self.settings.busy_timeout,
            )
        except sqlite3.Error as exc:
            if not Path(path).is_file():
                raise lost from exc
            raise driver_error(f"opening {path!r}", exc) from exc
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'space_id'").fetchone()
        except sqlite3.Error as exc:
            if "no such table" in str(exc) or not Path(path).is_file():
                raise lost from exc
            raise driver_error(f"reading the identity of {path!r}", exc) from exc
        finally:
            db.close()
        if row is None or row[0] != self.space_id:
            raise lost

    def fork_guard(self) -> AbstractContextManager[None]:
        """Fork inside this (see SQLiteConn.fork_guard); process tasks do."""
        return self.conn.fork_guard()

    def close(self) -> None:
        """Close every connection; the store may not be used afterwards."""
        self.conn.close()


__all__ = [
    "BOOT_ID_PATH",
    "SQLiteClock",
    "SQLiteSettings",
    "SQLiteStore",
    "SQLiteSubscription",
    "boot_id",
]
