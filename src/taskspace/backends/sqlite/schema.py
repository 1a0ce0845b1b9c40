"""The SQLite schema, its migration from earlier files, and row decoding."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import orjson

from taskspace.backends.base import TaskRecord

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

# Columns added since the first release: (name, declaration).
ADDED_COLUMNS = (
    # 1 while a queued task waits for its ETA: keeps delayed tasks out of the hot
    # ready indexes, so a claim never walks past them.
    ("waiting", "INTEGER NOT NULL DEFAULT 0"),
    ("result_ttl", "REAL"),
    # finished + result_ttl: when reap may delete the finished task (NULL: never).
    ("reap_at", "REAL"),
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
"""

TASK_COLUMNS = (
    "id, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup_key, "
    "state, ready_at, attempts, lost, token, worker, lease_expires, result, error, "
    "progress_done, progress_total, cancel_requested, created, started, finished, result_ttl"
)
# What list() returns: every column but the payload and the result.
LIST_COLUMNS = TASK_COLUMNS.replace("payload,", "x'',").replace("result,", "NULL,")


def migrate(db: sqlite3.Connection, now: float) -> None:
    """Bring a file of any earlier layout up to date (inside the caller's transaction)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    for name, declaration in ADDED_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {declaration}")
            if name == "waiting":
                db.execute(
                    "UPDATE tasks SET waiting = 1 WHERE state = 'queued' AND ready_at > ?", (now,)
                )
    for statement in INDEXES.split(";"):
        if statement.strip():
            db.execute(statement)


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
