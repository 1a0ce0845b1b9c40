"""Fixtures of the fault-injection suite: a backend URL, a Space on it, a fleet
of real worker processes and a directory for the tasks' attempt markers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from tests.faults.app import make_space
from tests.faults.harness import FAULT_BACKENDS, FIGURES, Fleet, fault_backend
from tests.services import RedisServer


@pytest.fixture(params=FAULT_BACKENDS)
def fault_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A private URL per test: SQLite in the test's directory, or a Redis of its own."""
    with fault_backend(str(request.param), tmp_path) as url:
        yield url


@pytest.fixture
def fault_space(fault_url: str) -> Iterator[Space]:
    """The test app's Space on the fault backend, as the test process sees it."""
    space = make_space(fault_url)
    space.stats()  # open (and, for SQLite, create) the store before any worker starts
    yield space
    space.close()


@pytest.fixture
def fleet(fault_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """Worker processes of the test; every one is killed and reaped at teardown."""
    workers = Fleet(fault_url, tmp_path)
    yield workers
    workers.close()
    print(workers.logs())  # shown by pytest only when the test failed


# -- a Redis of the test's own, for tests that stop and restart it ---------------------


@pytest.fixture
def appendfsync() -> str | None:
    """No AOF unless a test parametrizes this (``everysec`` or ``always``)."""
    return None


@pytest.fixture
def redis_server(appendfsync: str | None) -> Iterator[RedisServer]:
    server = RedisServer(appendfsync=appendfsync).start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.namespaced_url()


@pytest.fixture
def redis_space(redis_url: str) -> Iterator[Space]:
    space = make_space(redis_url)
    yield space
    space.close()


@pytest.fixture
def redis_fleet(redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    workers = Fleet(redis_url, tmp_path)
    yield workers
    workers.close()
    print(workers.logs())  # shown by pytest only when the test failed


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """Where tasks leave their attempt markers."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
