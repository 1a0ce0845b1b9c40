"""The QueueStore protocol on Redis: one Lua script per atomic step."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any, cast

import orjson

from taskspace.backends.base import (
    ERROR_HISTORY_MAX,
    REQUEST_ID_TTL_S,
    Lease,
    LeaseStatus,
    Outcome,
    QueueStats,
    TaskRecord,
    TaskSpec,
    TaskState,
    push_chunks,
)
from taskspace.backends.checks import check_limit, check_wait
from taskspace.backends.outcomes import check_list_filters, check_purge_states, unknown_cursor
from taskspace.backends.redis.conn import READ_TIMEOUT_S, RedisConnection
from taskspace.backends.redis.records import FIELDS, PACKED, number, record, unpack_record

# Index entries one list/purge script looks at before handing back a cursor.
SCAN_BUDGET = 1000
# How long a claim's request id is remembered (lua/_request.lua).
CLAIM_REQUEST_TTL = repr(REQUEST_ID_TTL_S)
# How long the final record a wait_for_finish brought may serve the next get.
ENDED_FRESH_S = 1.0
# Claim steps (see claim) remembered for repeats, at most.
MAX_PENDING_STEPS = 1024


def push_args(chunk: Sequence[TaskSpec]) -> list[Any]:
    """Push arguments for ``chunk``: PUSH_N (12) per task, see push_tasks in
    lua/common.lua (push.lua takes these, finish.lua takes them per follow-up)."""
    args: list[Any] = []
    for s in chunk:
        args += [s.id, s.name, s.payload, s.codec, s.queue, s.priority, s.max_attempts,
                 repr(float(s.lease_s)), number(s.timeout), s.dedup_key or "",
                 repr(float(s.delay)), number(s.result_ttl)]  # fmt: skip
    return args


def finish_args(items: Sequence[tuple[Lease, Outcome]]) -> list[Any]:
    """The finish script's arguments: 8 per item, then its follow-ups' push arguments."""
    args: list[Any] = []
    for lease, outcome in items:
        error = b"" if outcome.error is None else orjson.dumps(outcome.error)
        has_result = outcome.result is not None
        args += [lease.task_id, lease.token, outcome.kind, int(has_result),
                 outcome.result or b"", error, repr(float(outcome.delay)),
                 len(outcome.followups)]  # fmt: skip
        if outcome.followups:
            args += push_args(outcome.followups)
    return args


def names_args(names: Collection[str] | None) -> list[Any]:
    """Script arguments for a name filter: a count (-1 = any) and the names."""
    if names is None:
        return [-1]
    wanted = list(dict.fromkeys(names))
    return [len(wanted), *wanted]


class RedisQueue:
    """The QueueStore protocol (see base.QueueStore): one script per atomic
    step on the space's connection."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._prefix = conn.prefix
        # Per thread: the final record its last wait_for_finish brought.
        self._ended = threading.local()
        # Request id -> the claim step in flight when a claim with a wait raised.
        self._steps: dict[str, int] = {}
        self._steps_lock = threading.Lock()

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs``; atomic per chunk (see PUSH_CHUNK_TASKS), each
        chunk durable and deduplicated once its script returns. Chunks are
        pipelined (conn.RUN_MANY_WINDOW): when one fails, the next may have run
        too, as with any lost reply; a retried push adds no task twice (a task
        whose id exists is never pushed again)."""
        if not specs:
            return []
        replies = self._conn.run_many("push", map(push_args, push_chunks(specs)))
        return [i.decode() for reply in replies for i in reply]

    def claim(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None = None,
        names: Collection[str] | None = None,
        wait: float = 0.0,
    ) -> list[TaskRecord]:
        """With ``wait``, the first claim goes with the next_due script (is a
        task ready? when is the next delayed one due?) in one write; while
        nothing came, each step (at most READ_TIMEOUT_S, so a stalled server is
        BackendError soon) is BLPOP on the wake lists with the claim sent in
        the same write, so Redis claims the moment the BLPOP returns: a wake-up
        carries the claim. next_due runs again only after a step that timed
        out (a wake-up whose task another claim took blocks again at once).
        Each claim after
        the first has its own request id (``request_id`` + step); a repeat of a
        call of this process whose reply was lost first repeats the step in
        flight (``_steps``), so it returns what that step leased."""
        check_wait(wait)
        if n <= 0 or (names is not None and not names):
            return []
        fixed = [worker, n, "", CLAIM_REQUEST_TTL, *names_args(names), *queues]

        def args(step: int) -> list[Any]:
            if request_id is not None:
                fixed[2] = request_id if step == 0 else f"{request_id}/{step}"
            return fixed

        step = 0 if request_id is None else self._steps.get(request_id, 0)
        due_args = [*names_args(names), *queues]
        due_reply = None
        if wait <= 0:
            rows = self._conn.run("claim", args(step))
        else:  # the first claim and the first next_due in one write: one round trip
            rows, due_reply = self._conn.run_pair(("claim", args(step)), ("next_due", due_args))
        deadline = time.monotonic() + wait
        known, woken, due_at = False, [], math.inf
        while not rows and (left := deadline - time.monotonic()) > 0:
            if not known:  # what to block on, and until when at most
                if due_reply is None:
                    due_reply = self._conn.run("next_due", due_args, read=True)
                due_text, keys = due_reply
                due_reply, known = None, True
                due = float(due_text)
                due_at = math.inf if due < 0 else time.monotonic() + due
                woken = [k.decode() for k in keys] or [f"{self._prefix}wake:{q}" for q in queues]
            step += 1
            if request_id is not None:
                self._remember_step(request_id, step)
            until_due = due_at - time.monotonic()
            if until_due <= 0:  # a task is ready (the claim promotes a due one)
                rows = self._conn.run("claim", args(step))
                known = False
                continue
            block = min(left, READ_TIMEOUT_S, until_due)
            popped, rows = self._conn.block_then_run(woken, block, "claim", args(step))
            # A wake-up whose task was gone (claimed with no BLPOP, leaving its wake
            # entry) blocks again at once; a timed-out step looks again first.
            known = known and popped is not None
        if request_id is not None and step:
            with self._steps_lock:
                self._steps.pop(request_id, None)
        return [record(row) for row in rows]

    def _remember_step(self, request_id: str, step: int) -> None:
        """Note the claim step in flight for ``request_id`` (forgotten when the
        call returns; kept when it raises, for a repeat to recall)."""
        with self._steps_lock:
            if len(self._steps) >= MAX_PENDING_STEPS:
                self._steps.pop(next(iter(self._steps)))
            self._steps[request_id] = step

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        if not leases:
            return {}
        replies = self._conn.run("renew", [x for lease in leases for x in lease])
        return {
            lease.task_id: cast(LeaseStatus, reply.decode())
            for lease, reply in zip(leases, replies, strict=True)
        }

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        """One script for every item and every accepted item's follow-ups (so a
        fan-out of thousands of follow-ups is one long script: atomicity wins
        over PUSH_CHUNK_TASKS here). A retry after a lost reply is answered
        True with no second effect (the task's ``fin`` field holds the token
        of its accepted finish)."""
        if not items:
            return []
        return [bool(r) for r in self._conn.run("finish", finish_args(items))]

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        args = [lease.task_id, lease.token, repr(float(done)), repr(float(total))]
        return bool(self._conn.run("progress", args))

    def requeue_expired(self) -> int:
        return int(self._conn.run("requeue", [ERROR_HISTORY_MAX]))

    def promote_due(self) -> int:
        return int(self._conn.run("promote", []))

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        state = self._conn.run("cancel", [task_id, int(terminate)])
        return None if state is None else cast(TaskState, state.decode())

    def retry(self, task_id: str) -> TaskState | None:
        state = self._conn.run("retry", [task_id])
        return None if state is None else cast(TaskState, state.decode())

    def get(self, task_id: str) -> TaskRecord | None:
        """One HMGET; no round trip at all when this thread's previous call was
        a ``wait_for_finish`` that ended with this task's final record, less
        than ENDED_FRESH_S ago (the record the finishing script pushed)."""
        ended = self._take_ended()
        if ended is not None and ended.id == task_id:
            return ended
        key = f"{self._prefix}t:{task_id}"
        values = self._conn.call(lambda: self._conn.reads.hmget(key, FIELDS))
        return None if values[0] is None else record(values)

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord | None]:
        """One pipelined round trip of HMGETs (each record is read atomically)."""
        if not task_ids:
            return []
        pipe = self._conn.reads.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hmget(f"{self._prefix}t:{task_id}", FIELDS)
        rows = self._conn.call(pipe.execute)
        return [None if row[0] is None else record(row) for row in rows]

    def state(self, task_id: str) -> TaskState | None:
        """One HGET of the state field: never the payload or result."""
        key = f"{self._prefix}t:{task_id}"
        value = self._conn.call(lambda: self._conn.reads.hget(key, "state"))
        return None if value is None else cast(TaskState, value.decode())

    def list(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[TaskRecord]:
        """Scans the submission index SCAN_BUDGET entries per script, so a
        filter that matches few tasks costs round trips, never a long script."""
        check_list_filters(state, limit)
        cursor: str | None = "0"
        if after is not None:
            seq = self._conn.call(lambda: self._conn.reads.zscore(self._prefix + "idx", after))
            if seq is None:
                raise unknown_cursor(after)
            cursor = repr(int(seq))
        out: list[TaskRecord] = []
        filters = [state or "", queue or "", name or ""]
        while cursor is not None and len(out) < limit:
            args = [*filters, limit - len(out), cursor, SCAN_BUDGET]
            rows, last = self._conn.run("list", args, read=True)
            out += [record(row) for row in rows]
            cursor = None if not last else last.decode()
        return out

    def purge(self, queue: str, states: Collection[str]) -> int:
        """Deletes in steps of SCAN_BUDGET index entries (atomic per step)."""
        wanted = sorted(check_purge_states(states))
        deleted, cursor = 0, "0"
        while wanted:
            n, last = self._conn.run("purge", [queue, cursor, SCAN_BUDGET, *wanted])
            deleted += int(n)
            if not last:
                break
            cursor = last.decode()
        return deleted

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)
        return int(self._conn.run("reap", [limit]))

    def stats(self) -> QueueStats:
        pipe = self._conn.reads.pipeline(transaction=True)
        pipe.hgetall(self._prefix + "counts")
        pipe.get(self._prefix + "stale")
        raw, stale = self._conn.call(pipe.execute)
        counts: dict[str, dict[str, int]] = {}
        for field, value in raw.items():
            queue, _, state = field.decode().partition("\n")
            if int(value):
                counts.setdefault(queue, {})[state] = int(value)
        return QueueStats(counts, int(stale or 0))

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        """Blocks on the wake lists of ``names`` (None: any name; a worker
        passes the names it runs, so it is not woken by, nor spins on, tasks it
        cannot run)."""
        due_text, keys = self._conn.run("next_due", [*names_args(names), *queues], read=True)
        due = float(due_text)
        if due == 0:
            return
        wait = timeout if due < 0 else min(timeout, due)
        woken = [k.decode() for k in keys] or [f"{self._prefix}wake:{q}" for q in queues]
        self._conn.block(woken, wait)

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        """One round trip: the watch script (which registers this wait, or, if a
        task ended, pushes its final record to its done list itself) and, in
        the same write, BLPOP on the tasks' done lists. The final record that
        comes along (from watch or from the finishing script) is kept for this
        thread's next ``get`` of that task (see ``get``)."""
        self._ended.record = None
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return
        done = [f"{self._prefix}done:{i}" for i in ids]
        _, popped = self._conn.run_then_block("watch", ids, done, timeout)
        if popped is not None and popped[1].startswith(PACKED):
            self._ended.record = record(unpack_record(popped[1]))
            self._ended.at = time.monotonic()

    def _take_ended(self) -> TaskRecord | None:
        """The record the last wait_for_finish of this thread brought, if fresh;
        forgotten either way (it serves one read at most)."""
        ended: TaskRecord | None = getattr(self._ended, "record", None)
        if ended is None:
            return None
        self._ended.record = None
        return ended if time.monotonic() - self._ended.at < ENDED_FRESH_S else None
