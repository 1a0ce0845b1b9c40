"""QueueStore of the PostgreSQL backend.

Live tasks (queued, running) are in ``tasks``; a finish, cancel or expiry that
ends a task moves it to ``done`` in the same statement, so the hot table and
its indexes hold only what a claim may still touch (schema.py). Transitions
of a running task are decided by SQL generated from
``outcomes.RUNNING_TRANSITIONS`` (:func:`sql_transition`), or in Python with
the rows locked (``requeue_expired``); never a hand-written copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import orjson

from taskspace.backends.base import (
    REQUEST_ID_TTL_S,
    Lease,
    LeaseStatus,
    Outcome,
    QueueStats,
    TaskRecord,
    TaskSpec,
    TaskState,
    claim_waiting,
    push_chunks,
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
    unknown_cursor,
)
from taskspace.backends.postgres.conn import PgConn, map_error
from taskspace.backends.postgres.waiter import Waiter

if TYPE_CHECKING:
    import psycopg

Cursor = Any  # psycopg.Cursor[Any]

# cancel_requested: 0 none, 1 cancel, 2 cancel and terminate.
LEASE_STATUS: dict[int, LeaseStatus] = {0: "held", 1: "cancel_requested", 2: "terminate_requested"}
# Tasks a requeue_expired or reap handles per statement (small batches: short
# locks, little WAL at a time).
BATCH = 1000

COLUMNS = (
    "seq", "id", "name", "payload", "codec", "queue", "priority", "max_attempts", "lease_s",
    "timeout", "dedup_key", "state", "ready_at", "waiting", "attempts", "lost", "token",
    "worker", "lease_expires", "result", "error", "progress_done", "progress_total",
    "cancel_requested", "created", "started", "finished", "result_ttl", "reap_at",
    "finish_token",
)  # fmt: skip
# What a TaskRecord is built from (see record()).
RECORD = (
    "id, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup_key,"
    " state, ready_at, attempts, lost, token, worker, lease_expires, result, error,"
    " progress_done, progress_total, cancel_requested, created, started, finished, result_ttl"
)
T_RECORD = ", ".join("t." + c.strip() for c in RECORD.split(","))
# What list() returns: every column but the payload and the result.
LIST_RECORD = RECORD.replace("payload,", "''::bytea,").replace("result,", "NULL::bytea,")
# The lease clock and the wall clock, once per statement.
NOW_CTE = (
    "now AS MATERIALIZED (SELECT {s}lease_now() AS t,"
    " extract(epoch FROM clock_timestamp())::double precision AS w)"
)


def sql_transition(event: str, cancel: str, attempts: str, max_attempts: str) -> str:
    """RUNNING_TRANSITIONS as one SQL CASE over the SQL expressions given: the
    state a running task moves to on ``event`` (as outcomes.running_transition)."""
    rows = " ".join(
        f"WHEN '{name}' THEN CASE WHEN {cancel} THEN '{r.on_cancel}'"
        f" WHEN {attempts} < {max_attempts} THEN '{r.normal}' ELSE '{r.exhausted}' END"
        for name, r in RUNNING_TRANSITIONS.items()
    )
    return f"(CASE {event} {rows} END)"


def _moved(overrides: dict[str, str], source: str) -> str:
    """The select list that copies a row of ``source`` (tasks or done) into the
    other table, with some columns replaced by SQL expressions."""
    return ", ".join(overrides.get(col, f"{source}.{col}") for col in COLUMNS)


ALL_COLUMNS = ", ".join(COLUMNS)

# push: insert tasks (nextval in submission order), skipping ids that exist in
# either table and dedup keys a live task holds (waiters are woken after the
# commit, waiter.py).
PUSH_SQL = (
    f"WITH {NOW_CTE},"
    " input AS (SELECT * FROM unnest(%(ids)s::text[], %(names)s::text[], %(payloads)s::bytea[],"
    " %(codecs)s::text[], %(queues)s::text[], %(priorities)s::int[], %(max_attempts)s::int[],"
    " %(lease_s)s::float8[], %(timeouts)s::float8[], %(dedups)s::text[], %(delays)s::float8[],"
    " %(ttls)s::float8[]) WITH ORDINALITY AS i(id, name, payload, codec, queue, priority,"
    " max_attempts, lease_s, timeout, dedup_key, delay, result_ttl, ord)),"
    " ins AS (INSERT INTO {s}tasks (seq, id, name, payload, codec, queue, priority,"
    " max_attempts, lease_s, timeout, dedup_key, state, ready_at, waiting, created, result_ttl)"
    " SELECT nextval('{s}task_seq'), o.* FROM (SELECT i.id, i.name, i.payload, i.codec, i.queue,"
    " i.priority, i.max_attempts, i.lease_s, i.timeout, i.dedup_key, 'queued', now.t + i.delay,"
    " i.delay > 0, now.w, i.result_ttl FROM input i, now"
    " WHERE NOT EXISTS (SELECT 1 FROM {s}done d WHERE d.id = i.id) ORDER BY i.ord) o"
    " ON CONFLICT DO NOTHING RETURNING id)"
    " SELECT id FROM ins"
)
# Run before PUSH_SQL in its transaction: wait for a finish that is moving one
# of these tasks to `done` (it holds the row), so that the push's snapshot,
# taken after this statement, sees the `done` row. Without it a push racing a
# finish could miss both rows and insert the id again.
PUSH_LOCK_SQL = "SELECT 1 FROM {s}tasks WHERE id = ANY(%s::text[]) FOR KEY SHARE"
# A dedup key's live task (the id a deduplicated push returns).
DEDUP_SQL = "SELECT dedup_key, id FROM {s}tasks WHERE dedup_key = ANY(%s::text[])"

# Promotion: delayed tasks whose time came join the ready indexes (run just
# before a claim, in the same round trip; SKIP LOCKED: concurrent claims
# never wait on each other here).
PROMOTE_SQL = (
    "UPDATE tasks SET waiting = false WHERE seq IN (SELECT seq FROM tasks"
    " WHERE state = 'queued' AND waiting AND ready_at <= (SELECT lease_now())"
    " ORDER BY ready_at LIMIT 1000 FOR UPDATE SKIP LOCKED)"
)

# The claim, ONE statement: pick the first ready rows of each (queue, name)
# index range, skipping rows other claims hold (SKIP LOCKED), merge them in
# queue order, priority, FIFO, take tokens in that order, lease them, and
# record the request id with what it leased. A request id seen before leases
# nothing. {branch} is one of the two index ranges below.
CLAIM_SQL = (
    f"WITH {NOW_CTE},"
    " seen AS (SELECT 1 FROM claim_requests WHERE id = %(rid)s::text),"
    " pick AS MATERIALIZED (SELECT o.seq, nextval('tokens') AS token FROM ("
    " SELECT c.seq FROM {branch} WHERE NOT EXISTS (SELECT 1 FROM seen)"
    " ORDER BY b.ord, c.priority DESC, c.seq LIMIT %(n)s) o),"
    " claimed AS (UPDATE tasks t SET state = 'running', attempts = t.attempts + 1,"
    " token = p.token, worker = %(worker)s, lease_expires = now.t + t.lease_s, started = now.w,"
    " finish_token = NULL, waiting = false FROM pick p, now WHERE t.seq = p.seq"
    f" RETURNING t.seq, {T_RECORD}),"
    " req AS (INSERT INTO claim_requests SELECT %(rid)s::text,"
    " COALESCE(array_agg(c.id), '{}'), COALESCE(array_agg(c.token), '{}'),"
    f" (SELECT t FROM now) + {REQUEST_ID_TTL_S} FROM claimed c"
    " HAVING %(rid)s::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM seen))"
    " SELECT * FROM claimed ORDER BY token"
)
READY_ROWS = "t.state = 'queued' AND NOT t.waiting AND t.ready_at <= (SELECT t FROM now)"
BY_NAME = (
    "unnest(%(queues)s::text[], %(names)s::text[], %(ords)s::int[]) AS b(q, nm, ord)"
    " CROSS JOIN LATERAL (SELECT t.seq, t.priority FROM tasks t"
    f" WHERE t.queue = b.q AND t.name = b.nm AND {READY_ROWS}"
    " ORDER BY t.priority DESC, t.seq LIMIT %(n)s FOR UPDATE SKIP LOCKED) c"
)
ANY_NAME = (
    "unnest(%(queues)s::text[], %(ords)s::int[]) AS b(q, ord)"
    " CROSS JOIN LATERAL (SELECT t.seq, t.priority FROM tasks t"
    f" WHERE t.queue = b.q AND {READY_ROWS}"
    " ORDER BY t.priority DESC, t.seq LIMIT %(n)s FOR UPDATE SKIP LOCKED) c"
)
CLAIM_BY_NAME = CLAIM_SQL.replace("{branch}", BY_NAME).replace("{s}", "")
CLAIM_ANY_NAME = CLAIM_SQL.replace("{branch}", ANY_NAME).replace("{s}", "")
# What a claim request leased (a retry after a lost reply).
RECALL_SQL = (
    f"SELECT {T_RECORD} FROM tasks t JOIN (SELECT unnest(tasks) AS id, unnest(tokens) AS token"
    " FROM claim_requests WHERE id = %s) r ON t.id = r.id AND t.token = r.token ORDER BY t.token"
)

# renew: extend the leases still current, rows locked in seq order (no
# deadlock with a finish of the same tasks).
RENEW_SQL = (
    f"WITH {NOW_CTE},"
    " l AS (SELECT * FROM unnest(%(ids)s::text[], %(tokens)s::bigint[]) AS l(id, token)),"
    " cur AS (SELECT t.seq FROM tasks t JOIN l ON t.id = l.id AND t.token = l.token"
    " WHERE t.state = 'running' AND t.lease_expires > (SELECT t FROM now)"
    " ORDER BY t.seq FOR UPDATE OF t)"
    " UPDATE tasks t SET lease_expires = now.t + t.lease_s FROM cur, now WHERE t.seq = cur.seq"
    " RETURNING t.id, t.cancel_requested"
).replace("{s}", "")

TRANSITION = sql_transition("c.kind", "t.cancel_requested > 0", "t.attempts", "t.max_attempts")
DONE_FROM_FINISH = _moved(
    {
        "state": "m.next",
        "result": "m.new_result",
        "error": "COALESCE(m.new_error, m.error)",
        "lease_expires": "NULL",
        "finished": "now.w",
        "reap_at": "now.t + m.result_ttl",
        "finish_token": "m.token",
    },
    "m",
)
# finish, ONE statement: lock the running rows whose token matches (seq
# order), decide each next state by the generated transition table, requeue
# (retry, release) in place or move the ended ones to done; returns each
# accepted (id, token, queue, name, d[one] | q[ueued]).
FINISH_SQL = (
    f"WITH {NOW_CTE},"
    " input AS (SELECT * FROM unnest(%(ids)s::text[], %(tokens)s::bigint[], %(kinds)s::text[],"
    " %(results)s::bytea[], %(errors)s::text[], %(delays)s::float8[])"
    " AS i(id, token, kind, result, error, delay)),"
    f" cur AS MATERIALIZED (SELECT t.seq, c.kind, c.result, c.error::jsonb AS error, c.delay,"
    f" {TRANSITION} AS next FROM tasks t JOIN input c ON t.id = c.id AND t.token = c.token"
    " WHERE t.state = 'running' ORDER BY t.seq FOR UPDATE OF t),"
    " requeued AS (UPDATE tasks t SET state = 'queued',"
    " attempts = t.attempts - (c.kind = 'release')::int, worker = NULL, lease_expires = NULL,"
    " ready_at = now.t + c.delay, waiting = c.delay > 0, error = COALESCE(c.error, t.error),"
    " finish_token = t.token,"
    " progress_done = CASE WHEN c.kind = 'release' THEN NULL ELSE t.progress_done END,"
    " progress_total = CASE WHEN c.kind = 'release' THEN NULL ELSE t.progress_total END"
    " FROM cur c, now WHERE t.seq = c.seq AND c.next = 'queued'"
    " RETURNING t.id, t.token, t.queue, t.name),"
    " m AS (DELETE FROM tasks t USING cur c WHERE t.seq = c.seq AND c.next <> 'queued'"
    " RETURNING t.*, c.next, c.result AS new_result, c.error AS new_error),"
    f" ended AS (INSERT INTO done ({ALL_COLUMNS}) SELECT {DONE_FROM_FINISH} FROM m, now"
    " RETURNING id, finish_token, queue, name)"
    " SELECT id, finish_token, queue, name, 'd' FROM ended"
    " UNION ALL SELECT id, token, queue, name, 'q' FROM requeued"
).replace("{s}", "")
# After a finish committed: wake whoever waits for these tasks to end, or for
# a task of their queue (a retried or released task is ready again).
NOTIFY_FINISHED_SQL = (
    "SELECT count(pg_notify(%(channel)s, w.key)) FROM waiters w"
    " WHERE w.until > extract(epoch FROM clock_timestamp()) AND w.key IN ("
    " SELECT 'done:' || i FROM unnest(%(ids)s::text[]) AS i"
    " UNION SELECT 'q:' || queue FROM tasks WHERE id = ANY(%(ids)s::text[]) AND state = 'queued'"
    " UNION SELECT 'q:' || queue || E'\\n' || name FROM tasks"
    " WHERE id = ANY(%(ids)s::text[]) AND state = 'queued')"
)
# A finish not accepted: was it a retry of the accepted one (same token)?
FINISHED_BEFORE_SQL = (
    "SELECT id, token FROM (SELECT id, finish_token FROM tasks WHERE id = ANY(%(ids)s::text[])"
    " UNION ALL SELECT id, finish_token FROM done WHERE id = ANY(%(ids)s::text[])) f"
    " JOIN unnest(%(ids)s::text[], %(tokens)s::bigint[]) AS l(id, token) USING (id)"
    " WHERE f.finish_token = l.token"
)
STALE_SQL = (
    "INSERT INTO meta VALUES ('stale_finishes', %s) ON CONFLICT (key)"
    " DO UPDATE SET value = (meta.value::bigint + excluded.value::bigint)::text"
)

# requeue_expired, decided in Python: the expired rows, locked (SKIP LOCKED:
# concurrent maintainers split the work).
EXPIRED_SQL = (
    f"SELECT seq, {RECORD} FROM tasks t WHERE state = 'running'"
    " AND lease_expires <= (SELECT lease_now())"
    f" ORDER BY lease_expires LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
)
REQUEUE_LOST_SQL = (
    "UPDATE tasks t SET state = 'queued', lost = t.lost + 1, error = u.error::jsonb,"
    " lease_expires = NULL, worker = NULL, ready_at = (SELECT lease_now()), waiting = false"
    " FROM unnest(%(seqs)s::bigint[], %(errors)s::text[]) AS u(seq, error)"
    " WHERE t.seq = u.seq RETURNING t.queue, t.name"
)
END_LOST_SQL = (
    "WITH m AS (DELETE FROM tasks t USING unnest(%(seqs)s::bigint[], %(states)s::text[],"
    " %(errors)s::text[]) AS u(seq, next, new_error) WHERE t.seq = u.seq"
    " RETURNING t.*, u.next, u.new_error)"
    f" INSERT INTO done ({ALL_COLUMNS}) SELECT "
    + _moved(
        {
            "state": "m.next",
            "lost": "m.lost + 1",
            "error": "m.new_error::jsonb",
            "lease_expires": "NULL",
            "finished": "extract(epoch FROM clock_timestamp())",
            "reap_at": "(SELECT lease_now()) + m.result_ttl",
        },
        "m",
    )
    + " FROM m RETURNING id"
)
# cancel of a queued task: it moves to done as cancelled.
CANCEL_QUEUED_SQL = (
    "WITH m AS (DELETE FROM tasks t WHERE id = %s AND state = 'queued' RETURNING t.*)"
    f" INSERT INTO done ({ALL_COLUMNS}) SELECT "
    + _moved(
        {
            "state": "'cancelled'",
            "lease_expires": "NULL",
            "finished": "extract(epoch FROM clock_timestamp())",
            "reap_at": "(SELECT lease_now()) + m.result_ttl",
        },
        "m",
    )
    + " FROM m RETURNING id"
)
# retry of a failed or dead task: back from done, fresh attempts, its last
# error kept; it runs without its dedup key if a live task holds that now.
RETRY_SQL = (
    f"WITH m AS (DELETE FROM done d WHERE id = %(id)s AND state = ANY(%(states)s::text[])"
    " RETURNING d.*)"
    f" INSERT INTO tasks ({ALL_COLUMNS}) SELECT "
    + _moved(
        {
            "state": "'queued'",
            "attempts": "0",
            "lost": "0",
            "ready_at": "(SELECT lease_now())",
            "waiting": "false",
            "worker": "NULL",
            "lease_expires": "NULL",
            "result": "NULL",
            "progress_done": "NULL",
            "progress_total": "NULL",
            "cancel_requested": "0",
            "started": "NULL",
            "finished": "NULL",
            "reap_at": "NULL",
            "dedup_key": "CASE WHEN EXISTS (SELECT 1 FROM tasks x WHERE x.dedup_key ="
            " m.dedup_key) THEN NULL ELSE m.dedup_key END",
        },
        "m",
    )
    + " FROM m RETURNING queue, name"
)


def _task_args(specs: Sequence[TaskSpec]) -> dict[str, Any]:
    return {
        "ids": [s.id for s in specs],
        "names": [s.name for s in specs],
        "payloads": [s.payload for s in specs],
        "codecs": [s.codec for s in specs],
        "queues": [s.queue for s in specs],
        "priorities": [s.priority for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
        "lease_s": [float(s.lease_s) for s in specs],
        "timeouts": [None if s.timeout is None else float(s.timeout) for s in specs],
        "dedups": [s.dedup_key for s in specs],
        "delays": [float(s.delay) for s in specs],
        "ttls": [None if s.result_ttl is None else float(s.result_ttl) for s in specs],
    }


def _finished_keys(rows: Sequence[Any]) -> list[str]:
    """The waiter keys of a finish's accepted rows (id, token, queue, name, d|q)."""
    keys: set[str] = set()
    for task_id, _, queue, name, kind in rows:
        keys |= {f"done:{task_id}"} if kind == "d" else {f"q:{queue}", f"q:{queue}\n{name}"}
    return sorted(keys)


