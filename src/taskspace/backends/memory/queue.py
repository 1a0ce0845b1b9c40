"""QueueStore of the in-process backend.

Guarantees (as the contract): every method is one step under the space's lock;
claim tokens come from the space's fencing counter (shared with lease
grants); a finish is accepted only for the current lease of a running task,
pushes its follow-ups in the same step (after every item of the call is
settled, so a dedup key freed by the call is free for them), and is answered
True again (with no effect) when retried with the token it accepted; task
times a person reads
(created, started, finished) are on the wall clock, every expiry and ready
time on the lease clock. State changes go through :mod:`outcomes` only.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Sequence
from dataclasses import replace

from taskspace.backends.base import (
    FINAL_STATES,
    LIVE_STATES,
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
from taskspace.backends.memory.state import MemoryState, ReadyHeap, Slot
from taskspace.backends.outcomes import (
    CANCEL_AT_ONCE_STATES,
    RETRYABLE_STATES,
    check_list_filters,
    check_purge_states,
    expired_state,
    lease_lost_error,
    outcome_state,
    unknown_cursor,
)


class MemoryQueue:
    """Tasks in per-(queue, name) priority heaps, so a claim restricted to some
    names never walks past the queued tasks of other names."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        s = self._s
        with s.cond:
            now, wall = s.clock.now(), s.clock.wall()
            ids = [self._push_one(spec, now, wall) for spec in specs]
            s.cond.notify_all()
            return ids

    def _push_one(self, spec: TaskSpec, now: float, wall: float) -> str:
        s = self._s
        if spec.dedup_key is not None and spec.dedup_key in s.dedup:
            return s.dedup[spec.dedup_key]
        if spec.id in s.tasks:
            return spec.id
        record = TaskRecord(
            id=spec.id, name=spec.name, payload=spec.payload, codec=spec.codec,
            queue=spec.queue, priority=spec.priority, max_attempts=spec.max_attempts,
            lease_s=spec.lease_s, timeout=spec.timeout, dedup_key=spec.dedup_key,
            state="queued", ready_at=now + spec.delay, created=wall, result_ttl=spec.result_ttl,
        )  # fmt: skip
        slot = Slot(record, next(s.seq))
        s.tasks[spec.id] = slot
        if spec.dedup_key is not None:
            s.dedup[spec.dedup_key] = spec.id
        self._enqueue(slot, now)
        return spec.id

    def _enqueue(self, slot: Slot, now: float) -> None:
        rec = slot.record
        if rec.ready_at > now:
            heapq.heappush(self._s.delayed, (rec.ready_at, slot.seq, rec.id))
        else:
            self._make_ready(slot)

    def _make_ready(self, slot: Slot) -> None:
        heap = self._s.ready.setdefault(slot.record.queue, {}).setdefault(slot.record.name, [])
        heapq.heappush(heap, (-slot.record.priority, slot.seq, slot.record.id))

    def _queued(self, task_id: str, seq: int) -> Slot | None:
        slot = self._s.tasks.get(task_id)
        if slot is None or slot.seq != seq or slot.record.state != "queued":
            return None
        return slot

    def _promote(self, now: float) -> int:
        delayed = self._s.delayed
        moved = 0
        while delayed and delayed[0][0] <= now:
            _, seq, task_id = heapq.heappop(delayed)
            slot = self._queued(task_id, seq)
            if slot is not None:
                self._make_ready(slot)
                moved += 1
        return moved

    def claim(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None = None,
        names: Collection[str] | None = None,
        wait: float = 0.0,
    ) -> list[TaskRecord]:
        """As the contract; a repeated ``request_id`` returns the first call's
        records. With ``wait``: claim, and while nothing came, wait_for_tasks
        then claim again (each claim after a wait under its own request id,
        derived from ``request_id``), until ``wait`` has passed."""
        check_wait(wait)
        if n <= 0 or (names is not None and not names):
            return self._claim_now(queues, worker, n, request_id, names)  # nothing to wait for
        return claim_waiting(
            lambda rid: self._claim_now(queues, worker, n, rid, names),
            lambda left: self.wait_for_tasks(queues, left, names),
            request_id,
            wait,
        )

    def _claim_now(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None,
        names: Collection[str] | None,
    ) -> list[TaskRecord]:
        s = self._s
        claimed: list[TaskRecord] = []
        with s.cond:
            now, wall = s.clock.now(), s.clock.wall()
            seen, first = s.recall("claim", request_id, now)
            if seen:
                return list(first)
            self._promote(now)
            for queue in dict.fromkeys(queues):
                by_name = s.ready.get(queue)
                if not by_name or len(claimed) >= n:
                    continue
                wanted = by_name if names is None else [x for x in names if x in by_name]
                heaps = [by_name[x] for x in wanted]
                while len(claimed) < n and (slot := self._pop_best(heaps)) is not None:
                    claimed.append(self._lease(slot, worker, now, wall))
                for name in [x for x in wanted if not by_name[x]]:
                    del by_name[name]
            s.remember("claim", request_id, now, tuple(claimed))
        return claimed

    def _pop_best(self, heaps: list[ReadyHeap]) -> Slot | None:
        """Pop the best live entry across ``heaps`` (one per task name)."""
        while True:
            live = [h for h in heaps if h]
            if not live:
                return None
            _, seq, task_id = heapq.heappop(min(live, key=lambda h: h[0]))
            slot = self._queued(task_id, seq)
            if slot is not None:
                return slot

    def _lease(self, slot: Slot, worker: str, now: float, wall: float) -> TaskRecord:
        s = self._s
        rec = slot.record
        slot.record = replace(
            rec, state="running", attempts=rec.attempts + 1, token=s.next_token(),
            worker=worker, lease_expires=now + rec.lease_s, started=wall,
        )  # fmt: skip
        s.running.add(rec.id)
        s.accepted.pop(rec.id, None)
        return slot.record

    def _current(self, lease: Lease) -> Slot | None:
        slot = self._s.tasks.get(lease.task_id)
        if slot is None or slot.record.state != "running" or slot.record.token != lease.token:
            return None
        return slot

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        s = self._s
        out: dict[str, LeaseStatus] = {}
        with s.cond:
            now = s.clock.now()
            for lease in leases:
                slot = self._current(lease)
                expires = slot.record.lease_expires if slot else None
                if slot is None or expires is None or expires <= now:
                    out[lease.task_id] = "lost"
                    continue
                slot.record = replace(slot.record, lease_expires=now + slot.record.lease_s)
                out[lease.task_id] = self._lease_status(slot.record)
        return out

    def _lease_status(self, rec: TaskRecord) -> LeaseStatus:
        if rec.id in self._s.terminate:
            return "terminate_requested"
        return "cancel_requested" if rec.cancel_requested else "held"

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        s = self._s
        accepted: list[bool] = []
        followups: list[TaskSpec] = []
        with s.cond:
            now, wall = s.clock.now(), s.clock.wall()
            for lease, outcome in items:
                slot = self._current(lease)
                if slot is None:
                    repeat = s.accepted.get(lease.task_id) == lease.token
                    if not repeat:
                        s.stale_finishes += 1
                    accepted.append(repeat)
                    continue
                self._apply(slot, outcome, now, wall)
                s.accepted[lease.task_id] = lease.token
                followups.extend(outcome.followups)
                accepted.append(True)
            # Follow-ups are pushed once every item is settled (as on Redis), so
            # a follow-up's dedup key held by a task this same call ends is free.
            for spec in followups:
                self._push_one(spec, now, wall)
            s.cond.notify_all()
        return accepted

    def _apply(self, slot: Slot, outcome: Outcome, now: float, wall: float) -> None:
        rec = slot.record
        state = outcome_state(outcome, rec)
        self._s.running.discard(rec.id)
        error = outcome.error or rec.error
        if state == "queued":
            released = outcome.kind == "release"
            slot.record = replace(
                rec, state="queued", attempts=rec.attempts - 1 if released else rec.attempts,
                worker=None, lease_expires=None, ready_at=now + outcome.delay, error=error,
                progress=None if released else rec.progress,
            )  # fmt: skip
            self._enqueue(slot, now)
            return
        slot.record = replace(
            rec, state=state, result=outcome.result, error=error, lease_expires=None,
            finished=wall,
        )  # fmt: skip
        self._settle(slot, now)

    def _settle(self, slot: Slot, now: float) -> None:
        """Bookkeeping of a task that just reached a final state."""
        s = self._s
        rec = slot.record
        if rec.dedup_key is not None and s.dedup.get(rec.dedup_key) == rec.id:
            del s.dedup[rec.dedup_key]
        s.terminate.discard(rec.id)
        slot.done_at = now
        if rec.result_ttl is not None and not math.isinf(rec.result_ttl):
            heapq.heappush(s.expiry, (now + rec.result_ttl, slot.seq, rec.id))

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        with self._s.cond:
            slot = self._current(lease)
            if slot is None:
                return False
            slot.record = replace(slot.record, progress=(done, total))
            return True

    def requeue_expired(self) -> int:
        s = self._s
        handled = 0
        with s.cond:
            now, wall = s.clock.now(), s.clock.wall()
            for task_id in list(s.running):
                slot = s.tasks[task_id]
                rec = slot.record
                if rec.lease_expires is None or rec.lease_expires > now:
                    continue
                s.running.discard(task_id)
                handled += 1
                state = expired_state(rec)
                slot.record = replace(
                    rec, state=state, lost=rec.lost + 1, error=lease_lost_error(rec),
                    lease_expires=None, worker=None if state == "queued" else rec.worker,
                    ready_at=now, finished=None if state == "queued" else wall,
                )  # fmt: skip
                if state == "queued":
                    self._enqueue(slot, now)
                else:
                    self._settle(slot, now)
            if handled:
                s.cond.notify_all()
        return handled

    def promote_due(self) -> int:
        s = self._s
        with s.cond:
            moved = self._promote(s.clock.now())
            if moved:
                s.cond.notify_all()
            return moved

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        s = self._s
        with s.cond:
            slot = s.tasks.get(task_id)
            if slot is None:
                return None
            rec = slot.record
            if rec.state in CANCEL_AT_ONCE_STATES:
                slot.record = replace(rec, state="cancelled", finished=s.clock.wall())
                self._settle(slot, s.clock.now())
                s.cond.notify_all()
            elif rec.state == "running":
                slot.record = replace(rec, cancel_requested=True)
                if terminate:
                    s.terminate.add(task_id)
            return slot.record.state

    def get(self, task_id: str) -> TaskRecord | None:
        with self._s.cond:
            slot = self._s.tasks.get(task_id)
            return slot.record if slot else None

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord | None]:
        tasks = self._s.tasks
        with self._s.cond:
            return [slot.record if (slot := tasks.get(i)) else None for i in task_ids]

    def state(self, task_id: str) -> TaskState | None:
        with self._s.cond:
            slot = self._s.tasks.get(task_id)
            return slot.record.state if slot else None

    def list(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[TaskRecord]:
        check_list_filters(state, limit)
        with self._s.cond:
            start = self._seq_of(after) if after is not None else 0
            out: list[TaskRecord] = []
            for slot in self._s.tasks.values():
                rec = slot.record
                if len(out) >= limit:
                    break
                if slot.seq <= start or (state is not None and rec.state != state):
                    continue
                if (queue is None or rec.queue == queue) and (name is None or rec.name == name):
                    out.append(replace(rec, payload=b"", result=None))
            return out

    def _seq_of(self, after: str) -> int:
        mark = self._s.tasks.get(after)
        if mark is None:
            raise unknown_cursor(after)
        return mark.seq

    def retry(self, task_id: str) -> TaskState | None:
        s = self._s
        with s.cond:
            slot = s.tasks.get(task_id)
            if slot is None:
                return None
            rec = slot.record
            if rec.state not in RETRYABLE_STATES:
                return rec.state
            key = rec.dedup_key
            if key is not None and key in s.dedup:
                key = None  # a live task holds the key now: this one runs without it
            slot.record = replace(
                rec, state="queued", attempts=0, lost=0, ready_at=s.clock.now(), worker=None,
                lease_expires=None, result=None, progress=None, cancel_requested=False,
                started=None, finished=None, dedup_key=key,
            )  # fmt: skip
            slot.done_at = None
            if key is not None:
                s.dedup[key] = task_id
            self._make_ready(slot)
            s.cond.notify_all()
            return "queued"

    def purge(self, queue: str, states: Collection[str]) -> int:
        wanted = check_purge_states(states)
        s = self._s
        with s.cond:
            doomed = [
                slot.record
                for slot in s.tasks.values()
                if slot.record.queue == queue and slot.record.state in wanted
            ]
            for rec in doomed:
                self._delete(rec)
            if doomed:
                s.cond.notify_all()
            return len(doomed)

    def _delete(self, rec: TaskRecord) -> None:
        # Heap entries of a deleted task are dropped lazily when they reach the top.
        s = self._s
        del s.tasks[rec.id]
        if rec.dedup_key is not None and s.dedup.get(rec.dedup_key) == rec.id:
            del s.dedup[rec.dedup_key]
        s.terminate.discard(rec.id)
        s.accepted.pop(rec.id, None)

    def reap(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished tasks past their ``result_ttl`` (lease
        clock, from the moment they finished); ConfigError for a limit below 1."""
        check_limit(limit)
        s = self._s
        deleted = 0
        with s.cond:
            now = s.clock.now()
            while deleted < limit and s.expiry and s.expiry[0][0] <= now:
                _, seq, task_id = heapq.heappop(s.expiry)
                slot = s.tasks.get(task_id)
                # An entry is stale if its task was deleted, retried, or finished again later.
                if slot is None or slot.seq != seq or slot.record.state not in FINAL_STATES:
                    continue
                ttl, done_at = slot.record.result_ttl, slot.done_at
                if ttl is not None and done_at is not None and done_at + ttl <= now:
                    self._delete(slot.record)
                    deleted += 1
        return deleted

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        with self._s.cond:
            for slot in self._s.tasks.values():
                by_state = counts.setdefault(slot.record.queue, {})
                by_state[slot.record.state] = by_state.get(slot.record.state, 0) + 1
            return QueueStats(counts, self._s.stale_finishes)

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        """As the contract says: returns once a task of ``names`` (any name when
        None) is claimable in ``queues``, or after ``timeout``."""
        s = self._s

        def ready(now: float) -> float | None:
            self._promote(now)
            for queue in queues:
                by_name = s.ready.get(queue, {})
                wanted = by_name.keys() if names is None else names
                if any(by_name.get(name) for name in wanted):
                    return None
            return s.delayed[0][0] if s.delayed else math.inf

        with s.cond:
            s.wait_for(ready, timeout)

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        s = self._s

        def ready(now: float) -> float | None:
            for task_id in task_ids:
                slot = s.tasks.get(task_id)
                if slot is None or slot.record.state not in LIVE_STATES:
                    return None
            return math.inf

        with s.cond:
            s.wait_for(ready, timeout)
