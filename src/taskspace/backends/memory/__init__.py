"""In-process backend: the deterministic test double, shipped with the package.

Every operation runs under one lock, so each is atomic. Time comes from an
injectable clock: pass a :class:`ManualClock` to test lease expiry, ETA and
TTLs without sleeping. Nothing survives the process; ``memory://`` gives a
fresh store per Space, ``memory://name`` a store shared by name within the
process.
"""

from __future__ import annotations

import threading
from typing import Self

from taskspace.backends.base import FINAL_STATES
from taskspace.backends.memory.other import MemoryOther, MemorySubscription
from taskspace.backends.memory.queue import MemoryQueue
from taskspace.backends.memory.state import ManualClock, MonotonicClock


class MemoryStore(MemoryQueue, MemoryOther):
    """All five store protocols in one process, under one lock."""

    # Transitional: callers use ``store.queue`` and ``store.clock`` (contract v2)
    # while the per-protocol objects are being built.
    @property
    def queue(self) -> Self:
        return self

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()

    def reap(self, limit: int = 1000) -> int:
        with self._cond:
            now = self.now()
            deleted = self._reap_tasks(now, limit)
            return deleted + self._reap_kv(now, limit - deleted)


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


__all__ = [
    "FINAL_STATES",
    "ManualClock",
    "MemoryStore",
    "MemorySubscription",
    "MonotonicClock",
    "open_memory",
]