def _ready_keys(specs: Sequence[TaskSpec]) -> list[str]:
    """The waiter keys a push of ``specs`` wakes (delayed tasks too: a waiter
    then re-computes when the first is due)."""
    keys = {f"q:{s.queue}" for s in specs} | {f"q:{s.queue}\n{s.name}" for s in specs}
    return sorted(keys)


def record(row: Sequence[Any]) -> TaskRecord:
    """A TaskRecord from a row of ``RECORD`` (or ``LIST_RECORD``)."""
    progress = None if row[19] is None else (row[19], row[20])
    return TaskRecord(
        id=row[0], name=row[1], payload=bytes(row[2]), codec=row[3], queue=row[4],
        priority=row[5], max_attempts=row[6], lease_s=row[7], timeout=row[8],
        dedup_key=row[9], state=row[10], ready_at=row[11], attempts=row[12], lost=row[13],
        token=row[14], worker=row[15], lease_expires=row[16],
        result=None if row[17] is None else bytes(row[17]), error=row[18],
        progress=progress, cancel_requested=bool(row[21]), created=row[22],
        started=row[23], finished=row[24], result_ttl=row[25],
    )  # fmt: skip


def _error_text(error: dict[str, Any] | None) -> str | None:
    return None if error is None else orjson.dumps(error).decode()


