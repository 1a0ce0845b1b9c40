"""QueueStore of the SQLite backend."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from typing import cast

from taskspace.backends.base import (
    Lease,
    LeaseStatus,
    Outcome,
    QueueStats,
    TaskRecord,
    TaskSpec,
    TaskState,
    claim_waiting,
)
from taskspace.backends.checks import check_limit, check_wait
from taskspace.backends.outcomes import (
    CANCEL_AT_ONCE_STATES,
    RETRYABLE_STATES,
    RUNNING_TRANSITIONS,
    check_list_filters,
    check_purge_states,
    expired_state,
    lease_lost_error,
    outcome_state,
    unknown_cursor,
)
from taskspace.backends.sqlite.base import SQLiteConn
from taskspace.backends.sqlite.schema import LIST_COLUMNS, TASK_COLUMNS, error_blob, record
from taskspace.backends.sqlite.waiter import Waiter

READY = "state = 'queued' AND waiting = 0"
# The names of a queue's ready tasks, one index seek per name (a loose index scan).
NAMES_SQL = f"""
WITH RECURSIVE names(name) AS (
    SELECT MIN(name) FROM tasks WHERE {READY} AND queue = ?
    UNION ALL
    SELECT (SELECT MIN(name) FROM tasks WHERE {READY} AND queue = ? AND name > names.name)
    FROM names WHERE names.name IS NOT NULL
) SELECT name FROM names WHERE name IS NOT NULL
"""
ONE_NAME = f"SELECT seq, priority FROM tasks WHERE {READY} AND queue = ? AND name = ?"
# cancel_requested: 0 none, 1 cancel, 2 cancel and terminate.
LEASE_STATUS: dict[int, LeaseStatus] = {0: "held", 1: "cancel_requested", 2: "terminate_requested"}
LIVE = "('queued', 'running')"
# When every row of the table sends a succeeding task to one state, a success
# needs no read of the task: one fenced UPDATE.
_SUCCESS = RUNNING_TRANSITIONS["succeeded"]
SUCCESS_STATE: TaskState | None = (
    _SUCCESS.normal if _SUCCESS.normal == _SUCCESS.exhausted == _SUCCESS.on_cancel else None
)


# A retried push (same ids) changes nothing: ON CONFLICT(id) DO NOTHING.
INSERT_TASK = (
    "INSERT INTO tasks (id, name, payload, codec, queue, priority, max_attempts,"
    " lease_s, timeout, dedup_key, state, ready_at, waiting, created, result_ttl)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)"
    " ON CONFLICT(id) DO NOTHING"
)


def _task_row(spec: TaskSpec, now: float, wall: float) -> tuple[object, ...]:
    return (spec.id, spec.name, spec.payload, spec.codec, spec.queue, spec.priority,
            spec.max_attempts, spec.lease_s, spec.timeout, spec.dedup_key,
            now + spec.delay, int(spec.delay > 0), wall, spec.result_ttl)  # fmt: skip


class SQLiteQueue:
    """Tasks in one table; ready tasks sit in a partial index by (queue, name,
    priority) that holds no delayed task, so claims stay flat. Claim tokens come
    from the space's one counter; created/started/finished are wall-clock times."""

    def __init__(self, conn: SQLiteConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        if not specs:
            return []
        with self._c.write() as db:
            return self._push(db, specs)

    def _push(self, db: sqlite3.Connection, specs: Sequence[TaskSpec]) -> list[str]:
        now, wall = self._c.clock.now(), self._c.clock.wall()
        if all(spec.dedup_key is None for spec in specs):
            # The common case needs no per-task decision: one executemany.
            db.executemany(INSERT_TASK, [_task_row(spec, now, wall) for spec in specs])
            return [spec.id for spec in specs]
        return [self._push_one(db, spec, now, wall) for spec in specs]

    def _push_one(self, db: sqlite3.Connection, spec: TaskSpec, now: float, wall: float) -> str:
        if spec.dedup_key is not None:
            row = db.execute(
                f"SELECT id FROM tasks WHERE dedup_key = ? AND state IN {LIVE}",
                (spec.dedup_key,),
            ).fetchone()
            if row is not None:
                return str(row[0])
        db.execute(INSERT_TASK, _task_row(spec, now, wall))
        return spec.id

    def _promote(self, db: sqlite3.Connection, now: float) -> int:
        cur = db.execute(
            "UPDATE tasks SET waiting = 0 WHERE state = 'queued' AND waiting = 1 AND ready_at <= ?",
            (now,),
        )
        return cur.rowcount

    def claim(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None = None,
        names: Collection[str] | None = None,
        wait: float = 0.0,
    ) -> list[TaskRecord]:
        """As the contract. With ``wait``: claim, and while nothing came,
        wait_for_tasks then claim again, until ``wait`` has passed.
        ``request_id`` needs no handling: a local transaction's reply cannot
        be lost (a driver error means it did not commit)."""
        check_wait(wait)
        if n <= 0 or (names is not None and not names):
            return self._claim_now(queues, worker, n, names)  # nothing to wait for
        return claim_waiting(
            lambda _: self._claim_now(queues, worker, n, names),
            lambda left: self.wait_for_tasks(queues, left, names),
            request_id,
            wait,
        )

    def _claim_now(
        self, queues: Sequence[str], worker: str, n: int, names: Collection[str] | None
    ) -> list[TaskRecord]:
        if n <= 0 or (names is not None and not names):
            return []
        wanted = None if names is None else sorted(set(names))
        with self._c.write() as db:
            now = self._c.clock.now()
            self._promote(db, now)
            seqs: list[int] = []
            for queue in dict.fromkeys(queues):  # a queue listed twice is claimed from once
                seqs.extend(self._ready(db, queue, wanted, n - len(seqs)))
                if len(seqs) >= n:
                    break
            return self._lease_rows(db, seqs, worker, now) if seqs else []

    def _ready(
        self, db: sqlite3.Connection, queue: str, names: list[str] | None, n: int
    ) -> list[int]:
        """The first ``n`` ready tasks of ``queue`` (of ``names``), best first."""
        if names is None:
            names = [r[0] for r in db.execute(NAMES_SQL, (queue, queue))]
        if not names:
            return []
        if len(names) == 1:
            sql = f"{ONE_NAME} ORDER BY priority DESC, seq LIMIT ?"
            return [r[0] for r in db.execute(sql, (queue, names[0], n))]
        # One short index range per name, merged: never a walk past other names' tasks.
        part = (
            f"SELECT * FROM (SELECT priority, seq FROM tasks WHERE {READY} AND queue = ?"
            " AND name = ? ORDER BY priority DESC, seq LIMIT ?)"
        )
        sql = " UNION ALL ".join([part] * len(names)) + " ORDER BY priority DESC, seq LIMIT ?"
        params = [x for name in names for x in (queue, name, n)]
        return [r[1] for r in db.execute(sql, (*params, n))]

    def _lease_rows(
        self, db: sqlite3.Connection, seqs: list[int], worker: str, now: float
    ) -> list[TaskRecord]:
        wall = self._c.clock.wall()
        claimed = []
        for token, seq in zip(self._c.tokens(db, len(seqs)), seqs, strict=True):
            row = db.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1, token = ?,"
                " worker = ?, lease_expires = ? + lease_s, started = ?, finish_token = NULL"
                f" WHERE seq = ? RETURNING {TASK_COLUMNS}",
                (token, worker, now, wall, seq),
            ).fetchone()
            claimed.append(record(row))
        return claimed

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        out: dict[str, LeaseStatus] = {}
        if not leases:
            return out
        with self._c.write() as db:
            now = self._c.clock.now()
            for lease in leases:
                row = db.execute(
                    "UPDATE tasks SET lease_expires = ? + lease_s WHERE id = ? AND token = ?"
                    " AND state = 'running' AND lease_expires > ? RETURNING cancel_requested",
                    (now, lease.task_id, lease.token, now),
                ).fetchone()
                out[lease.task_id] = "lost" if row is None else LEASE_STATUS[int(row[0])]
        return out

    def _locked_record(self, db: sqlite3.Connection, task_id: str) -> TaskRecord | None:
        row = db.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else record(row)

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        accepted: list[bool] = []
        if not items:
            return accepted
        with self._c.write() as db:
            now, wall = self._c.clock.now(), self._c.clock.wall()
            stale = 0
            followups: list[TaskSpec] = []
            for lease, outcome in items:
                done = self._finish_one(db, lease, outcome, now, wall)
                if done is None:  # a retry of the accepted finish: no second effect
                    accepted.append(True)
                    continue
                accepted.append(done)
                if not done:
                    stale += 1
                else:
                    followups.extend(outcome.followups)
            # Follow-ups are pushed once every item is settled (as on Redis), so
            # a follow-up's dedup key held by a task this same call ends is free.
            if followups:
                self._push(db, followups)
            if stale:
                self._c.bump(db, "stale_finishes", stale)
        return accepted

    def _finish_one(
        self, db: sqlite3.Connection, lease: Lease, outcome: Outcome, now: float, wall: float
    ) -> bool | None:
        """True: accepted; False: stale; None: this token's finish was accepted before."""
        if outcome.kind == "succeeded" and SUCCESS_STATE is not None:
            cur = db.execute(
                "UPDATE tasks SET state = ?, result = ?, lease_expires = NULL,"
                " finished = ?, reap_at = ? + result_ttl, finish_token = token"
                " WHERE id = ? AND token = ? AND state = 'running'",
                (SUCCESS_STATE, outcome.result, wall, now, lease.task_id, lease.token),
            )
            if cur.rowcount == 1:
                return True
            rec = None
        else:
            rec = self._locked_record(db, lease.task_id)
            if rec is not None and rec.state == "running" and rec.token == lease.token:
                self._apply(db, rec, outcome, now, wall)
                return True
        row = db.execute("SELECT finish_token FROM tasks WHERE id = ?", (lease.task_id,)).fetchone()
        if row is not None and row[0] is not None and row[0] == lease.token:
            return None
        return False

    def _apply(
        self, db: sqlite3.Connection, rec: TaskRecord, outcome: Outcome, now: float, wall: float
    ) -> None:
        state = outcome_state(outcome, rec)
        error = error_blob(outcome.error or rec.error)
        if state == "queued":
            released = outcome.kind == "release"
            # A released task never started: it keeps no progress and no attempt.
            db.execute(
                "UPDATE tasks SET state = 'queued', attempts = attempts - ?, worker = NULL,"
                " lease_expires = NULL, ready_at = ?, waiting = ?, error = ?,"
                " finish_token = token,"
                " progress_done = CASE WHEN ? THEN NULL ELSE progress_done END,"
                " progress_total = CASE WHEN ? THEN NULL ELSE progress_total END WHERE id = ?",
                (int(released), now + outcome.delay, int(outcome.delay > 0), error,
                 released, released, rec.id),
            )  # fmt: skip
        else:
            db.execute(
                "UPDATE tasks SET state = ?, result = ?, error = ?, lease_expires = NULL,"
                " finished = ?, reap_at = ? + result_ttl, finish_token = token WHERE id = ?",
                (state, outcome.result, error, wall, now, rec.id),
            )

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        with self._c.write() as db:
            cur = db.execute(
                "UPDATE tasks SET progress_done = ?, progress_total = ?"
                " WHERE id = ? AND token = ? AND state = 'running'",
                (done, total, lease.task_id, lease.token),
            )
            return cur.rowcount == 1

    def requeue_expired(self) -> int:
        with self._c.write() as db:
            now, wall = self._c.clock.now(), self._c.clock.wall()
            rows = db.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'running' AND lease_expires <= ?",
                (now,),
            ).fetchall()
            for row in rows:
                rec = record(row)
                state = expired_state(rec)
                live = state == "queued"
                db.execute(
                    "UPDATE tasks SET state = ?, lost = lost + 1, error = ?, lease_expires = NULL,"
                    " worker = CASE WHEN ? THEN NULL ELSE worker END, ready_at = ?, waiting = 0,"
                    " finished = CASE WHEN ? THEN NULL ELSE ? END,"
                    " reap_at = CASE WHEN ? THEN NULL ELSE ? + result_ttl END WHERE id = ?",
                    (state, error_blob(lease_lost_error(rec)), live, now, live, wall, live, now,
                     rec.id),
                )  # fmt: skip
            return len(rows)

    def promote_due(self) -> int:
        with self._c.write() as db:
            return self._promote(db, self._c.clock.now())

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        with self._c.write() as db:
            row = db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            state = cast(TaskState, row[0])
            if state in CANCEL_AT_ONCE_STATES:
                db.execute(
                    "UPDATE tasks SET state = 'cancelled', finished = ?, reap_at = ? + result_ttl,"
                    " lease_expires = NULL WHERE id = ?",
                    (self._c.clock.wall(), self._c.clock.now(), task_id),
                )
                return "cancelled"
            if state == "running":
                db.execute(
                    "UPDATE tasks SET cancel_requested = MAX(cancel_requested, ?) WHERE id = ?",
                    (2 if terminate else 1, task_id),
                )
            return state

    def get(self, task_id: str) -> TaskRecord | None:
        rows = self._c.read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return record(rows[0]) if rows else None

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord | None]:
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, TaskRecord] = {}
        for start in range(0, len(ids), 500):  # below SQLite's parameter limit
            part = ids[start : start + 500]
            rows = self._c.read(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE id IN ({','.join('?' * len(part))})",
                part,
            )
            found.update((row[0], record(row)) for row in rows)
        return [found.get(task_id) for task_id in task_ids]

    def state(self, task_id: str) -> TaskState | None:
        rows = self._c.read("SELECT state FROM tasks WHERE id = ?", (task_id,))
        return cast(TaskState, rows[0][0]) if rows else None

    def list(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[TaskRecord]:
        check_list_filters(state, limit)
        where = ["seq > ?"]
        params: list[object] = [self._seq_of(after) if after is not None else 0]
        for column, value in (("state", state), ("queue", queue), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._c.read(
            f"SELECT {LIST_COLUMNS} FROM tasks WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*params, limit),
        )
        return [record(row) for row in rows]

    def _seq_of(self, task_id: str) -> int:
        rows = self._c.read("SELECT seq FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            raise unknown_cursor(task_id)
        return int(rows[0][0])

    def retry(self, task_id: str) -> TaskState | None:
        with self._c.write() as db:
            row = db.execute(
                "SELECT state, dedup_key FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None or row[0] not in RETRYABLE_STATES:
                return None if row is None else cast(TaskState, row[0])
            taken = (
                row[1] is not None
                and db.execute(
                    f"SELECT 1 FROM tasks WHERE dedup_key = ? AND state IN {LIVE}",
                    (row[1],),
                ).fetchone()
            )
            # A live task holds the key now: this one runs again without it.
            db.execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, lost = 0, ready_at = ?,"
                " waiting = 0, worker = NULL, lease_expires = NULL, result = NULL,"
                " progress_done = NULL, progress_total = NULL, cancel_requested = 0,"
                " started = NULL, finished = NULL, reap_at = NULL,"
                " dedup_key = CASE WHEN ? THEN NULL ELSE dedup_key END WHERE id = ?",
                (self._c.clock.now(), bool(taken), task_id),
            )
            return "queued"

    def purge(self, queue: str, states: Collection[str]) -> int:
        wanted = sorted(check_purge_states(states))
        if not wanted:
            return 0
        with self._c.write() as db:
            marks = ",".join("?" * len(wanted))
            cur = db.execute(
                f"DELETE FROM tasks WHERE queue = ? AND state IN ({marks})", (queue, *wanted)
            )
            return cur.rowcount

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)
        with self._c.write() as db:
            cur = db.execute(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE reap_at <= ?"
                " ORDER BY reap_at LIMIT ?)",
                (self._c.clock.now(), limit),
            )
            return cur.rowcount

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        for queue, state, count in self._c.read(
            "SELECT queue, state, COUNT(*) FROM tasks GROUP BY queue, state"
        ):
            counts.setdefault(queue, {})[state] = count
        rows = self._c.read("SELECT value FROM meta WHERE key = 'stale_finishes'")
        return QueueStats(counts, int(rows[0][0]) if rows else 0)

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        queue_list = list(dict.fromkeys(queues))
        wanted = None if names is None else list(dict.fromkeys(names))

        def ready() -> float | None:
            if not queue_list or (wanted is not None and not wanted):
                return timeout
            if self._any_ready(queue_list, wanted):
                return None  # a task is claimable already
            due = self._c.read(
                "SELECT MIN(ready_at) FROM tasks WHERE state = 'queued' AND waiting = 1"
            )[0][0]
            if due is None:
                return timeout
            until_due = due - self._c.clock.now()
            return None if until_due <= 0 else until_due  # the next claim promotes it

        self._waiter.until(ready, timeout)

    def _any_ready(self, queues: Sequence[str], names: Sequence[str] | None) -> bool:
        sql = f"SELECT 1 FROM tasks WHERE {READY}"
        sql += f" AND queue IN ({','.join('?' * len(queues))})"
        params: list[str] = [*queues]
        if names is not None:
            sql += f" AND name IN ({','.join('?' * len(names))})"
            params += [*names]
        return bool(self._c.read(sql + " LIMIT 1", params))

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        ids = list(dict.fromkeys(task_ids))

        def ready() -> float | None:
            if not ids:
                return timeout
            marks = ",".join("?" * len(ids))
            live = self._c.read(
                f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks}) AND state IN {LIVE}", ids
            )[0][0]
            return None if live < len(ids) else timeout  # one ended, or does not exist

        self._waiter.until(ready, timeout)
