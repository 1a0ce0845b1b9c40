"""State of the in-process backend: clocks, the shared lock, and every table.

One :class:`MemoryState` is one space. Every protocol object of a store
(queue, leases, kv, streams, pubsub) holds the same state and takes its one
condition variable for each operation, so every operation is atomic with
respect to every other, across protocols. Blocking calls wait on that
condition: every write notifies it, and so does ``ManualClock.advance``.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import (
    REQUEST_ID_TTL_S,
    Change,
    Clock,
    Grant,
    StreamEntry,
    TaskRecord,
    Versioned,
    next_token,
)

# At most this many request ids are remembered (the oldest go first), so a
# flood of requests within REQUEST_ID_TTL_S cannot grow the table unbounded.
REQUESTS_MAX = 100_000

if TYPE_CHECKING:
    from taskspace.backends.memory.pubsub import MemorySubscription


class MonotonicClock:
    """The host's monotonic clock (lease clock) and wall clock."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for deterministic tests (as
    trio's MockClock). ``wall()`` moves with it from the wall time at creation.
    ``advance`` wakes every blocked call of the memory stores using it, so a
    wait that ends on an expiry re-checks at once."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._start = start
        self._wall0 = time.time()
        self._lock = threading.Lock()
        self._listeners: list[weakref.WeakMethod[Callable[[], None]]] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def wall(self) -> float:
        with self._lock:
            return self._wall0 + (self._now - self._start)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards); wakes waiters."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards: advance({seconds})")
        with self._lock:
            self._now += seconds
            refs = list(self._listeners)
        for ref in refs:
            callback = ref()
            if callback is not None:
                callback()

    def on_advance(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (a bound method, held weakly) after every ``advance``."""
        with self._lock:
            self._listeners = [r for r in self._listeners if r() is not None]
            self._listeners.append(weakref.WeakMethod(callback))


@dataclass(slots=True)
class Slot:
    """A task, its submission sequence number (FIFO order, stale heap entries)
    and the lease-clock time it last reached a final state (for ``result_ttl``)."""

    record: TaskRecord
    seq: int
    done_at: float | None = None


# (-priority, seq, task id): the best task of a heap is its smallest entry.
ReadyHeap = list[tuple[int, int, str]]

# What ``wait_for`` asks of a predicate: None when the wait is over, else the
# lease-clock time at which to re-check even if nothing notifies (inf: none).
Ready = Callable[[float], float | None]


class MemoryState:
    """Every table of one memory space, guarded by one condition variable.

    Heaps hold entries lazily: an entry whose task (or key) has left the state
    it was pushed for is skipped (and dropped) when it reaches the top.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or MonotonicClock()
        self.cond = threading.Condition(threading.Lock())
        self.space_id = uuid.uuid4().hex
        self.last_token = 0
        # (kind, request id) -> (lease-clock expiry, first result); insertion
        # order is expiry order, since every entry lives REQUEST_ID_TTL_S.
        self.requests: dict[tuple[str, str], tuple[float, Any]] = {}
        # Queue
        self.tasks: dict[str, Slot] = {}  # insertion order is submission order
        self.ready: dict[str, dict[str, ReadyHeap]] = {}  # queue -> task name -> heap
        self.delayed: list[tuple[float, int, str]] = []
        self.running: set[str] = set()
        self.terminate: set[str] = set()
        self.expiry: list[tuple[float, int, str]] = []  # lease-clock time a result may go
        self.dedup: dict[str, str] = {}
        self.accepted: dict[str, int] = {}  # task id -> token of its last accepted finish
        self.seq = itertools.count(1)
        self.stale_finishes = 0
        # Leases
        self.grants: dict[str, dict[str, Grant]] = {}  # name -> grant id -> grant
        self.capacity: dict[str, int] = {}  # name -> capacity, while it has live grants
        self.grant_names: dict[str, str] = {}  # grant id -> its name, while it is stored
        # KV
        self.kv: dict[str, Versioned] = {}
        self.kv_keys: list[str] = []  # sorted
        self.kv_expiry: list[tuple[float, str, int]] = []  # (expires, key, version)
        self.revision = 0
        self.changes: list[Change] = []
        self.compacted = 0  # newest revision dropped from ``changes``
        # Streams
        self.streams: dict[str, list[StreamEntry]] = {}
        self.stream_last: dict[str, int] = {}
        # PubSub
        self.subs: list[MemorySubscription] = []
        if isinstance(self.clock, ManualClock):
            self.clock.on_advance(self.wake)

    def next_token(self) -> int:
        """The space's next fencing token (tasks and lease grants alike); hold ``cond``."""
        self.last_token = next_token(self.last_token, self.clock.wall())
        return self.last_token

    def wake(self) -> None:
        """Wake every blocked call so it re-checks (the clock moved)."""
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, ready: Ready, timeout: float) -> None:
        """Block (holding ``cond``) until ``ready(now)`` returns None or
        ``timeout`` real seconds pass; ``ready`` returns the lease-clock time to
        re-check by when nothing else wakes the wait."""
        end = time.monotonic() + max(timeout, 0.0)
        while True:
            now = self.clock.now()
            recheck = ready(now)
            if recheck is None:
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            if not math.isinf(recheck):
                remaining = min(remaining, max(recheck - now, 0.001))
            self.cond.wait(remaining)

    def recall(self, kind: str, request_id: str | None, now: float) -> tuple[bool, Any]:
        """(True, first result) if ``request_id`` was answered already; hold ``cond``."""
        while self.requests:
            key = next(iter(self.requests))
            if self.requests[key][0] > now:
                break
            del self.requests[key]
        if request_id is None or (kind, request_id) not in self.requests:
            return False, None
        return True, self.requests[(kind, request_id)][1]

    def remember(self, kind: str, request_id: str | None, now: float, result: Any) -> None:
        """Keep ``result`` as the answer to ``request_id`` for REQUEST_ID_TTL_S."""
        if request_id is not None:
            self.requests[(kind, request_id)] = (now + REQUEST_ID_TTL_S, result)
            if len(self.requests) > REQUESTS_MAX:
                del self.requests[next(iter(self.requests))]

    def live_grants(self, name: str, now: float) -> dict[str, Grant]:
        """The unexpired grants of ``name`` (pruning expired ones; forgetting
        the name and its capacity once none is left); hold ``cond``."""
        grants = self.grants.get(name)
        if grants is None:
            return {}
        for grant_id in [i for i, g in grants.items() if g.expires <= now]:
            del grants[grant_id]
            self.grant_names.pop(grant_id, None)
        if not grants:
            del self.grants[name]
            self.capacity.pop(name, None)
            return {}
        return grants

    def grant_current(self, grant: Grant, now: float) -> Grant | None:
        """The stored grant if ``grant`` is still current (same id and token,
        unexpired), else None; hold ``cond``."""
        current = self.live_grants(grant.name, now).get(grant.id)
        if current is None or current.token != grant.token:
            return None
        return current
