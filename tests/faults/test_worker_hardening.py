"""Worker hardening under real faults: Redis stopped mid-finish, shutdown while Redis
is down, SIGSTOP past the lease (a lost lease is not a cancel; a re-claimed task is
renewed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.errors import BackendError
from tests.faults.app import make_space
from tests.faults.harness import FIGURES, Fleet, WorkerProc, markers_of, pause, resume, wait_for
from tests.services import RedisServer

pytestmark = pytest.mark.fault

SIGSTOP_RUNS = 8
PAUSE_S = 1.5


@pytest.fixture
def appendfsync() -> str:
    """Redis keeps its data across the stops and restarts of these tests."""
    return "always"


def exit_within(worker: WorkerProc, timeout: float) -> tuple[int | None, float]:
    """The worker's exit code (None if it did not exit in ``timeout``) and the time it took."""
    began = time.monotonic()
    try:
        code: int | None = worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - began


# -- item 3: Redis stopped mid-finish ------------------------------------------------------


@pytest.mark.timeout(60)
def test_redis_stopped_mid_finish_the_outcome_lands_after_the_restart(
    redis_server: RedisServer, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    """The task has ended and its finish is on its way (slowed to 1 s) when Redis stops.
    The worker keeps the outcome, retries it with backoff, and records it once Redis is
    back: the task succeeds on its first attempt. The outage is one WARNING, its end
    one INFO."""
    worker = redis_fleet.start(slow_finish=1.0)
    redis_fleet.wait_ready(worker, redis_space)
    handle = redis_space.get_task("faults.long_lease").submit(str(marks), 0.0, 0.0)
    wait_for(lambda: markers_of(marks, handle.id, "end"), 20, "the task to end")
    redis_server.stop()  # the finish is still sleeping in slow_finish: it will hit the outage
    wait_for(lambda: "backend unreachable" in worker.log(), 10, "the worker to see the outage")
    redis_server.restart()

    value = handle.result(timeout=20)
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0)
    assert value["pid"] == worker.pid
    assert worker.alive()
    wait_for(lambda: "reconnected after" in worker.log(), 10, "the worker to log its recovery")
    assert worker.terminate() == 0
    log = worker.log()
    assert log.count("backend unreachable") == 1, log
    assert " ERROR " not in log, log


# -- item 11: the grace is a promise, even with Redis down --------------------------------


