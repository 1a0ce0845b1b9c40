"""Fixtures of the conformance suite: stores whose time can be moved, and two
clients of one store.

Every fixture here is parametrized over ``BACKENDS`` through the ``backend``
fixture of ``tests/conftest.py``; a new backend joins the suite by being added
there, without any change to the tests.
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
from taskspace.backends.memory import ManualClock, MemoryStore
from tests.conftest import backend_url

# Leases, TTLs and delays used by expiry tests. On the memory backend time is a
# ManualClock and moves only when a test advances it; elsewhere time is real, so
# these stay small to keep the suite fast.
TTL = 0.25
# How far to advance to be safely past TTL (margin for real sleeps).
PAST = TTL + 0.1


@dataclass
class TimedStore:
    """A store and a way to move its clock forward by ``seconds``."""

    store: Store
    advance: Callable[[float], None]
    manual: bool


@pytest.fixture
def timed(backend: str, tmp_path: Path) -> Iterator[TimedStore]:
    """A fresh store whose time a test can advance: a ManualClock on memory,
    a real sleep on every other backend."""
    if backend == "memory":
        clock = ManualClock()
        mem = MemoryStore(clock=clock)
        yield TimedStore(mem, clock.advance, manual=True)
        mem.close()
        return
    s = open_store(backend_url(backend, tmp_path))
    yield TimedStore(s, time.sleep, manual=False)
    s.close()


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
