"""Embedded backend on one SQLite file: safe for many processes on one host.

Atomicity: every write runs in one ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock up front, so read-decide-write sequences (claim,
fenced finish, compare-and-set) cannot interleave with another writer.

Durability: WAL journal. ``synchronous=normal`` (the default) survives any
process crash, including SIGKILL mid-transaction; ``synchronous=full``
(``sqlite:///path.db?synchronous=full``) also survives power loss, at the
cost of an fsync per commit.

Clock: the host's CLOCK_MONOTONIC (shared by every process on the host and
immune to wall-clock jumps) plus an offset stored in the file. The file also
records the kernel's boot id; opened after a reboot, the clock is moved past
every time the file holds and every lease is expired, so a reset monotonic
clock can never make a lease valid twice.

Wake-ups: idle workers and result waiters poll ``PRAGMA data_version`` (a
read of shared memory that changes when another connection commits) with a
short backoff capped at ``poll_ms``, and are woken at once by commits made
in the same process.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson

from taskspace.backends.base import (
    Closeable,
    Grant,
    Lease,
    LeaseStatus,
    Message,
    Outcome,
    QueueStats,
    StreamEntry,
    TaskRecord,
    TaskSpec,
    TaskState,
    Versioned,
)
from taskspace.backends.outcomes import expired_state, lease_lost_error, outcome_state
from taskspace.errors import BackendError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    codec TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    lease_s REAL NOT NULL,
    timeout REAL,
    dedup_key TEXT,
    state TEXT NOT NULL,
    ready_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_expires REAL,
    result BLOB,
    error BLOB,
    progress_done REAL,
    progress_total REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(lease_expires) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(queue, state);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_dedup ON tasks(dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS grants (
    name TEXT NOT NULL, holder TEXT NOT NULL, token INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (name, holder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grant_tokens (name TEXT PRIMARY KEY, token INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_entries_by_stream ON stream_entries(stream, id);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
);
"""

TASK_COLUMNS = (
    "id, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup_key, "
    "state, ready_at, attempts, lost, token, worker, lease_expires, result, error, "
    "progress_done, progress_total, cancel_requested, created, started, finished"
)
MESSAGE_RETENTION_S = 60.0
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:  # not Linux: fall back to the boot time, which a reboot also changes
        return str(round(time.time() - time.monotonic()))


def _record(row: Sequence[Any]) -> TaskRecord:
    progress = None if row[19] is None else (row[19], row[20])
    return TaskRecord(
        id=row[0], name=row[1], payload=row[2], codec=row[3], queue=row[4], priority=row[5],
        max_attempts=row[6], lease_s=row[7], timeout=row[8], dedup_key=row[9],
        state=row[10], ready_at=row[11], attempts=row[12], lost=row[13], token=row[14],
        worker=row[15], lease_expires=row[16], result=row[17],
        error=None if row[18] is None else orjson.loads(row[18]),
        progress=progress, cancel_requested=bool(row[21]), created=row[22],
        started=row[23], finished=row[24],
    )  # fmt: skip


def _error_blob(error: dict[str, Any] | None) -> bytes | None:
    return None if error is None else orjson.dumps(error)


@dataclass(frozen=True, slots=True)
class SQLiteSettings:
    """Options of a ``sqlite:///path`` URL."""

    path: str
    synchronous: str = "normal"
    busy_timeout: float = 30.0
    poll_ms: float = 2.0


