"""State of the in-process backend: clocks, the shared lock, and every table."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from taskspace.backends.base import Clock, Grant, StreamEntry, TaskRecord, Versioned

if TYPE_CHECKING:
    from taskspace.backends.memory.other import MemorySubscription


class MonotonicClock:
    """The host's monotonic clock (lease clock) and wall clock."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for deterministic tests (as
    trio's MockClock). ``wall()`` moves with it from the wall time at creation."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._start = start
        self._wall0 = time.time()
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wall(self) -> float:
        with self._lock:
            return self._wall0 + (self._now - self._start)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards: advance({seconds})")
        with self._lock:
            self._now += seconds


@dataclass(slots=True)
class Slot:
    """A task and its submission sequence number (FIFO order, stale heap entries)."""

    record: TaskRecord
    seq: int


# (-priority, seq, task id): the best task of a heap is its smallest entry.
ReadyHeap = list[tuple[int, int, str]]


class MemoryState:
    """Every table of a memory store, guarded by one condition variable.

    Heaps hold entries lazily: an entry whose task has left the state it was
    queued for is skipped (and dropped) when it reaches the top.
    """

    def __init__(self, clock: Clock | None = None, url: str = "memory://") -> None:
        self.url = url
        self.clock: Clock = clock or MonotonicClock()
        self._cond = threading.Condition(threading.Lock())
        self._tasks: dict[str, Slot] = {}  # insertion order is submission order
        self._ready: dict[str, dict[str, ReadyHeap]] = {}  # queue -> task name -> heap
        self._delayed: list[tuple[float, int, str]] = []
        self._running: set[str] = set()
        self._terminate: set[str] = set()
        self._expiry: list[tuple[float, int, str]] = []  # finished + result_ttl
        self._dedup: dict[str, str] = {}
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._stale_finishes = 0
        self._kv: dict[str, Versioned] = {}
        self._kv_expiry: list[tuple[float, str, int]] = []
        self._kv_versions = itertools.count(1)
        self._lease_grants: dict[str, dict[str, Grant]] = {}
        self._lease_tokens: dict[str, int] = {}
        self._streams: dict[str, list[StreamEntry]] = {}
        self._stream_ids: dict[str, int] = {}
        self._subs: list[MemorySubscription] = []

    def now(self) -> float:
        return self.clock.now()
