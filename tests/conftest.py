"""Shared fixtures: every backend the suite can reach, and spaces on them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.backends import open_store
from taskspace.backends.base import Store
from taskspace.backends.memory import ManualClock, MemoryStore
from tests.services import close_shared, close_shared_postgres, postgres_url, shared_redis

# Backends every test parametrized with `backend` runs on (PostgreSQL: the
# machine's server at 127.0.0.1:5432, a database per run; skipped when it is
# not there unless TASKSPACE_REQUIRE_SERVICES=1). TASKSPACE_TEST_BACKENDS (a
# comma list) chooses the backends of a run, e.g.
# `TASKSPACE_TEST_BACKENDS=postgres pytest tests/conformance/test_kv.py`.
DEFAULT_BACKENDS = ["memory", "sqlite", "redis", "postgres"]
KNOWN_BACKENDS = ("memory", "sqlite", "redis", "postgres")


def _chosen_backends() -> list[str]:
    chosen = os.environ.get("TASKSPACE_TEST_BACKENDS", "").strip()
    if not chosen:
        return list(DEFAULT_BACKENDS)
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"TASKSPACE_TEST_BACKENDS names unknown backend(s) {unknown}; known: {KNOWN_BACKENDS}"
        )
    return names


BACKENDS = _chosen_backends()


def backend_url(backend: str, tmp_path: Path) -> str:
    """A fresh, private URL for ``backend``."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/space.db"
    if backend == "redis":
        external = os.environ.get("TASKSPACE_REDIS_URL")
        if external:
            return f"{external}?namespace=t{uuid.uuid4().hex[:12]}"
        return shared_redis().namespaced_url()
    if backend == "postgres":
        return postgres_url()
    raise AssertionError(f"unknown backend {backend}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    close_shared()
    close_shared_postgres()


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