class _Waiter:
    """Backoff polling of ``PRAGMA data_version``, woken early by local commits."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def baseline(self) -> None:
        """Note the data version before a caller checks the database, so that a
        commit by another connection after the check ends the next wait."""
        store = self._store
        if getattr(store._local, "data_version", None) is None:
            store._local.data_version = store._conn().execute("PRAGMA data_version").fetchone()[0]

    def wait(self, timeout: float) -> None:
        store = self._store
        conn = store._conn()
        deadline = time.monotonic() + timeout
        delay = 0.0002
        seen = getattr(store._local, "data_version", None)
        while True:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if seen is not None and version != seen:
                break
            seen = version
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if store._wait_commit(min(delay, remaining)):
                break
            delay = min(delay * 2, store.settings.poll_ms / 1000.0)
        store._local.data_version = conn.execute("PRAGMA data_version").fetchone()[0]


class _SQLiteSubscription(Closeable):
    def __init__(self, store: SQLiteStore, channels: Sequence[str]) -> None:
        self._store = store
        self._channels = list(channels)
        self._conn = store._new_connection()
        row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
        self._last = int(row[0])
        self._buffer: list[Message] = []
        self._closed = False
        self._marks = ",".join("?" * len(self._channels))

    def _fetch(self) -> None:
        # Read the top id first, then only up to it: every message up to a visible
        # id is committed (writers are serialised), so none can slip in between
        # the two reads and be skipped.
        top = int(self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])
        if top <= self._last:
            return
        rows = self._conn.execute(
            "SELECT channel, data FROM messages WHERE id > ? AND id <= ?"
            f" AND channel IN ({self._marks}) ORDER BY id",
            (self._last, top, *self._channels),
        ).fetchall()
        self._buffer.extend(Message(channel, data) for channel, data in rows)
        self._last = top

    def get(self, timeout: float | None = None) -> Message | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        delay = 0.0005
        while not self._closed:
            if not self._buffer:
                self._fetch()
            if self._buffer:
                return self._buffer.pop(0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self._store.settings.poll_ms / 1000.0)
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.close()


class SQLiteStore:
    """All five store protocols on one SQLite file (see the module docstring)."""

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
        self._publish_count = itertools.count()
        self._waiter = _Waiter(self)
        if settings.path != ":memory:":
            Path(settings.path).parent.mkdir(parents=True, exist_ok=True)
        self._offset = self._initialise()

    # -- connections and transactions ----------------------------------------

    def _new_connection(self) -> sqlite3.Connection:
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
            raise BackendError(
                f"cannot open SQLite database {self.settings.path!r}: {exc}"
            ) from exc
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

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        # Threads of one process queue on a Python lock rather than in SQLite's busy
        # handler, which sleeps in millisecond steps; processes still contend in SQLite.
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise BackendError(f"SQLite write lock not obtained: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise BackendError(f"SQLite commit failed: {exc}") from exc
        with self._commits:
            self._generation += 1
            self._commits.notify_all()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite read failed: {exc}") from exc

    def _initialise(self) -> float:
        conn = self._conn()
        for attempt in range(50):
            try:
                conn.executescript(SCHEMA)
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.05)
        with self._write() as db:
            return self._check_boot(db)

    def _check_boot(self, db: sqlite3.Connection) -> float:
        rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('boot', 'offset')"))
        boot = _boot_id()
        if rows.get("boot") == boot:
            return float(rows["offset"])
        offset = 0.0
        if "offset" in rows:
            # A reboot reset CLOCK_MONOTONIC: continue the store clock after every time
            # the file holds, and expire every lease so none can be valid twice.
            latest = db.execute(
                "SELECT MAX(COALESCE(MAX(created), 0), COALESCE(MAX(lease_expires), 0),"
                " COALESCE(MAX(ready_at), 0), COALESCE(MAX(finished), 0)) FROM tasks"
            ).fetchone()[0]
            latest = max(latest, *(r[0] or 0 for r in db.execute("SELECT MAX(expires) FROM kv")))
            offset = float(latest) + 1.0 - time.monotonic()
            now = time.monotonic() + offset
            db.execute("UPDATE tasks SET lease_expires = ? WHERE state = 'running'", (now,))
            db.execute("UPDATE grants SET expires = ?", (now,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?), ('offset', ?)", (boot, offset))
        return offset

    def now(self) -> float:
        return time.monotonic() + self._offset

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

    def _bump(self, db: sqlite3.Connection, key: str, by: int = 1) -> int:
        row = db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = value + ?"
            " RETURNING value",
            (key, by, by),
        ).fetchone()
        return int(row[0])

    # -- QueueStore ---------------------------------------------------------

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        with self._write() as db:
            now = self.now()
            return [self._push_one(db, spec, now) for spec in specs]

    def _push_one(self, db: sqlite3.Connection, spec: TaskSpec, now: float) -> str:
        if spec.dedup_key is not None:
            row = db.execute(
                "SELECT id FROM tasks WHERE dedup_key = ? AND state IN ('queued', 'running')",
                (spec.dedup_key,),
            ).fetchone()
            if row is not None:
                return str(row[0])
        db.execute(
            "INSERT INTO tasks (id, name, payload, codec, queue, priority, max_attempts, lease_s,"
            " timeout, dedup_key, state, ready_at, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?) ON CONFLICT(id) DO NOTHING",
            (spec.id, spec.name, spec.payload, spec.codec, spec.queue, spec.priority,
             spec.max_attempts, spec.lease_s, spec.timeout, spec.dedup_key,
             now + spec.delay, now),
        )  # fmt: skip
        return spec.id

    def claim(
        self, queues: Sequence[str], worker: str, n: int, request_id: str | None = None
    ) -> list[TaskRecord]:
        # request_id needs no handling here: this backend's replies cannot be lost.
        if n <= 0:
            return []
        with self._write() as db:
            now = self.now()
            seqs: list[int] = []
            for queue in dict.fromkeys(queues):  # a queue listed twice is claimed from once
                rows = db.execute(
                    "SELECT seq FROM tasks WHERE state = 'queued' AND queue = ? AND ready_at <= ?"
                    " ORDER BY priority DESC, seq LIMIT ?",
                    (queue, now, n - len(seqs)),
                ).fetchall()
                seqs.extend(r[0] for r in rows)
                if len(seqs) >= n:
                    break
            if not seqs:
                return []
            last = self._bump(db, "token", len(seqs))
            claimed = []
            for token, seq in enumerate(seqs, start=last - len(seqs) + 1):
                row = db.execute(
                    "UPDATE tasks SET state = 'running', attempts = attempts + 1, token = ?,"
                    " worker = ?, lease_expires = ? + lease_s, started = ?"
                    f" WHERE seq = ? RETURNING {TASK_COLUMNS}",
                    (token, worker, now, now, seq),
                ).fetchone()
                claimed.append(_record(row))
            return claimed

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        out: dict[str, LeaseStatus] = {}
        if not leases:
            return out
        with self._write() as db:
            now = self.now()
            for lease in leases:
                row = db.execute(
                    "UPDATE tasks SET lease_expires = ? + lease_s WHERE id = ? AND token = ?"
                    " AND state = 'running' AND lease_expires > ? RETURNING cancel_requested",
                    (now, lease.task_id, lease.token, now),
                ).fetchone()
                if row is None:
                    out[lease.task_id] = "lost"
                else:
                    out[lease.task_id] = "cancel_requested" if row[0] else "held"
        return out

    def _locked_record(self, db: sqlite3.Connection, task_id: str) -> TaskRecord | None:
        row = db.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else _record(row)

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        accepted: list[bool] = []
        if not items:
            return accepted
        with self._write() as db:
            now = self.now()
            for lease, outcome in items:
                if outcome.kind == "succeeded":
                    # The common case needs no decision: one fenced UPDATE.
                    cur = db.execute(
                        "UPDATE tasks SET state = 'succeeded', result = ?, lease_expires = NULL,"
                        " finished = ? WHERE id = ? AND token = ? AND state = 'running'",
                        (outcome.result, now, lease.task_id, lease.token),
                    )
                    accepted.append(cur.rowcount == 1)
                    continue
                rec = self._locked_record(db, lease.task_id)
                if rec is None or rec.state != "running" or rec.token != lease.token:
                    accepted.append(False)
                    continue
                self._apply(db, rec, outcome, now)
                accepted.append(True)
            stale = accepted.count(False)
            if stale:
                self._bump(db, "stale_finishes", stale)
        return accepted

    def _apply(self, db: sqlite3.Connection, rec: TaskRecord, outcome: Outcome, now: float) -> None:
        state = outcome_state(outcome, rec)
        error = _error_blob(outcome.error or rec.error)
        if state == "queued":
            attempts = rec.attempts - 1 if outcome.kind == "release" else rec.attempts
            db.execute(
                "UPDATE tasks SET state = 'queued', attempts = ?, worker = NULL,"
                " lease_expires = NULL, ready_at = ?, error = ? WHERE id = ?",
                (attempts, now + outcome.delay, error, rec.id),
            )
        else:
            db.execute(
                "UPDATE tasks SET state = ?, result = ?, error = ?, lease_expires = NULL,"
                " finished = ? WHERE id = ?",
                (state, outcome.result, error, now, rec.id),
            )

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE tasks SET progress_done = ?, progress_total = ?"
                " WHERE id = ? AND token = ? AND state = 'running'",
                (done, total, lease.task_id, lease.token),
            )
            return cur.rowcount == 1

    def requeue_expired(self) -> int:
        with self._write() as db:
            now = self.now()
            rows = db.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'running' AND lease_expires <= ?",
                (now,),
            ).fetchall()
            for row in rows:
                rec = _record(row)
                state = expired_state(rec)
                db.execute(
                    "UPDATE tasks SET state = ?, lost = lost + 1, error = ?, lease_expires = NULL,"
                    " worker = CASE WHEN ? = 'queued' THEN NULL ELSE worker END, ready_at = ?,"
                    " finished = CASE WHEN ? = 'queued' THEN NULL ELSE ? END WHERE id = ?",
                    (state, _error_blob(lease_lost_error(rec)), state, now, state, now, rec.id),
                )
            return len(rows)

    def promote_due(self) -> int:
        return 0  # claim() filters on ready_at directly

    def cancel(self, task_id: str) -> TaskState | None:
        with self._write() as db:
            row = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            if row[0] == "queued":
                db.execute(
                    "UPDATE tasks SET state = 'cancelled', finished = ? WHERE id = ?",
                    (self.now(), task_id),
                )
                return "cancelled"
            if row[0] == "running":
                db.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?", (task_id,))
            return cast(TaskState, row[0])

    def get(self, task_id: str) -> TaskRecord | None:
        rows = self._read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return _record(rows[0]) if rows else None

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        for queue, state, count in self._read(
            "SELECT queue, state, COUNT(*) FROM tasks GROUP BY queue, state"
        ):
            counts.setdefault(queue, {})[state] = count
        rows = self._read("SELECT value FROM meta WHERE key = 'stale_finishes'")
        return QueueStats(counts, int(rows[0][0]) if rows else 0)

    def wait_for_tasks(self, queues: Sequence[str], timeout: float) -> None:
        names = list(dict.fromkeys(queues))
        if names:
            self._waiter.baseline()
            marks = ",".join("?" * len(names))
            due = self._read(
                f"SELECT MIN(ready_at) FROM tasks WHERE state = 'queued' AND queue IN ({marks})",
                names,
            )[0][0]
            if due is not None:
                until_due = due - self.now()
                if until_due <= 0:
                    return  # a task is claimable already
                timeout = min(timeout, until_due)
        self._waiter.wait(timeout)

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        ids = list(dict.fromkeys(task_ids))
        if ids:
            self._waiter.baseline()
            marks = ",".join("?" * len(ids))
            live = self._read(
                f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks})"
                " AND state IN ('queued', 'running')",
                ids,
            )[0][0]
            if live < len(ids):
                return  # one of them has ended (or does not exist) already
        self._waiter.wait(timeout)

    # -- LeaseStore ---------------------------------------------------------

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        with self._write() as db:
            now = self.now()
            db.execute("DELETE FROM grants WHERE name = ? AND expires <= ?", (name, now))
            row = db.execute(
                "UPDATE grants SET expires = ? WHERE name = ? AND holder = ? RETURNING token",
                (now + ttl, name, holder),
            ).fetchone()
            if row is not None:
                return Grant(name, holder, int(row[0]), now + ttl)
            held = db.execute("SELECT COUNT(*) FROM grants WHERE name = ?", (name,)).fetchone()[0]
            if held >= capacity:
                return None
            token = db.execute(
                "INSERT INTO grant_tokens VALUES (?, 1) ON CONFLICT(name)"
                " DO UPDATE SET token = token + 1 RETURNING token",
                (name,),
            ).fetchone()[0]
            db.execute("INSERT INTO grants VALUES (?, ?, ?, ?)", (name, holder, token, now + ttl))
            return Grant(name, holder, int(token), now + ttl)

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        with self._write() as db:
            now = self.now()
            cur = db.execute(
                "UPDATE grants SET expires = ? WHERE name = ? AND holder = ? AND token = ?"
                " AND expires > ?",
                (now + ttl, grant.name, grant.holder, grant.token, now),
            )
            return Grant(grant.name, grant.holder, grant.token, now + ttl) if cur.rowcount else None

    def release(self, grant: Grant) -> bool:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM grants WHERE name = ? AND holder = ? AND token = ? AND expires > ?",
                (grant.name, grant.holder, grant.token, self.now()),
            )
            return cur.rowcount == 1

    def holders(self, name: str) -> list[Grant]:
        rows = self._read(
            "SELECT holder, token, expires FROM grants WHERE name = ? AND expires > ?"
            " ORDER BY token",
            (name, self.now()),
        )
        return [Grant(name, holder, int(token), expires) for holder, token, expires in rows]

    # -- KVStore ------------------------------------------------------------

    def _kv_live(self, db: sqlite3.Connection, key: str, now: float) -> Versioned | None:
        row = db.execute(
            "SELECT value, version, expires FROM kv WHERE key = ?"
            " AND (expires IS NULL OR expires > ?)",
            (key, now),
        ).fetchone()
        return None if row is None else Versioned(row[0], int(row[1]), row[2])

    def _kv_write(
        self, db: sqlite3.Connection, key: str, value: bytes, expires: float | None
    ) -> int:
        version = self._bump(db, "kv_version")
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, version, expires))
        return version

    def kv_get(self, key: str) -> Versioned | None:
        return self._kv_live(self._conn(), key, self.now())

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        with self._write() as db:
            expires = None if ttl is None else self.now() + ttl
            return self._kv_write(db, key, value, expires)

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        with self._write() as db:
            now = self.now()
            item = self._kv_live(db, key, now)
            if (item.version if item else None) != expected_version:
                return None
            return self._kv_write(db, key, value, None if ttl is None else now + ttl)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with self._write() as db:
            now = self.now()
            item = self._kv_live(db, key, now)
            result = (int(item.value) if item else 0) + delta
            expires = item.expires if item else (None if ttl is None else now + ttl)
            self._kv_write(db, key, str(result).encode(), expires)
            return result

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        with self._write() as db:
            item = self._kv_live(db, key, self.now())
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            return True

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        rows = self._read(
            "SELECT key, value, version, expires FROM kv WHERE substr(key, 1, ?) = ?"
            " AND (expires IS NULL OR expires > ?) ORDER BY key LIMIT ?",
            (len(prefix), prefix, self.now(), -1 if limit is None else limit),
        )
        return [(k, Versioned(v, int(ver), exp)) for k, v, ver, exp in rows]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        with self._write() as db:
            row = db.execute(
                "INSERT INTO stream_entries (stream, data, time) VALUES (?, ?, ?) RETURNING id",
                (stream, data, self.now()),
            ).fetchone()
            if maxlen is not None:
                self._trim(db, stream, maxlen)
            return int(row[0])

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        rows = self._read(
            "SELECT id, data, time FROM stream_entries WHERE stream = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (stream, after, limit),
        )
        return [StreamEntry(int(i), d, t) for i, d, t in rows]

    def _trim(self, db: sqlite3.Connection, stream: str, maxlen: int) -> int:
        cur = db.execute(
            "DELETE FROM stream_entries WHERE stream = ? AND id <= (SELECT id FROM stream_entries"
            " WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (stream, stream, maxlen),
        )
        return cur.rowcount

    def trim(self, stream: str, maxlen: int) -> int:
        with self._write() as db:
            return self._trim(db, stream, maxlen)

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        with self._write() as db:
            now = self.now()
            db.execute(
                "INSERT INTO messages (channel, data, time) VALUES (?, ?, ?)", (channel, data, now)
            )
            if next(self._publish_count) % 100 == 0:
                db.execute("DELETE FROM messages WHERE time < ?", (now - MESSAGE_RETENTION_S,))

    def subscribe(self, channels: Sequence[str]) -> _SQLiteSubscription:
        return _SQLiteSubscription(self, channels)
