"""Shared fixtures: every backend the suite can reach, and spaces on them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.backends import open_store
from taskspace.backends.base import Store
from taskspace.backends.memory import ManualClock, MemoryStore

REQUIRE_SERVICES = os.environ.get("TASKSPACE_REQUIRE_SERVICES") == "1"

# Backends every test parametrized with `backend` runs on. Redis and PostgreSQL
# join here when their backends land; the tests themselves do not change.
BACKENDS = ["memory", "sqlite"]


def backend_url(backend: str, tmp_path: Path) -> str:
    """A fresh, private URL for ``backend``."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/space.db"
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Iterator[Store]:
    """A fresh store on each backend."""
    s = open_store(backend_url(backend, tmp_path))
    yield s
    s.close()


@pytest.fixture
def space(backend: str, tmp_path: Path) -> Iterator[Space]:
    """A fresh Space on each backend."""
    sp = Space(backend_url(backend, tmp_path))
    yield sp
    sp.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def manual_store(clock: ManualClock) -> MemoryStore:
    """A memory store on a manual clock: expiry without sleeping."""
    return MemoryStore(clock=clock)
