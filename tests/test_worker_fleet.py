"""Mixed fleets: two apps with different tasks share one space; each worker claims
only the task names its own Space registered, and says which in its heartbeat."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space, Worker, WorkerConfig, current_task
from tests.conftest import backend_url


@pytest.fixture
def shared_url(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return f"memory://fleet-{uuid.uuid4().hex[:8]}"  # shared by name in this process
    return backend_url(backend, tmp_path)


@pytest.fixture
def apps(shared_url: str) -> Iterator[tuple[Space, Space]]:
    alpha, beta = Space(shared_url), Space(shared_url)

    @alpha.task(name="alpha.job")
    def alpha_job(i: int) -> str:
        return f"alpha:{current_task().worker}:{i}"

    @beta.task(name="beta.job")
    def beta_job(i: int) -> str:
        return f"beta:{current_task().worker}:{i}"

    yield alpha, beta
    alpha.close()
    beta.close()


def start(space: Space, name: str, **options: object) -> tuple[Worker, threading.Thread]:
    config = WorkerConfig(
        name=name,
        concurrency=2,
        idle_wait=0.05,
        heartbeat_interval=0.2,
        install_signal_handlers=False,
        **options,  # type: ignore[arg-type]
    )
    worker = Worker(space, config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    return worker, thread


def test_each_worker_runs_only_its_own_tasks(apps: tuple[Space, Space]) -> None:
    """Fails on the old worker: each claimed every task and failed the other app's
    with UnknownTask."""
    alpha, beta = apps
    a_handles = alpha.get_task("alpha.job").submit_many([(i,) for i in range(10)])
    b_handles = beta.get_task("beta.job").submit_many([(i,) for i in range(10)])
    workers = [start(alpha, "worker-alpha"), start(beta, "worker-beta")]
    try:
        assert [h.result(timeout=10) for h in a_handles] == [
            f"alpha:worker-alpha:{i}" for i in range(10)
        ]
        assert [h.result(timeout=10) for h in b_handles] == [
            f"beta:worker-beta:{i}" for i in range(10)
        ]
        beats = {w["name"]: w["tasks"] for w in alpha.workers()}
        assert beats == {"worker-alpha": ["alpha.job"], "worker-beta": ["beta.job"]}
    finally:
        for worker, thread in workers:
            worker.stop(grace=1.0)
            thread.join(10)
    assert [w.report.failed for w, _ in workers] == [0, 0]
    assert [w.report.succeeded for w, _ in workers] == [10, 10]


def test_a_task_no_worker_knows_stays_queued_and_burst_ends(apps: tuple[Space, Space]) -> None:
    alpha, beta = apps
    theirs = beta.get_task("beta.job").submit(1)
    mine = alpha.get_task("alpha.job").submit(2)
    report = alpha.run_worker(burst=True, install_signal_handlers=False, idle_wait=0.05)
    assert mine.result(timeout=0) == f"alpha:{report.name}:2"
    assert theirs.status() == "queued"
    assert (report.succeeded, report.failed) == (1, 0)
