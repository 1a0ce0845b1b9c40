"""In-process backend: the deterministic test double, shipped with the package.

Every operation runs under one lock, so each is atomic. Time comes from an
injectable clock: pass a :class:`ManualClock` to test lease expiry, ETA and
TTLs without sleeping. Nothing survives the process; ``memory://`` gives a
fresh store per Space, ``memory://name`` a store shared by name within the
process.
"""

from __future__ import annotations

import heapq
import itertools
import queue as queue_mod
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from taskspace.backends.base import (
    FINAL_STATES,
    LIVE_STATES,
    Clock,
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


class MonotonicClock:
    """The host's monotonic clock."""

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for deterministic tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards: advance({seconds})")
        with self._lock:
            self._now += seconds


@dataclass(slots=True)
class _Slot:
    record: TaskRecord
    seq: int


class _MemorySubscription(Closeable):
    def __init__(self, owner: MemoryStore, channels: Sequence[str]) -> None:
        self.channels = frozenset(channels)
        self._queue: queue_mod.SimpleQueue[Message] = queue_mod.SimpleQueue()
        self._owner = owner
        self._closed = False

    def deliver(self, message: Message) -> None:
        self._queue.put(message)

    def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue_mod.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._unsubscribe(self)


class MemoryStore:
    """All five store protocols in one process, under one lock."""

    def __init__(self, clock: Clock | None = None, url: str = "memory://") -> None:
        self.url = url
        self.clock: Clock = clock or MonotonicClock()
        self._cond = threading.Condition(threading.Lock())
        self._tasks: dict[str, _Slot] = {}
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._delayed: list[tuple[float, int, str]] = []
        self._running: set[str] = set()
        self._dedup: dict[str, str] = {}
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._stale_finishes = 0
        self._kv: dict[str, Versioned] = {}
        self._kv_versions = itertools.count(1)
        self._lease_grants: dict[str, dict[str, Grant]] = {}
        self._lease_tokens: dict[str, int] = {}
        self._streams: dict[str, list[StreamEntry]] = {}
        self._stream_ids: dict[str, int] = {}
        self._subs: list[_MemorySubscription] = []

    def now(self) -> float:
        return self.clock.now()

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()

    # -- QueueStore ---------------------------------------------------------

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
            state="queued", ready_at=now + spec.delay, created=now,
        )  # fmt: skip
        slot = _Slot(record, next(self._seq))
        self._tasks[spec.id] = slot
        if spec.dedup_key is not None:
            self._dedup[spec.dedup_key] = spec.id
        self._enqueue(slot, now)
        return spec.id

    def _enqueue(self, slot: _Slot, now: float) -> None:
        rec = slot.record
        if rec.ready_at > now:
            heapq.heappush(self._delayed, (rec.ready_at, slot.seq, rec.id))
        else:
            heap = self._ready.setdefault(rec.queue, [])
            heapq.heappush(heap, (-rec.priority, slot.seq, rec.id))

    def _promote(self, now: float) -> int:
        moved = 0
        while self._delayed and self._delayed[0][0] <= now:
            _, _, task_id = heapq.heappop(self._delayed)
            slot = self._tasks.get(task_id)
            if slot is not None and slot.record.state == "queued":
                heap = self._ready.setdefault(slot.record.queue, [])
                heapq.heappush(heap, (-slot.record.priority, slot.seq, task_id))
                moved += 1
        return moved

    def claim(
        self, queues: Sequence[str], worker: str, n: int, request_id: str | None = None
    ) -> list[TaskRecord]:
        # request_id needs no handling here: this backend's replies cannot be lost.
        claimed: list[TaskRecord] = []
        with self._cond:
            now = self.now()
            self._promote(now)
            for name in queues:
                heap = self._ready.get(name)
                while heap and len(claimed) < n:
                    _, _, task_id = heapq.heappop(heap)
                    slot = self._tasks[task_id]
                    if slot.record.state != "queued":
                        continue
                    slot.record = replace(
                        slot.record, state="running", attempts=slot.record.attempts + 1,
                        token=next(self._tokens), worker=worker,
                        lease_expires=now + slot.record.lease_s, started=now,
                    )  # fmt: skip
                    self._running.add(task_id)
                    claimed.append(slot.record)
        return claimed

    def _current(self, lease: Lease) -> _Slot | None:
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
                out[lease.task_id] = "cancel_requested" if slot.record.cancel_requested else "held"
        return out

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

    def _apply(self, slot: _Slot, outcome: Outcome, now: float) -> None:
        rec = slot.record
        state = outcome_state(outcome, rec)
        self._running.discard(rec.id)
        if state == "queued":
            attempts = rec.attempts - 1 if outcome.kind == "release" else rec.attempts
            slot.record = replace(
                rec, state="queued", attempts=attempts, worker=None, lease_expires=None,
                ready_at=now + outcome.delay, error=outcome.error or rec.error,
            )  # fmt: skip
            self._enqueue(slot, now)
            return
        slot.record = replace(
            rec, state=state, result=outcome.result, error=outcome.error or rec.error,
            lease_expires=None, finished=now,
        )  # fmt: skip
        self._settle(slot.record)

    def _settle(self, rec: TaskRecord) -> None:
        if rec.dedup_key is not None and self._dedup.get(rec.dedup_key) == rec.id:
            del self._dedup[rec.dedup_key]

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
                    self._settle(slot.record)
            if handled:
                self._cond.notify_all()
        return handled

    def promote_due(self) -> int:
        with self._cond:
            moved = self._promote(self.now())
            if moved:
                self._cond.notify_all()
            return moved

    def cancel(self, task_id: str) -> TaskState | None:
        with self._cond:
            slot = self._tasks.get(task_id)
            if slot is None:
                return None
            rec = slot.record
            if rec.state == "queued":
                slot.record = replace(rec, state="cancelled", finished=self.now())
                self._settle(slot.record)
                self._cond.notify_all()
            elif rec.state == "running":
                slot.record = replace(rec, cancel_requested=True)
            return slot.record.state

    def get(self, task_id: str) -> TaskRecord | None:
        with self._cond:
            slot = self._tasks.get(task_id)
            return slot.record if slot else None

    def stats(self) -> QueueStats:
        counts: dict[str, dict[str, int]] = {}
        with self._cond:
            for slot in self._tasks.values():
                by_state = counts.setdefault(slot.record.queue, {})
                by_state[slot.record.state] = by_state.get(slot.record.state, 0) + 1
            return QueueStats(counts, self._stale_finishes)

    def wait_for_tasks(self, queues: Sequence[str], timeout: float) -> None:
        with self._cond:
            now = self.now()
            self._promote(now)
            if any(self._ready.get(q) for q in queues):
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

    # -- LeaseStore ---------------------------------------------------------

    def _live_grants(self, name: str, now: float) -> dict[str, Grant]:
        grants = self._lease_grants.setdefault(name, {})
        for holder in [h for h, g in grants.items() if g.expires <= now]:
            del grants[holder]
        return grants

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        with self._cond:
            now = self.now()
            grants = self._live_grants(name, now)
            if holder in grants:
                grants[holder] = replace(grants[holder], expires=now + ttl)
                return grants[holder]
            if len(grants) >= capacity:
                return None
            token = self._lease_tokens.get(name, 0) + 1
            self._lease_tokens[name] = token
            grants[holder] = Grant(name, holder, token, now + ttl)
            return grants[holder]

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        with self._cond:
            now = self.now()
            current = self._live_grants(grant.name, now).get(grant.holder)
            if current is None or current.token != grant.token:
                return None
            renewed = replace(current, expires=now + ttl)
            self._lease_grants[grant.name][grant.holder] = renewed
            return renewed

    def release(self, grant: Grant) -> bool:
        with self._cond:
            grants = self._live_grants(grant.name, self.now())
            current = grants.get(grant.holder)
            if current is None or current.token != grant.token:
                return False
            del grants[grant.holder]
            return True

    def holders(self, name: str) -> list[Grant]:
        with self._cond:
            grants = self._live_grants(name, self.now())
            return sorted(grants.values(), key=lambda g: g.token)

    # -- KVStore ------------------------------------------------------------

    def _kv_live(self, key: str, now: float) -> Versioned | None:
        item = self._kv.get(key)
        if item is not None and item.expires is not None and item.expires <= now:
            del self._kv[key]
            return None
        return item

    def _kv_write(self, key: str, value: bytes, ttl: float | None, now: float) -> int:
        version = next(self._kv_versions)
        self._kv[key] = Versioned(value, version, None if ttl is None else now + ttl)
        return version

    def kv_get(self, key: str) -> Versioned | None:
        with self._cond:
            return self._kv_live(key, self.now())

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        with self._cond:
            return self._kv_write(key, value, ttl, self.now())

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        with self._cond:
            now = self.now()
            item = self._kv_live(key, now)
            current = item.version if item else None
            if current != expected_version:
                return None
            return self._kv_write(key, value, ttl, now)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with self._cond:
            now = self.now()
            item = self._kv_live(key, now)
            base = int(item.value) if item else 0
            result = base + delta
            version = next(self._kv_versions)
            expires = item.expires if item else (None if ttl is None else now + ttl)
            self._kv[key] = Versioned(str(result).encode(), version, expires)
            return result

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        with self._cond:
            item = self._kv_live(key, self.now())
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            del self._kv[key]
            return True

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        with self._cond:
            now = self.now()
            keys = sorted(k for k in self._kv if k.startswith(prefix))
            pairs = [(k, v) for k in keys if (v := self._kv_live(k, now)) is not None]
            return pairs if limit is None else pairs[:limit]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        with self._cond:
            entry_id = self._stream_ids.get(stream, 0) + 1
            self._stream_ids[stream] = entry_id
            entries = self._streams.setdefault(stream, [])
            entries.append(StreamEntry(entry_id, data, self.now()))
            if maxlen is not None and len(entries) > maxlen:
                del entries[: len(entries) - maxlen]
            return entry_id

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        with self._cond:
            entries = self._streams.get(stream, [])
            return [e for e in entries if e.id > after][:limit]

    def trim(self, stream: str, maxlen: int) -> int:
        with self._cond:
            entries = self._streams.get(stream, [])
            drop = max(0, len(entries) - maxlen)
            del entries[:drop]
            return drop

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        with self._cond:
            subs = [s for s in self._subs if channel in s.channels]
        for sub in subs:
            sub.deliver(Message(channel, data))

    def subscribe(self, channels: Sequence[str]) -> _MemorySubscription:
        sub = _MemorySubscription(self, channels)
        with self._cond:
            self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: _MemorySubscription) -> None:
        with self._cond:
            if sub in self._subs:
                self._subs.remove(sub)


_NAMED: dict[str, MemoryStore] = {}
_NAMED_LOCK = threading.Lock()


def open_memory(name: str, url: str) -> MemoryStore:
    """A fresh store for ``memory://``; the same store per name for ``memory://name``."""
    if not name:
        return MemoryStore(url=url)
    with _NAMED_LOCK:
        if name not in _NAMED:
            _NAMED[name] = MemoryStore(url=url)
        return _NAMED[name]


__all__ = ["FINAL_STATES", "ManualClock", "MemoryStore", "MonotonicClock", "open_memory"]
