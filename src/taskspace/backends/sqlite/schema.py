"""The SQLite schema (versioned), its migration from earlier files, and row decoding."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from taskspace.backends.base import TaskRecord
from taskspace.errors import ConfigError

if TYPE_CHECKING:
    from taskspace.backends.sqlite.base import SQLiteConn

# The layout this code writes. 1: every file before contract v2 (no version row).
SCHEMA_VERSION = 2

TABLES = """
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
CREATE TABLE IF NOT EXISTS lease_grants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, holder TEXT NOT NULL, token INTEGER NOT NULL,
    expires REAL NOT NULL, data BLOB NOT NULL, capacity INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv_changes (
    revision INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, version INTEGER NOT NULL,
    value BLOB, PRIMARY KEY (revision, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_entries_by_stream ON stream_entries(stream, id);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
)
"""

# Columns of tasks added since the first release: (name, declaration).
ADDED_COLUMNS = (
    # 1 while a queued task waits for its ETA: keeps delayed tasks out of the hot
    # ready indexes, so a claim never walks past them.
    ("waiting", "INTEGER NOT NULL DEFAULT 0"),
    ("result_ttl", "REAL"),
    # finished + result_ttl on the lease clock: when reap may delete the task
    # (NULL: never).
    ("reap_at", "REAL"),
    # The token of the last accepted finish (a retried finish is answered True
    # again); cleared by the next claim.
    ("finish_token", "INTEGER"),
)

# A claim reads the first rows of each (queue, name) range of the ready index and
# nothing else: no delayed task, no task of a name it did not ask for.
INDEXES = """
DROP INDEX IF EXISTS tasks_ready;
CREATE INDEX IF NOT EXISTS tasks_ready_by_name ON tasks(queue, name, priority DESC, seq)
    WHERE state = 'queued' AND waiting = 0;
CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks(ready_at)
    WHERE state = 'queued' AND waiting = 1;
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(lease_expires) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(queue, state);
CREATE INDEX IF NOT EXISTS tasks_reap ON tasks(reap_at) WHERE reap_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_dedup ON tasks(dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS kv_expires ON kv(expires) WHERE expires IS NOT NULL;
CREATE INDEX IF NOT EXISTS lease_grants_by_name ON lease_grants(name, expires);
CREATE INDEX IF NOT EXISTS lease_grants_expires ON lease_grants(expires);
CREATE INDEX IF NOT EXISTS messages_time ON messages(time)
"""

TASK_COLUMNS = (
    "id, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup_key, "
    "state, ready_at, attempts, lost, token, worker, lease_expires, result, error, "
    "progress_done, progress_total, cancel_requested, created, started, finished, result_ttl"
)
# What list() returns: every column but the payload and the result.
LIST_COLUMNS = TASK_COLUMNS.replace("payload,", "x'',").replace("result,", "NULL,")


def _run(db: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` in the caller's transaction (executescript would
    commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _table_exists(db: sqlite3.Connection, name: str) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(sql, (name,)).fetchone() is not None


def initialise(c: SQLiteConn) -> str:
    """Create the schema in a new file, or bring a file of any earlier layout up to
    date in place (one transaction, so idempotent and safe against concurrent
    openers); set the lease clock for this boot; return the space id.

    ConfigError if the file was written by a newer taskspace (its schema version
    is above SCHEMA_VERSION)."""
    with c.write() as db:
        existed = _table_exists(db, "tasks")
        version = SCHEMA_VERSION
        if existed:
            stored = c.meta(db, "schema") if _table_exists(db, "meta") else None
            version = 1 if stored is None else int(stored)
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{c.settings.path!r} has schema version {version}, newer than this"
                f" taskspace knows ({SCHEMA_VERSION}); upgrade taskspace to open it"
            )
        _run(db, TABLES)
        have = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
        for name, declaration in ADDED_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")
        if version < 2:
            _from_v1(db, c)
        c.check_boot(db)  # after the grants moved: a reboot expires them too
        now = c.clock.now()
        if version < 2:
            # Times a person reads were on the lease clock: move them to the wall clock.
            delta = c.clock.wall() - now
            db.execute(
                "UPDATE tasks SET created = created + ?, started = started + ?,"
                " finished = finished + ?",
                (delta, delta, delta),
            )
            db.execute("UPDATE stream_entries SET time = time + ?", (delta,))
        if "waiting" not in have:
            db.execute(
                "UPDATE tasks SET waiting = 1 WHERE state = 'queued' AND ready_at > ?", (now,)
            )
        _run(db, INDEXES)
        c.set_meta(db, "schema", SCHEMA_VERSION)
        space_id = c.meta(db, "space_id")
        if space_id is None:
            space_id = uuid.uuid4().hex
            c.set_meta(db, "space_id", space_id)
        return str(space_id)


def _from_v1(db: sqlite3.Connection, c: SQLiteConn) -> None:
    """Schema 1 -> 2: grants get ids, data and their capacity (unknown: NULL, which
    any acquire accepts); KV versions become space revisions."""
    if _table_exists(db, "grants"):
        db.execute(
            "INSERT OR IGNORE INTO lease_grants (id, name, holder, token, expires, data)"
            " SELECT 'migrated:' || name || ':' || holder, name, holder, token, expires, x''"
            " FROM grants"
        )
        db.execute("DROP TABLE grants")
    db.execute("DROP TABLE IF EXISTS grant_tokens")
    top = db.execute("SELECT COALESCE(MAX(version), 0) FROM kv").fetchone()[0]
    revision = max(int(c.meta(db, "kv_version", 0)), int(top))
    c.set_meta(db, "revision", revision)
    db.execute("DELETE FROM meta WHERE key = 'kv_version'")


def record(row: Sequence[Any]) -> TaskRecord:
    """A TaskRecord from a row of ``TASK_COLUMNS`` (or ``LIST_COLUMNS``)."""
    progress = None if row[19] is None else (row[19], row[20])
    return TaskRecord(
        id=row[0], name=row[1], payload=row[2], codec=row[3], queue=row[4], priority=row[5],
        max_attempts=row[6], lease_s=row[7], timeout=row[8], dedup_key=row[9],
        state=row[10], ready_at=row[11], attempts=row[12], lost=row[13], token=row[14],
        worker=row[15], lease_expires=row[16], result=row[17],
        error=None if row[18] is None else orjson.loads(row[18]),
        progress=progress, cancel_requested=bool(row[21]), created=row[22],
        started=row[23], finished=row[24], result_ttl=row[25],
    )  # fmt: skip


def error_blob(error: dict[str, Any] | None) -> bytes | None:
    """An error as stored (JSON), or None."""
    return None if error is None else orjson.dumps(error)
