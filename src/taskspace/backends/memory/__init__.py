"""In-process backend: the deterministic test double, shipped with the package.

A :class:`MemoryStore` is one client of one space (a :class:`MemoryState`):
its protocol objects ``queue``, ``leases``, ``kv``, ``streams``, ``pubsub``
share the space's tables and its one lock, so every operation is atomic with
respect to every other. Time comes from an injectable clock (``clock.now()``
and ``clock.wall()`` alike): pass a :class:`ManualClock` to test lease expiry,
ETA and TTLs without sleeping; its ``advance`` wakes blocked calls. Nothing
survives the process; ``memory://`` gives a fresh space per store,
``memory://name`` a space shared by name within the process (each
``open_memory`` is another client of it, closing only its own subscriptions).
A memory space cannot be wiped from outside, so ``check_space`` never raises.
"""

from __future__ import annotations

import threading

from taskspace.backends.base import FINAL_STATES, Clock
from taskspace.backends.memory.kv import MemoryKV
from taskspace.backends.memory.leases import MemoryLeases
from taskspace.backends.memory.pubsub import MemoryPubSub, MemorySubscription
from taskspace.backends.memory.queue import MemoryQueue
from taskspace.backends.memory.state import ManualClock, MemoryState, MonotonicClock
from taskspace.backends.memory.streams import MemoryStreams
from taskspace.errors import ConfigError


class MemoryStore:
    """One client of an in-process space: one object per protocol, one lock."""

    def __init__(
        self, clock: Clock | None = None, url: str = "memory://", state: MemoryState | None = None
    ) -> None:
        if state is not None and clock is not None and clock is not state.clock:
            raise ConfigError("MemoryStore: pass a clock or a shared state, not both")
        self._state = state if state is not None else MemoryState(clock)
        self.url = url
        self.space_id: str = self._state.space_id
        self.clock: Clock = self._state.clock
        self.queue = MemoryQueue(self._state)
        self.leases = MemoryLeases(self._state)
        self.kv = MemoryKV(self._state)
        self.streams = MemoryStreams(self._state)
        self.pubsub = MemoryPubSub(self._state)

    def check_space(self) -> None:
        """Never raises: nothing outside this process can wipe a memory space."""

    def close(self) -> None:
        """Close the subscriptions made through this store; the space lives on
        (for ``memory://name``, other clients keep using it)."""
        self.pubsub.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NAMED: dict[str, MemoryState] = {}
_NAMED_LOCK = threading.Lock()


def open_memory(name: str, url: str) -> MemoryStore:
    """A fresh space for ``memory://``; for ``memory://name`` a new client of
    the space of that name (created on first use, kept for the process)."""
    if not name:
        return MemoryStore(url=url)
    with _NAMED_LOCK:
        if name not in _NAMED:
            _NAMED[name] = MemoryState()
        return MemoryStore(url=url, state=_NAMED[name])


__all__ = [
    "FINAL_STATES",
    "ManualClock",
    "MemoryKV",
    "MemoryLeases",
    "MemoryPubSub",
    "MemoryQueue",
    "MemoryState",
    "MemoryStore",
    "MemoryStreams",
    "MemorySubscription",
    "MonotonicClock",
    "open_memory",
]
