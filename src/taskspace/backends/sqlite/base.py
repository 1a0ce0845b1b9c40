"""Connections, transactions, error mapping and the reboot-safe clock of the
SQLite backend."""

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

from taskspace.backends.sqlite.schema import TABLES, migrate
from taskspace.errors import BackendError, ConfigError

log = logging.getLogger("taskspace.backends.sqlite")
T = TypeVar("T")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# The clock high-water mark is kept this far ahead of every time a write used, so
# a write transaction touches it at most about once per HWM_AHEAD_S per process.
HWM_AHEAD_S = 1.0
INIT_ATTEMPTS = 50


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


class SQLiteBase:
    """One connection per thread, serialised write transactions, and the clock."""

    def __init__(self, settings: SQLiteSettings, url: str) -> None:
        self.url = url
        self.settings = settings
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._pid = os.getpid()
        self._commits = threading.Condition()
        self._write_lock = threading.Lock()
        self._generation = 0
        self._hwm = 0.0  # the high-water mark this process last stored or saw
        if settings.path != ":memory:":
            Path(settings.path).parent.mkdir(parents=True, exist_ok=True)
        self._offset = 0.0
        self._initialise()

    # -- connections ----------------------------------------------------------

    def _new_connection(self) -> sqlite3.Connection:
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

    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # After fork the parent's connections must never be touched again.
            self._pid = os.getpid()
            self._local = threading.local()
            self._conns = []
            self._conns_lock = threading.Lock()
            self._commits = threading.Condition()
            self._write_lock = threading.Lock()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection()
            self._local.conn = conn
        return conn

    def _discard(self, conn: sqlite3.Connection) -> None:
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
            self._discard(conn)

    def _failed(self, conn: sqlite3.Connection) -> None:
        """After a driver error: roll back, and replace the connection, whose state
        after an I/O error or a full disk is not worth trusting (errors are rare,
        and a fresh connection costs well under a millisecond)."""
        self._rollback(conn)
        self._discard(conn)

    # -- transactions -----------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; every driver error becomes BackendError."""
        # Threads of one process queue on a Python lock rather than in SQLite's busy
        # handler, which sleeps in millisecond steps; processes still contend in SQLite.
        with self._write_lock:
            conn = self._conn()
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
        with self._commits:
            self._generation += 1
            self._commits.notify_all()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._reading(lambda conn: conn.execute(sql, params).fetchall())

    def _reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on this thread's connection; driver errors become BackendError."""
        conn = self._conn()
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            self._failed(conn)
            raise driver_error("read", exc) from exc

    def _bump(self, db: sqlite3.Connection, key: str, by: int = 1) -> int:
        row = db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?"
            " RETURNING value",
            (key, by, by),
        ).fetchone()
        return int(row[0])

    def _wait_commit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a commit by this process; True if one happened."""
        with self._commits:
            generation = self._generation
            return self._commits.wait_for(lambda: self._generation != generation, timeout)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # -- the clock ---------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() + self._offset

    def _advance_hwm(self, db: sqlite3.Connection) -> None:
        """Keep the stored high-water mark ahead of every time this write used."""
        now = self.now()
        if now < self._hwm:
            return
        row = db.execute(
            "INSERT INTO meta VALUES ('hwm', ?) ON CONFLICT(key)"
            " DO UPDATE SET value = MAX(value, excluded.value) RETURNING value",
            (now + HWM_AHEAD_S,),
        ).fetchone()
        self._hwm = float(row[0]) - HWM_AHEAD_S / 2

    def _initialise(self) -> None:
        conn = self._conn()
        for attempt in range(INIT_ATTEMPTS):
            try:
                conn.executescript(TABLES)
                break
            except sqlite3.Error as exc:
                self._rollback(conn)
                # Another process creating the schema at the same moment holds the lock.
                busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not busy or attempt == INIT_ATTEMPTS - 1:
                    raise driver_error(
                        f"creating the schema in {self.settings.path!r}", exc
                    ) from exc
                time.sleep(0.05)
        with self._write() as db:
            self._offset = self._check_boot(db)
            migrate(db, self.now())

    def _check_boot(self, db: sqlite3.Connection) -> float:
        """The clock offset for this boot. After a reboot the clock restarts from the
        stored high-water mark (delays and TTLs keep their remaining time, give or
        take the downtime) and every lease is expired, so none is valid twice."""
        rows = dict(
            db.execute("SELECT key, value FROM meta WHERE key IN ('boot', 'offset', 'hwm')")
        )
        boot = boot_id()
        if rows.get("boot") == boot:
            return float(rows["offset"])
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
            db.execute("UPDATE grants SET expires = ?", (now,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?), ('offset', ?)", (boot, offset))
        return offset
