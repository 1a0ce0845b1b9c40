"""The connection layer of the SQLite backend: connections, transactions, error
mapping, the space's counters and the reboot-safe clock. Every protocol object
of a store shares one :class:`SQLiteConn`."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from taskspace.backends.base import Clock, next_token
from taskspace.errors import BackendError, ConfigError

log = logging.getLogger("taskspace.backends.sqlite")
T = TypeVar("T")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# The clock high-water mark is kept this far ahead of every time a write used, so
# a write transaction touches it at most about once per HWM_AHEAD_S per process.
HWM_AHEAD_S = 1.0


def boot_id() -> str:
    """The kernel's boot id (a reboot changes it)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:  # not Linux: fall back to the boot time, which a reboot also changes
        return str(round(time.time() - time.monotonic()))


@dataclass(frozen=True, slots=True)
class SQLiteSettings:
    """Options of a ``sqlite:///path`` URL."""

    path: str
    synchronous: str = "normal"
    busy_timeout: float = 30.0
    poll_ms: float = 2.0


def driver_error(what: str, exc: BaseException) -> BackendError:
    """A BackendError naming the operation and the driver's own message."""
    code = getattr(exc, "sqlite_errorname", None)
    detail = f"{type(exc).__name__}: {exc}" + (f" [{code}]" if code else "")
    return BackendError(f"SQLite {what} failed: {detail}")