# The caller's connection that pushes of a queue go to (store.transaction()).
CALLER_CONNECTION: ContextVar[tuple[PgQueue, Any] | None] = ContextVar(
    "taskspace_pg_caller_connection", default=None
)


class PgQueue:
    """Tasks in two tables (live ``tasks``, finished ``done``); claims are one
    statement with SKIP LOCKED; tokens from the space's SEQUENCE; waits on the
    waiter's LISTEN/NOTIFY."""

    def __init__(self, conn: PgConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter
        self._push_sql = PUSH_SQL.replace("{s}", "")
        self._push_sql_qualified = PUSH_SQL.replace("{s}", f'"{conn.schema}".')
        self._push_lock_sql = PUSH_LOCK_SQL.replace("{s}", "")
        self._push_lock_sql_qualified = PUSH_LOCK_SQL.replace("{s}", f'"{conn.schema}".')

    # -- push -----------------------------------------------------------------

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        """As the contract: chunks of PUSH_CHUNK_TASKS, each ONE statement
        (atomic on its own; retried once on a broken connection: a push is
        idempotent by task id). Inside ``with store.transaction(conn):`` of
        this thread (or task) the push goes into the caller's transaction
        instead (push_in)."""
        bound = CALLER_CONNECTION.get()
        if bound is not None and bound[0] is self:
            return self.push_in(bound[1], specs)
        ids: list[str] = []
        for chunk in push_chunks(specs):

            def run(sql: str, args: Any, chunk: Sequence[TaskSpec] = chunk) -> list[Any]:
                if sql != self._push_sql:
                    return self._c.read(sql, args)
                # The lock and the insert in one transaction, then (after its
                # commit, same round trip) the wake-up.
                wake = self._waiter.notify_step(_ready_keys(chunk))
                lock = (self._push_lock_sql, (args["ids"],))
                return self._c.pipeline([lock, (sql, args), wake], retry=True, together=2)[1]

            ids.extend(self._push(run, chunk, lambda _: None))
        return ids

    def push_with(
        self, cur: Cursor, specs: Sequence[TaskSpec], qualified: bool = False
    ) -> list[str]:
        """Push ``specs`` in the transaction of ``cur`` (the caller commits or
        rolls back; waiters are woken at commit). ``qualified``: names carry
        the schema (a connection that is not the store's)."""

        def run(sql: str, args: Any) -> list[Any]:
            if sql in (self._push_sql, self._push_sql_qualified):
                lock = self._push_lock_sql_qualified if qualified else self._push_lock_sql
                cur.execute(lock, (args["ids"],))
            cur.execute(sql, args)
            return list(cur.fetchall())

        def wake(keys: list[str]) -> None:
            self._waiter.notify(cur, keys)

        return self._push(run, specs, wake, qualified)

    def _push(
        self,
        run: Callable[[str, Any], list[Any]],
        specs: Sequence[TaskSpec],
        wake: Callable[[list[str]], None],
        qualified: bool = False,
    ) -> list[str]:
        """The push statement through ``run``, then ``wake`` with the keys to
        wake if anything was inserted, then the dedup lookups."""
        if not specs:
            return []
        sql = self._push_sql_qualified if qualified else self._push_sql
        inserted = {row[0] for row in run(sql, _task_args(specs))}
        if inserted:
            wake(_ready_keys(specs))
        keys = [s.dedup_key for s in specs if s.id not in inserted and s.dedup_key is not None]
        live: dict[str, str] = {}
        if keys:
            dedup = DEDUP_SQL.replace("{s}", f'"{self._c.schema}".' if qualified else "")
            live = {str(k): str(v) for k, v in run(dedup, (keys,))}
        return [s.id if s.id in inserted else live.get(s.dedup_key or "", s.id) for s in specs]

    def push_in(self, connection: psycopg.Connection[Any], specs: Sequence[TaskSpec]) -> list[str]:
        """Push ``specs`` in the caller's own transaction on ``connection`` (a
        psycopg 3 connection to the same database): committed with the
        caller's data or not at all. Errors map to taskspace errors."""
        try:
            with connection.cursor() as cur:
                return self.push_with(cur, specs, qualified=True)
        except Exception as exc:
            raise map_error(exc, "push in the caller's transaction", self._c.display) from exc

    # -- claim ----------------------------------------------------------------------

    def claim(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None = None,
        names: Collection[str] | None = None,
        wait: float = 0.0,
    ) -> list[TaskRecord]:
        """As the contract. With ``wait``: while nothing came, wait_for_tasks
        then claim again (a new request id per step, derived from the
        caller's), until ``wait`` has passed."""
        check_wait(wait)
        if n <= 0 or (names is not None and not names):
            return self._claim_now(queues, worker, n, names, request_id)
        return claim_waiting(
            lambda rid: self._claim_now(queues, worker, n, names, rid),
            lambda left: self.wait_for_tasks(queues, left, names),
            request_id,
            wait,
        )

    def _claim_now(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        names: Collection[str] | None,
        request_id: str | None,
    ) -> list[TaskRecord]:
        if n <= 0 or (names is not None and not names) or not queues:
            return []
        order = list(dict.fromkeys(queues))  # a queue listed twice is claimed from once
        args: dict[str, Any] = {"worker": worker, "n": n, "rid": request_id}
        if names is None:
            sql = CLAIM_ANY_NAME
            args |= {"queues": order, "ords": list(range(len(order)))}
        else:
            wanted = sorted(set(names))
            sql = CLAIM_BY_NAME
            args |= {
                "queues": [q for q in order for _ in wanted],
                "names": wanted * len(order),
                "ords": [i for i in range(len(order)) for _ in wanted],
            }

        # Promotion and the claim in one round trip; a claim with a request id
        # is safe to send again on a broken connection (it recalls, never
        # leases twice).
        _, rows = self._c.pipeline([(PROMOTE_SQL, ()), (sql, args)], retry=request_id is not None)
        if not rows and request_id is not None:
            return [record(row) for row in self._c.read(RECALL_SQL, (request_id,))]
        return [record(row[1:]) for row in rows]

    # -- leases ----------------------------------------------------------------------

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        if not leases:
            return {}
        rows = self._c.execute(
            RENEW_SQL,
            {"ids": [lease.task_id for lease in leases], "tokens": [x.token for x in leases]},
            retry=True,  # extending a lease again is harmless
        )
        held = {str(r[0]): LEASE_STATUS[int(r[1])] for r in rows}
        return {lease.task_id: held.get(lease.task_id, "lost") for lease in leases}

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        if not items:
            return []
        args = {
            "ids": [lease.task_id for lease, _ in items],
            "tokens": [lease.token for lease, _ in items],
            "kinds": [o.kind for _, o in items],
            "results": [o.result for _, o in items],
            "errors": [_error_text(o.error) for _, o in items],
            "delays": [float(o.delay) for _, o in items],
        }

        if not any(o.followups for _, o in items):
            # ONE statement; a retry after a broken connection is answered
            # True again by the finish token.
            wake = (NOTIFY_FINISHED_SQL, {"channel": self._waiter.channel, "ids": args["ids"]})
            rows = self._c.pipeline([(FINISH_SQL, args), wake], retry=True)[0]
            return self._settle(items, rows, lambda sql, a: self._c.execute(sql, a, retry=True))[0]

        def finish(cur: Cursor) -> list[bool]:
            def run(sql: str, a: Any) -> list[Any]:
                cur.execute(sql, a)
                return list(cur.fetchall()) if cur.description else []

            rows = run(FINISH_SQL, args)
            answers, fresh = self._settle(items, rows, run)
            self._waiter.notify(cur, _finished_keys(rows))
            # Follow-ups are pushed once every item is settled (as on Redis), in
            # the finish's transaction: never for a refused item, nor again for
            # a retry of an accepted one.
            followups = [f for lease, o in items if lease in fresh for f in o.followups]
            if followups:
                self.push_with(cur, followups)
            return answers

        return self._c.run(finish, "finish")

    def _settle(
        self,
        items: Sequence[tuple[Lease, Outcome]],
        rows: list[Any],
        run: Callable[[str, Any], list[Any]],
    ) -> tuple[list[bool], set[Lease]]:
        """Each item's answer (accepted now, or a retry of an accepted finish),
        and the leases this statement accepted; counts the stale rest."""
        accepted = {Lease(str(row[0]), int(row[1])) for row in rows}
        refused = [lease for lease, _ in items if lease not in accepted]
        again: set[Lease] = set()
        if refused:
            found = run(
                FINISHED_BEFORE_SQL,
                {"ids": [x.task_id for x in refused], "tokens": [x.token for x in refused]},
            )
            again = {Lease(str(row[0]), int(row[1])) for row in found}
            stale = sum(1 for lease in refused if lease not in again)
            if stale:
                run(STALE_SQL, (str(stale),))
        return [lease in accepted or lease in again for lease, _ in items], accepted

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        rows = self._c.execute(
            "UPDATE tasks SET progress_done = %s, progress_total = %s"
            " WHERE id = %s AND token = %s AND state = 'running' RETURNING 1",
            (done, total, lease.task_id, lease.token),
        )
        return bool(rows)

    def requeue_expired(self) -> int:
        """Expired leases, BATCH at a time (locked with SKIP LOCKED, decided
        by outcomes.expired_state in Python)."""
        total = 0
        while True:
            handled = self._c.run(self._requeue_batch, "requeue_expired")
            total += handled
            if handled < BATCH:
                return total

    def _requeue_batch(self, cur: Cursor) -> int:
        cur.execute(EXPIRED_SQL)
        rows = cur.fetchall()
        back: list[tuple[int, str]] = []
        ended: list[tuple[int, str, str]] = []
        for row in rows:
            rec = record(row[1:])
            error = orjson.dumps(lease_lost_error(rec)).decode()
            state = expired_state(rec)
            if state == "queued":
                back.append((row[0], error))
            else:
                ended.append((row[0], state, error))
        keys: list[str] = []
        if back:
            cur.execute(
                REQUEUE_LOST_SQL, {"seqs": [b[0] for b in back], "errors": [b[1] for b in back]}
            )
            for queue, name in cur.fetchall():
                keys += [f"q:{queue}", f"q:{queue}\n{name}"]
        if ended:
            cur.execute(
                END_LOST_SQL,
                {
                    "seqs": [e[0] for e in ended],
                    "states": [e[1] for e in ended],
                    "errors": [e[2] for e in ended],
                },
            )
            keys += [f"done:{row[0]}" for row in cur.fetchall()]
        self._waiter.notify(cur, sorted(set(keys)))
        return len(rows)

    def promote_due(self) -> int:
        return len(self._c.execute(PROMOTE_SQL + " RETURNING 1"))

    # -- admin --------------------------------------------------------------------

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        def cancel(cur: Cursor) -> TaskState | None:
            cur.execute("SELECT state FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
            row = cur.fetchone()
            if row is None:
                cur.execute("SELECT state FROM done WHERE id = %s", (task_id,))
                row = cur.fetchone()
                return None if row is None else cast(TaskState, row[0])
            state = cast(TaskState, row[0])
            if state in CANCEL_AT_ONCE_STATES:
                cur.execute(CANCEL_QUEUED_SQL, (task_id,))
                self._waiter.notify(cur, [f"done:{task_id}"])
                return "cancelled"
            if state == "running":
                cur.execute(
                    "UPDATE tasks SET cancel_requested = GREATEST(cancel_requested, %s)"
                    " WHERE id = %s",
                    (2 if terminate else 1, task_id),
                )
            return state

        return self._c.run(cancel, "cancel")

    def get(self, task_id: str) -> TaskRecord | None:
        found = self.get_many([task_id])
        return found[0]

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord | None]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return []
        rows = self._c.read(
            f"SELECT {RECORD} FROM tasks WHERE id = ANY(%(ids)s::text[])"
            f" UNION ALL SELECT {RECORD} FROM done WHERE id = ANY(%(ids)s::text[])",
            {"ids": ids},
        )
        found = {row[0]: record(row) for row in rows}
        return [found.get(task_id) for task_id in task_ids]

    def state(self, task_id: str) -> TaskState | None:
        rows = self._c.read(
            "SELECT state FROM tasks WHERE id = %(id)s"
            " UNION ALL SELECT state FROM done WHERE id = %(id)s",
            {"id": task_id},
        )
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
        where = ["seq > %(after)s"]
        params: dict[str, Any] = {"limit": limit}
        params["after"] = self._seq_of(after) if after is not None else 0
        for column, value in (("state", state), ("queue", queue), ("name", name)):
            if value is not None:
                where.append(f"{column} = %({column})s")
                params[column] = value
        cond = " AND ".join(where)
        branch = f"(SELECT seq, {LIST_RECORD} FROM {{t}} WHERE {cond} ORDER BY seq LIMIT %(limit)s)"
        rows = self._c.read(
            f"SELECT * FROM ({branch.format(t='tasks')} UNION ALL {branch.format(t='done')}) u"
            " ORDER BY seq LIMIT %(limit)s",
            params,
        )
        return [record(row[1:]) for row in rows]

    def _seq_of(self, task_id: str) -> int:
        rows = self._c.read(
            "SELECT seq FROM tasks WHERE id = %(id)s"
            " UNION ALL SELECT seq FROM done WHERE id = %(id)s",
            {"id": task_id},
        )
        if not rows:
            raise unknown_cursor(task_id)
        return int(rows[0][0])

    def retry(self, task_id: str) -> TaskState | None:
        def retry(cur: Cursor) -> TaskState | None:
            cur.execute(RETRY_SQL, {"id": task_id, "states": sorted(RETRYABLE_STATES)})
            moved = cur.fetchall()
            if moved:
                queue, name = moved[0]
                self._waiter.notify(cur, [f"q:{queue}", f"q:{queue}\n{name}"])
                return "queued"
            cur.execute(
                "SELECT state FROM tasks WHERE id = %(id)s"
                " UNION ALL SELECT state FROM done WHERE id = %(id)s",
                {"id": task_id},
            )
            row = cur.fetchone()
            return None if row is None else cast(TaskState, row[0])

        return self._c.run(retry, "retry")

    def purge(self, queue: str, states: Collection[str]) -> int:
        wanted = sorted(check_purge_states(states))
        if not wanted:
            return 0

        def purge(cur: Cursor) -> int:
            count = 0
            for table in ("tasks", "done"):
                cur.execute(
                    f"DELETE FROM {table} WHERE queue = %s AND state = ANY(%s::text[])",
                    (queue, wanted),
                )
                count += cur.rowcount
            return count

        return self._c.run(purge, "purge")

    def reap(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished tasks past their result_ttl (oldest
        first, SKIP LOCKED), and expired claim request ids and waiter rows."""
        check_limit(limit)

        def reap(cur: Cursor) -> int:
            cur.execute(
                "DELETE FROM done WHERE seq IN (SELECT seq FROM done"
                " WHERE reap_at <= (SELECT lease_now())"
                " ORDER BY reap_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (limit,),
            )
            count = int(cur.rowcount)
            cur.execute(
                "DELETE FROM claim_requests WHERE id IN (SELECT id FROM claim_requests"
                " WHERE expires <= (SELECT lease_now()) LIMIT %s FOR UPDATE SKIP LOCKED)",
                (limit,),
            )
            cur.execute(
                "DELETE FROM waiters WHERE key IN (SELECT key FROM waiters"
                " WHERE until < extract(epoch FROM clock_timestamp()) - 60 LIMIT %s"
                " FOR UPDATE SKIP LOCKED)",
                (limit,),
            )
            return count

        return self._c.run(reap, "reap")

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        rows = self._c.read(
            "SELECT queue, state, count(*) FROM tasks GROUP BY 1, 2"
            " UNION ALL SELECT queue, state, count(*) FROM done GROUP BY 1, 2"
            " UNION ALL SELECT NULL, NULL, value::bigint FROM meta WHERE key = 'stale_finishes'"
        )
        stale = 0
        for queue, state, count in rows:
            if queue is None:
                stale = int(count)
            else:
                by_state = counts.setdefault(queue, {})
                by_state[state] = by_state.get(state, 0) + int(count)
        return QueueStats(counts, stale)

    # -- waits ----------------------------------------------------------------------

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        order = list(dict.fromkeys(queues))
        wanted = None if names is None else sorted(set(names))
        if not order or (wanted is not None and not wanted):
            time.sleep(max(0.0, timeout)) if timeout > 0 else None
            return
        if wanted is None:
            keys = [f"q:{q}" for q in order]
        else:
            keys = [f"q:{q}\n{n}" for q in order for n in wanted]
        cond = "queue = ANY(%(queues)s::text[])"
        if wanted is not None:
            cond += " AND name = ANY(%(names)s::text[])"
        sql = (
            "SELECT EXISTS (SELECT 1 FROM tasks"
            f" WHERE state = 'queued' AND NOT waiting AND {cond}),"
            " (SELECT min(ready_at) FROM tasks WHERE state = 'queued' AND waiting) - lease_now()"
        )
        params = {"queues": order, "names": wanted}

        def ready() -> float | None:
            found, due_in = self._c.read(sql, params)[0]
            if found or (due_in is not None and due_in <= 0):
                return None
            return timeout if due_in is None else float(due_in)

        self._waiter.until(keys, ready, timeout)

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            time.sleep(max(0.0, timeout)) if timeout > 0 else None
            return

        def ready() -> float | None:
            live = self._c.read("SELECT count(*) FROM tasks WHERE id = ANY(%s::text[])", (ids,))
            return None if int(live[0][0]) < len(ids) else timeout

        self._waiter.until([f"done:{i}" for i in ids], ready, timeout)
