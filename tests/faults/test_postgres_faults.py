"""Faults of PostgreSQL itself, under real worker processes on a private cluster.

- The server restarts (``pg_ctl stop -m fast``: every client is disconnected,
  then a few seconds down) while two workers drain a steady stream of tasks:
  the same worker processes reconnect by themselves and nothing is lost.
- The server crashes (SIGKILL of the postmaster and every backend) and comes
  back after crash recovery: the same, and fencing tokens never go backwards.
- ``pg_terminate_backend`` of every taskspace connection, twice, under load.

The test process is a client too: while the server is away its calls raise
BackendError and its submitter pushes again with the same task ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.backends.postgres import PostgresStore
from tests.faults.app import make_space
from tests.faults.harness import FIGURES, Fleet, wait_for
from tests.faults.test_redis_faults import (
    Submitter,
    all_final,
    audit,
    start_workers,
    succeeded,
    through_outage,
)
from tests.services import PgCluster

pytestmark = pytest.mark.fault

TASKS = 2000
OUTAGE_S = 3.0
DEADLINE_S = 60.0


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    server = PgCluster().start()
    yield server
    server.close()


@pytest.fixture
def pg_url(cluster: PgCluster) -> str:
    return cluster.url(connect_timeout="2", statement_timeout="5")


@pytest.fixture
def pg_space(pg_url: str) -> Iterator[Space]:
    space = make_space(pg_url)
    space.stats()  # create the schema before any worker starts
    yield space
    space.close()


@pytest.fixture
def pg_fleet(pg_url: str, tmp_path: Path) -> Iterator[Fleet]:
    workers = Fleet(pg_url, tmp_path)
    yield workers
    workers.close()
    print(workers.logs())  # shown by pytest only when the test failed


@pytest.fixture
def submitter(pg_space: Space, marks: Path) -> Iterator[Submitter]:
    thread = Submitter(pg_space, marks, TASKS)
    yield thread
    thread.halt()


def tokens_issued(space: Space) -> int:
    """The fencing-token SEQUENCE's last value (white box)."""
    store = space.store
    assert isinstance(store, PostgresStore)
    return int(store.conn.read("SELECT last_value FROM tokens")[0][0])


def finish_run(
    label: str, space: Space, fleet: Fleet, submitter: Submitter, marks: Path, faults: int
) -> None:
    """Wait for every task to end; assert 0 lost, 0 violations, the same workers."""
    started = time.monotonic()
    wait_for(submitter.done, DEADLINE_S, "every task to be submitted")
    through_outage(lambda: all_final(space), DEADLINE_S, "every task to end")
    assert all(w.alive() for w in fleet.workers), "a worker died"
    assert len(fleet.workers) == 2  # no replacement was ever started
    records, violations = audit(space, submitter.handles, marks)
    lost = TASKS - sum(r.state == "succeeded" for r in records)
    FIGURES.append(
        f"postgres {label}: tasks={TASKS} faults={faults} lost={lost}"
        f" violations={len(violations)} ambiguous_pushes={submitter.ambiguous}"
        f" drain_after_fault={time.monotonic() - started:.1f}s"
    )
    assert violations == []
    assert lost == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["restart", "crash"])
def test_server_restart_under_load_workers_reconnect_nothing_lost(
    how: str,
    cluster: PgCluster,
    pg_space: Space,
    pg_fleet: Fleet,
    submitter: Submitter,
    marks: Path,
) -> None:
    space = pg_space
    start_workers(pg_fleet, space)
    submitter.start()
    wait_for(lambda: succeeded(space) >= TASKS // 4, 30, "a quarter of the tasks to succeed")
    before = tokens_issued(space)
    if how == "restart":
        cluster.stop("fast")
    else:
        cluster.kill()
    time.sleep(OUTAGE_S)
    cluster.restart()
    finish_run(how, space, pg_fleet, submitter, marks, faults=1)
    assert tokens_issued(space) > before  # the token SEQUENCE never went back


@pytest.mark.timeout(90)
def test_terminate_backend_of_every_connection_under_load_nothing_lost(
    cluster: PgCluster,
    pg_space: Space,
    pg_fleet: Fleet,
    submitter: Submitter,
    marks: Path,
) -> None:
    space = pg_space
    start_workers(pg_fleet, space)
    submitter.start()
    terminated = 0
    for fraction in (4, 2):
        wait_for(lambda f=fraction: succeeded(space) >= TASKS // f, 30, "tasks to succeed")
        terminated += cluster.terminate_backends()
    assert terminated >= 4  # both workers' pools and listeners, and this process's
    finish_run("terminate_backend", space, pg_fleet, submitter, marks, faults=2)
