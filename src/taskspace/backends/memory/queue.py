"""QueueStore of the in-process backend."""

from __future__ import annotations

import heapq
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
)
from taskspace.backends.memory.state import MemoryState, ReadyHeap, Slot
from taskspace.backends.outcomes import (
    check_list_filters,
    check_purge_states,
    expired_state,
    lease_lost_error,
    outcome_state,
    unknown_cursor,
)


class MemoryQueue(MemoryState):
    """Tasks in per-(queue, name) priority heaps, so a claim restricted to some
    names never walks past the queued tasks of other names."""

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        with self._cond:
            now = self.now()
            ids = [self._push_one(spec, now) for spec in specs]
            self._cond.notify_all()
            return ids

    def _push_one(self, spec: TaskSpec, now: float) -> str:
        if spec.dedup_key is not None and spec.dedup_key in self._dedup:
            return self._dedup[spec.dedup_key]
        if spec.id in self._tasks:
            return spec.id
        record = TaskRecord(
            id=spec.id, name=spec.name, payload=spec.payload, codec=spec.codec,
            queue=spec.queue, priority=spec.priority, max_attempts=spec.max_attempts,
            lease_s=spec.lease_s, timeout=spec.timeout, dedup_key=spec.dedup_key,
            state="queued", ready_at=now + spec.delay, created=now, result_ttl=spec.result_ttl,
        )  # fmt: skip
        slot = Slot(record, next(self._seq))
        self._tasks[spec.id] = slot
        if spec.dedup_key is not None:
            self._dedup[spec.dedup_key] = spec.id
        self._enqueue(slot, now)
        return spec.id

    def _enqueue(self, slot: Slot, now: float) -> None:
        rec = slot.record
        if rec.ready_at > now:
            heapq.heappush(self._delayed, (rec.ready_at, slot.seq, rec.id))
        else:
            self._make_ready(slot)

    def _make_ready(self, slot: Slot) -> None:
        heap = self._ready.setdefault(slot.record.queue, {}).setdefault(slot.record.name, [])
        heapq.heappush(heap, (-slot.record.priority, slot.seq, slot.record.id))

    def _queued(self, task_id: str, seq: int) -> Slot | None:
        slot = self._tasks.get(task_id)
        if slot is None or slot.seq != seq or slot.record.state != "queued":
            return None
        return slot

    def _promote(self, now: float) -> int:
        moved = 0
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, task_id = heapq.heappop(self._delayed)
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
    ) -> list[TaskRecord]:
        # request_id needs no handling here: this backend's replies cannot be lost.
        claimed: list[TaskRecord] = []
        with self._cond:
            now = self.now()
            self._promote(now)
            for queue in dict.fromkeys(queues):
                by_name = self._ready.get(queue)
                if not by_name or len(claimed) >= n:
                    continue
                wanted = by_name if names is None else [x for x in names if x in by_name]
                heaps = [by_name[x] for x in wanted]
                while len(claimed) < n and (slot := self._pop_best(heaps)) is not None:
                    claimed.append(self._lease(slot, worker, now))
                for name in [x for x in wanted if not by_name[x]]:
                    del by_name[name]
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

    def _lease(self, slot: Slot, worker: str, now: float) -> TaskRecord:
        rec = slot.record
        slot.record = replace(
            rec, state="running", attempts=rec.attempts + 1, token=next(self._tokens),
            worker=worker, lease_expires=now + rec.lease_s, started=now,
        )  # fmt: skip
        self._running.add(rec.id)
        return slot.record

    def _current(self, lease: Lease) -> Slot | None:
        slot = self._tasks.get(lease.task_id)
        if slot is None or slot.record.state != "running" or slot.record.token != lease.token:
            return None
        return slot

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        out: dict[str, LeaseStatus] = {}
        with self._cond:
            now = self.now()
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
        if rec.id in self._terminate:
            return "terminate_requested"
        return "cancel_requested" if rec.cancel_requested else "held"

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        accepted: list[bool] = []
        with self._cond:
            now = self.now()
            for lease, outcome in items:
                slot = self._current(lease)
                if slot is None:
                    self._stale_finishes += 1
                    accepted.append(False)
                    continue
                self._apply(slot, outcome, now)
                accepted.append(True)
            self._cond.notify_all()
        return accepted

    def _apply(self, slot: Slot, outcome: Outcome, now: float) -> None:
        rec = slot.record
        state = outcome_state(outcome, rec)
        self._running.discard(rec.id)
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
            finished=now,
        )  # fmt: skip
        self._settle(slot)

    def _settle(self, slot: Slot) -> None:
        """Bookkeeping of a task that just reached a final state."""
        rec = slot.record
        if rec.dedup_key is not None and self._dedup.get(rec.dedup_key) == rec.id:
            del self._dedup[rec.dedup_key]
        self._terminate.discard(rec.id)
        if rec.result_ttl is not None and rec.finished is not None:
            heapq.heappush(self._expiry, (rec.finished + rec.result_ttl, slot.seq, rec.id))

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        with self._cond:
            slot = self._current(lease)
            if slot is None:
                return False
            slot.record = replace(slot.record, progress=(done, total))
            return True

    def requeue_expired(self) -> int:
        handled = 0
        with self._cond:
            now = self.now()
            for task_id in list(self._running):
                slot = self._tasks[task_id]
                rec = slot.record
                if rec.lease_expires is None or rec.lease_expires > now:
                    continue
                self._running.discard(task_id)
                handled += 1
                state = expired_state(rec)
                slot.record = replace(
                    rec, state=state, lost=rec.lost + 1, error=lease_lost_error(rec),
                    lease_expires=None, worker=None if state == "queued" else rec.worker,
                    ready_at=now, finished=None if state == "queued" else now,
                )  # fmt: skip
                if state == "queued":
                    self._enqueue(slot, now)
                else:
                    self._settle(slot)
            if handled:
                self._cond.notify_all()
        return handled

    def promote_due(self) -> int:
        with self._cond:
            moved = self._promote(self.now())
            if moved:
                self._cond.notify_all()
            return moved

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        with self._cond:
            slot = self._tasks.get(task_id)
            if slot is None:
                return None
            rec = slot.record
            if rec.state == "queued":
                slot.record = replace(rec, state="cancelled", finished=self.now())
                self._settle(slot)
                self._cond.notify_all()
            elif rec.state == "running":
                slot.record = replace(rec, cancel_requested=True)
                if terminate:
                    self._terminate.add(task_id)
            return slot.record.state

    def get(self, task_id: str) -> TaskRecord | None:
        with self._cond:
            slot = self._tasks.get(task_id)
            return slot.record if slot else None

    def state(self, task_id: str) -> TaskState | None:
        with self._cond:
            slot = self._tasks.get(task_id)
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
        with self._cond:
            start = self._seq_of(after) if after is not None else 0
            out: list[TaskRecord] = []
            for slot in self._tasks.values():
                rec = slot.record
                if len(out) >= limit:
                    break
                if slot.seq <= start or (state is not None and rec.state != state):
                    continue
                if (queue is None or rec.queue == queue) and (name is None or rec.name == name):
                    out.append(replace(rec, payload=b"", result=None))
            return out

    def _seq_of(self, after: str) -> int:
        mark = self._tasks.get(after)
        if mark is None:
            raise unknown_cursor(after)
        return mark.seq

    def retry(self, task_id: str) -> TaskState | None:
        with self._cond:
            slot = self._tasks.get(task_id)
            if slot is None:
                return None
            rec = slot.record
            if rec.state not in ("failed", "dead"):
                return rec.state
            now = self.now()
            key = rec.dedup_key
            if key is not None and key in self._dedup:
                key = None  # a live task holds the key now: this one runs without it
            slot.record = replace(
                rec, state="queued", attempts=0, lost=0, ready_at=now, worker=None,
                lease_expires=None, result=None, progress=None, cancel_requested=False,
                started=None, finished=None, dedup_key=key,
            )  # fmt: skip
            if key is not None:
                self._dedup[key] = task_id
            self._make_ready(slot)
            self._cond.notify_all()
            return "queued"

    def purge(self, queue: str, states: Collection[str]) -> int:
        wanted = check_purge_states(states)
        with self._cond:
            doomed = [
                slot
                for slot in self._tasks.values()
                if slot.record.queue == queue and slot.record.state in wanted
            ]
            for slot in doomed:
                self._delete(slot.record)
            if doomed:
                self._cond.notify_all()
            return len(doomed)

    def _delete(self, rec: TaskRecord) -> None:
        # Heap entries of a deleted task are dropped lazily when they reach the top.
        del self._tasks[rec.id]
        if rec.dedup_key is not None and self._dedup.get(rec.dedup_key) == rec.id:
            del self._dedup[rec.dedup_key]
        self._terminate.discard(rec.id)

    def _reap_tasks(self, now: float, limit: int) -> int:
        deleted = 0
        while deleted < limit and self._expiry and self._expiry[0][0] <= now:
            _, seq, task_id = heapq.heappop(self._expiry)
            slot = self._tasks.get(task_id)
            # An entry is stale if its task was deleted, retried, or finished again later.
            if slot is None or slot.seq != seq or slot.record.state not in FINAL_STATES:
                continue
            rec = slot.record
            if rec.result_ttl is not None and (rec.finished or 0.0) + rec.result_ttl <= now:
                self._delete(rec)
                deleted += 1
        return deleted

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        with self._cond:
            for slot in self._tasks.values():
                by_state = counts.setdefault(slot.record.queue, {})
                by_state[slot.record.state] = by_state.get(slot.record.state, 0) + 1
            return QueueStats(counts, self._stale_finishes)

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        """As the contract says; ``names`` (an extension): only tasks of these names
        count as claimable, so a worker that claims by name does not spin while
        other apps' tasks wait in its queues."""
        with self._cond:
            now = self.now()
            self._promote(now)
            for queue in queues:
                by_name = self._ready.get(queue, {})
                wanted = by_name.keys() if names is None else names
                if any(by_name.get(name) for name in wanted):
                    return
            if self._delayed:  # wake when the next delayed task falls due
                timeout = min(timeout, max(self._delayed[0][0] - now, 0.001))
            self._cond.wait(timeout)

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        with self._cond:
            if all(
                (slot := self._tasks.get(i)) is not None and slot.record.state in LIVE_STATES
                for i in task_ids
            ):
                self._cond.wait(timeout)