class SQLiteClock:
    """The lease clock: CLOCK_MONOTONIC (shared by every process of the host,
    immune to wall-clock jumps) plus an offset stored in the file, which makes it
    carry on from the file's high-water mark after a reboot. ``wall()`` is
    ``time.time()``."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time()


# How long close() waits for calls in flight before it gives up closing.
CLOSE_WAIT_S = 5.0


class SQLiteConn:
    """One connection per thread, serialised write transactions, the clock and
    the space's counters (rows of ``meta``)."""

    def __init__(self, settings: SQLiteSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.own_clock: SQLiteClock | None = None if clock is not None else SQLiteClock()
        self.clock: Clock = clock if clock is not None else self.own_clock  # type: ignore[assignment]
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._pid = os.getpid()
        self._commits = threading.Condition()
        self._write_lock = threading.Lock()
        self._generation = 0
        self._hwm = 0.0  # the high-water mark this process last stored or saw
        self._reset_use()
        on_advance = getattr(clock, "on_advance", None)
        if on_advance is not None:
            # A test's ManualClock: moving it wakes every wait, which re-checks
            # its expiries at once (as a commit would).
            on_advance(self.wake)

    # -- connections ----------------------------------------------------------

    def new_connection(self) -> sqlite3.Connection:
        """A fresh connection with the store's settings (BackendError on failure)."""
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.settings.path,
                timeout=self.settings.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA synchronous={self.settings.synchronous}")
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise driver_error(f"opening {self.settings.path!r}", exc) from exc
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _check_fork(self) -> None:
        """In a forked child: forget the parent's connections and locks (a lock
        another thread of the parent held at the fork stays held for ever in
        the child). Called before any lock of a call is taken."""
        if os.getpid() != self._pid:
            # After fork the parent's connections must never be touched again.
            self._pid = os.getpid()
            self._local = threading.local()
            self._conns = []
            self._conns_lock = threading.Lock()
            self._commits = threading.Condition()
            self._write_lock = threading.Lock()
            self._reset_use()

    @contextmanager
    def fork_guard(self) -> Iterator[None]:
        """Fork inside this: no thread of this process is then inside a write.
        SQLite keeps its file-lock bookkeeping per process, so a child forked
        while a parent thread held the write lock would wait for that lock for
        ever (the copy of the parent's connection in the child never ends its
        transaction)."""
        with self._write_lock:
            yield

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, and again after fork)."""
        self._check_fork()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.new_connection()
            self._local.conn = conn
        return conn

    @property
    def local(self) -> threading.local:
        """Per-thread state (the connection, the last data version seen)."""
        return self._local

    def discard(self, conn: sqlite3.Connection) -> None:
        """Drop a connection left in an unknown state; the next call opens a fresh one."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
            self._local.data_version = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
        try:
            conn.close()
        except sqlite3.Error as exc:
            log.warning("closing a broken SQLite connection failed: %s", exc)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """End a failed transaction without ever hiding the error that failed it.

        SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR during
        COMMIT), so ROLLBACK runs only if a transaction is still open; if it
        fails too, the connection is replaced."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("SQLite ROLLBACK failed (%s); reopening the connection", exc)
            self.discard(conn)

    def _failed(self, conn: sqlite3.Connection) -> None:
        """After a driver error: roll back, and replace the connection, whose state
        after an I/O error or a full disk is not worth trusting."""
        self._rollback(conn)
        self.discard(conn)

    # -- transactions -----------------------------------------------------------

    # -- calls in flight, so that close() never closes a connection in use ---------

    def _reset_use(self) -> None:
        self._use = threading.Condition()
        self._busy = 0
        self._closing = False
        self._depth = threading.local()

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """Count a call in flight; a call starting while close() runs waits for it
        (closing a connection another thread is using can crash the interpreter
        inside sqlite3). Nested calls of one thread never wait."""
        self._check_fork()
        depth = getattr(self._depth, "n", 0)
        with self._use:
            while self._closing and depth == 0:
                self._use.wait()
            self._busy += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            with self._use:
                self._busy -= 1
                self._use.notify_all()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; every driver error becomes BackendError,
        a number beyond 64 bits ConfigError; any error rolls back."""
        with self._in_use(), self._writing() as conn:
            yield conn
        self.wake()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        # Threads of one process queue on a Python lock rather than in SQLite's busy
        # handler, which sleeps in millisecond steps; processes still contend in SQLite.
        with self._write_lock:
            conn = self.conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._failed(conn)
                raise driver_error("BEGIN (taking the write lock)", exc) from exc
            try:
                yield conn
                self._advance_hwm(conn)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(conn)
                raise driver_error("write", exc) from exc
            except OverflowError as exc:
                self._rollback(conn)
                raise ConfigError(f"a number is out of SQLite's 64-bit range: {exc}") from exc
            except BaseException:
                self._rollback(conn)
                raise

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query on this thread's connection (BackendError on failure)."""
        return self.reading(lambda conn: conn.execute(sql, params).fetchall())

    def reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection; driver errors become BackendError."""
        with self._in_use():
            conn = self.conn()
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                self._failed(conn)
                raise driver_error("read", exc) from exc
            except OverflowError as exc:
                raise ConfigError(f"a number is out of SQLite's 64-bit range: {exc}") from exc

    def wake(self) -> None:
        """End every wait of this process as a local commit does."""
        with self._commits:
            self._generation += 1
            self._commits.notify_all()

    def wait_commit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a commit by this process; True if one happened."""
        with self._commits:
            generation = self._generation
            return self._commits.wait_for(lambda: self._generation != generation, timeout)

    def close(self) -> None:
        """Close every connection once no call is using one (waiting at most
        CLOSE_WAIT_S; connections still in use after that are left to the
        garbage collector, never closed under a running call). A later call
        opens a fresh connection."""
        with self._use:
            self._closing = True
            idle = self._use.wait_for(lambda: self._busy == 0, CLOSE_WAIT_S)
        try:
            with self._conns_lock:
                conns, self._conns = self._conns, []
            if idle:
                for conn in conns:
                    conn.close()
            else:
                log.warning("SQLite close: a call was still running after %.0f s;"
                            " its connections are left open", CLOSE_WAIT_S)  # fmt: skip
            self._local = threading.local()
        finally:
            with self._use:
                self._closing = False
                self._use.notify_all()

    # -- counters (rows of meta) ---------------------------------------------------

    @staticmethod
    def meta(db: sqlite3.Connection, key: str, default: Any = None) -> Any:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @staticmethod
    def bump(db: sqlite3.Connection, key: str, by: int = 1) -> int:
        """Add ``by`` to the integer counter ``key``; return the new value."""
        row = db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?"
            " RETURNING value",
            (key, by, by),
        ).fetchone()
        return int(row[0])

    def tokens(self, db: sqlite3.Connection, n: int) -> list[int]:
        """``n`` fresh fencing tokens from the space's one counter (``next_token``)."""
        first = next_token(int(self.meta(db, "token", 0)), self.clock.wall())
        self.set_meta(db, "token", first + n - 1)
        return list(range(first, first + n))

    # -- the clock -------------------------------------------------------------

    def _advance_hwm(self, db: sqlite3.Connection) -> None:
        """Keep the stored high-water mark ahead of every time this write used."""
        if self.own_clock is None:
            return  # an injected clock: nothing to survive a reboot
        now = self.own_clock.now()
        if now < self._hwm:
            return
        row = db.execute(
            "INSERT INTO meta VALUES ('hwm', ?) ON CONFLICT(key)"
            " DO UPDATE SET value = MAX(value, excluded.value) RETURNING value",
            (now + HWM_AHEAD_S,),
        ).fetchone()
        self._hwm = float(row[0]) - HWM_AHEAD_S / 2

    def check_boot(self, db: sqlite3.Connection) -> None:
        """Set the clock offset for this boot. After a reboot the clock restarts from
        the stored high-water mark (delays and TTLs keep their remaining time, give
        or take the downtime) and every lease is expired, so none is valid twice."""
        clock = self.own_clock
        if clock is None:
            return
        rows = dict(
            db.execute("SELECT key, value FROM meta WHERE key IN ('boot', 'offset', 'hwm')")
        )
        boot = boot_id()
        if rows.get("boot") == boot:
            clock.offset = float(rows["offset"])
            return
        offset = 0.0
        if "offset" in rows:
            start = rows.get("hwm")
            if start is None:  # a file from before the high-water mark: use what it holds
                start = db.execute(
                    "SELECT MAX(COALESCE(MAX(created), 0), COALESCE(MAX(started), 0),"
                    " COALESCE(MAX(finished), 0)) FROM tasks"
                ).fetchone()[0]
            offset = float(start) - time.monotonic()
            now = time.monotonic() + offset
            db.execute("UPDATE tasks SET lease_expires = ? WHERE state = 'running'", (now,))
            db.execute("UPDATE lease_grants SET expires = ? WHERE expires > ?", (now, now))
        clock.offset = offset
        db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?), ('offset', ?)", (boot, offset))
