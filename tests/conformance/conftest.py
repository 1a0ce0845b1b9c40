"""Fixtures of the conformance suite: stores whose time can be moved, two
clients of one store, and the capabilities in which backends legitimately differ.

Every fixture here is parametrized over ``BACKENDS`` through the ``backend``
fixture of ``tests/conftest.py``; a new backend joins the suite by being added
there (and to ``CAPABILITIES``), without any change to the tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskspace.backends import open_store
from taskspace.backends.base import Store
from taskspace.backends.memory import ManualClock
from tests.conftest import backend_url

# Leases, TTLs and delays used by expiry tests. With a ManualClock (memory,
# SQLite) time moves only when a test advances it; on Redis time is the
# server's and real, so these stay small to keep the suite fast.
TTL = 0.25
# How far to advance to be safely past TTL (margin for real sleeps).
PAST = TTL + 0.1
# A lease or TTL no test outlives.
LONG = 60.0


@dataclass(frozen=True)
class Capabilities:
    """Where backends differ by design (as huey's storage tests mark them).

    - ``manual_time``: the store runs on an injected ManualClock, so expiry is
      tested without sleeping (memory, SQLite; Redis uses the server's clock).
    - ``multi_process``: several processes can open one space (not memory).
    - ``lost_replies``: a reply can be lost on the network, so request ids
      must deduplicate retries (Redis; the others may ignore request ids).
    """

    manual_time: bool
    multi_process: bool
    lost_replies: bool


CAPABILITIES = {
    "memory": Capabilities(manual_time=True, multi_process=False, lost_replies=False),
    "sqlite": Capabilities(manual_time=True, multi_process=True, lost_replies=False),
    "redis": Capabilities(manual_time=False, multi_process=True, lost_replies=True),
    "postgres": Capabilities(manual_time=False, multi_process=True, lost_replies=True),
}


@pytest.fixture
def caps(backend: str) -> Capabilities:
    """The capabilities of the backend under test."""
    return CAPABILITIES[backend]


@dataclass
class TimedStore:
    """A store and a way to move its lease clock forward by ``seconds``."""

    store: Store
    advance: Callable[[float], None]
    manual: bool

    def pass_time_until(self, when: float) -> None:
        """Move the store's lease clock just past ``when`` (spin on a real clock)."""
        if self.manual:
            self.advance(max(0.0, when - self.store.clock.now()) + 0.001)
            return
        while self.store.clock.now() <= when:
            time.sleep(0.001)


def manual_url(backend: str, tmp_path: Path) -> str:
    """A fresh private URL for a backend that takes a ManualClock."""
    return backend_url(backend, tmp_path / uuid.uuid4().hex)


def open_timed(backend: str, tmp_path: Path) -> TimedStore:
    """A fresh store on ``backend``: on a ManualClock where the backend takes
    one (deterministic, as trio's MockClock), real time (sleeps) on Redis and PostgreSQL."""
    if CAPABILITIES[backend].manual_time:
        clock = ManualClock()
        s = open_store(manual_url(backend, tmp_path), clock=clock)
        return TimedStore(s, clock.advance, manual=True)
    return TimedStore(open_store(backend_url(backend, tmp_path)), time.sleep, manual=False)


@pytest.fixture
def timed(backend: str, tmp_path: Path) -> Iterator[TimedStore]:
    """A fresh store whose time a test can advance (see :func:`open_timed`)."""
    t = open_timed(backend, tmp_path)
    yield t
    t.store.close()


@pytest.fixture
def peers(backend: str, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two separate clients of one store (for memory: one shared named store)."""
    if backend == "memory":
        url = f"memory://conformance-{uuid.uuid4().hex}"
    else:
        url = backend_url(backend, tmp_path)
    a = open_store(url)
    b = open_store(url)
    yield a, b
    b.close()
    a.close()