@pytest.mark.timeout(60)
def test_sigterm_with_redis_down_exits_within_the_grace_and_counts_what_it_abandoned(
    redis_server: RedisServer, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    """Fails on the old worker: its finisher retried forever and shutdown waited for it,
    so with Redis down it was still running 20 s after a SIGTERM with a 2 s grace."""
    grace = 2.0
    worker = redis_fleet.start(grace=grace)
    redis_fleet.wait_ready(worker, redis_space)
    handle = redis_space.get_task("faults.cooperative").submit(str(marks), 60.0, 0.05)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    redis_server.stop()
    wait_for(lambda: "backend unreachable" in worker.log(), 10, "the worker to see the outage")
    worker.send(signal.SIGTERM)

    code, took = exit_within(worker, grace + 8.0)
    figure = f"worker exit with Redis down: grace={grace}s exited_after={took:.1f}s code={code}"
    print(figure)
    FIGURES.append(figure)
    assert code == 0, f"worker still running {took:.1f} s after SIGTERM with a {grace} s grace"
    assert took < grace + 2.0, f"worker took {took:.1f} s to exit with a {grace} s grace"
    assert "1 outcome(s) not recorded" in worker.log()
    redis_server.restart()
    record = handle.info()  # left to lease expiry: it runs again, nothing is lost
    assert record.state in ("running", "queued"), record.state


@pytest.mark.timeout(60)
def test_second_signal_with_redis_down_cuts_the_grace_and_says_so(
    redis_server: RedisServer, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    worker = redis_fleet.start(grace=30.0)
    redis_fleet.wait_ready(worker, redis_space)
    handle = redis_space.get_task("faults.cooperative").submit(str(marks), 60.0, 0.05)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    redis_server.stop()
    worker.send(signal.SIGTERM)
    wait_for(lambda: "got signal 15" in worker.log(), 10, "the worker to log the SIGTERM")
    worker.send(signal.SIGINT)

    code, took = exit_within(worker, 10.0)
    assert code == 0, f"worker still running {took:.1f} s after a second signal"
    assert took < 3.0, f"worker took {took:.1f} s to exit after a second signal"
    assert "cutting the shutdown grace" in worker.log()


# -- item 6: a lost lease never ends a task cancelled -------------------------------------


@pytest.mark.timeout(90)
def test_sigstop_past_the_lease_never_ends_a_task_cancelled(
    fault_url: str, fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """A worker is SIGSTOPped for 1.5 s (lease 1 s) while its task checks the cancel
    flag in a tight loop; no cancel is ever asked. Repeated SIGSTOP_RUNS times.

    Fails on the old worker: the lost lease set the cancel flag, the task raised
    TaskCancelled and the worker finished it ``cancelled`` when renewal reported the
    lease lost before anyone requeued the task (3 of 12 runs on Redis, 1 of 10 on
    SQLite)."""
    worker = fleet.start(concurrency=2)
    fleet.wait_ready(worker, fault_space)
    ended: dict[str, int] = {}
    for _ in range(SIGSTOP_RUNS):
        handle = fault_space.get_task("faults.spin").submit(str(marks), 60.0, 0.05)
        wait_for(lambda h=handle: markers_of(marks, h.id, "start"), 20, "the task to start")
        pause(worker, fault_url)
        time.sleep(PAUSE_S)  # the fault itself: stopped for longer than the lease
        resume(worker)
        wait_for(handle.done, 20, "the task to end")
        state = handle.status()
        ended[state] = ended.get(state, 0) + 1
    figure = f"sigstop {PAUSE_S}s past a 1s lease [{fault_url.split(':')[0]}]: {ended}"
    print(figure)
    FIGURES.append(figure)
    assert ended.get("cancelled", 0) == 0, ended
    assert ended == {"succeeded": SIGSTOP_RUNS}, ended
    assert worker.terminate() == 0


# -- item 8: a task re-claimed by the same worker is renewed -------------------------------


@pytest.mark.timeout(60)
def test_a_task_reclaimed_after_a_sigstop_by_the_same_worker_succeeds(
    fault_url: str, fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """One worker, lease 1 s, a 3 s task, max_attempts=3, one 2 s SIGSTOP.

    Fails on the old worker: it re-claimed the task while the paused attempt still
    ran; attempts were keyed by task id, so the old attempt's end removed the new one,
    which was never renewed, and the task cascaded to ``dead``."""
    worker = fleet.start(concurrency=2)
    fleet.wait_ready(worker, fault_space)
    task = fault_space.get_task("faults.work")
    assert (task.opts.lease, task.opts.max_attempts) == (1.0, 3)
    handle = task.submit(str(marks), 3.0, 3.0)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    pause(worker, fault_url)
    time.sleep(2.0)
    resume(worker)

    try:
        value = handle.result(timeout=20)
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the record below
        value = exc
    record = handle.info()
    assert record.state == "succeeded", f"ended {record.state}: {record.error}"
    assert (record.attempts, record.lost) == (2, 1)
    assert isinstance(value, dict) and value["attempt"] == 2
    assert worker.terminate() == 0


# -- item 10: a full disk is ridden out like an outage ----------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(60)
def test_sqlite_workers_ride_out_a_full_disk_and_resume_when_space_returns(
    small_disk: Path, tmp_path: Path, marks: Path
) -> None:
    """Fails on the old worker: SQLITE_FULL escaped as sqlite3.OperationalError, the
    worker exited with code 1 and its tasks stayed queued or running."""
    url = f"sqlite:///{small_disk}/space.db"
    with make_space(url) as space:
        handles = space.get_task("faults.work").submit_many(
            [(str(marks), 0.0, 0.0) for _ in range(200)]
        )
    filler = fill(small_disk)
    fleet = Fleet(url, tmp_path)
    try:
        workers = [fleet.start(concurrency=4) for _ in range(2)]
        for worker in workers:
            wait_for(lambda w=worker: "backend unreachable" in w.log(), 20, "the full disk")
        time.sleep(1.0)  # ride it out for a while
        assert all(w.alive() for w in workers), fleet.logs()
        filler.unlink()
        with make_space(url) as space:
            wait_for(
                lambda: space.stats().total("succeeded") == len(handles),
                30,
                "every task to succeed once space returned",
            )
            assert space.stats().total("failed") == 0
        for worker in workers:
            assert "reconnected after" in worker.log()
            assert worker.terminate() == 0
    finally:
        fleet.close()
        print(fleet.logs())
