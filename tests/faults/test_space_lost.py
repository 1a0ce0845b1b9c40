"""A space wiped or replaced under running workers: they say so and stop.

FLUSHALL on a private redis-server, or a SQLite file deleted and a new space
created at its path: the tasks the workers held are gone. Each worker must
log one CRITICAL line naming the space and how many tasks it held, and exit
with code 4 within a few seconds, instead of serving the new, empty space.
A Handle of a task of the lost space raises SpaceLost. A stale finish on an
intact space is still just stale (tests/faults/test_worker_loss.py).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.errors import SpaceLost
from taskspace.worker.config import EXIT_SPACE_LOST
from tests.faults.app import make_space
from tests.faults.harness import Fleet, WorkerProc, markers_of, wait_for
from tests.services import RedisServer

pytestmark = pytest.mark.fault

# A worker checks its space at least every heartbeat (2 s through the CLI), and
# whenever renew (every third of the 1 s lease) says a lease is gone.
EXIT_WITHIN_S = 6.0


def flushall(server: RedisServer) -> None:
    """FLUSHALL on ``server``, with a client of the test's own."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        assert sock.recv(64).startswith(b"+OK")


def critical_lines(worker: WorkerProc) -> list[str]:
    return [line for line in worker.log().splitlines() if "wiped or replaced" in line]


def assert_stopped_for_lost_space(worker: WorkerProc, url: str, held: int, since: float) -> None:
    code = worker.wait(timeout=EXIT_WITHIN_S + 10)
    took = time.monotonic() - since
    assert code == EXIT_SPACE_LOST, f"exit code {code}\n{worker.log()[-3000:]}"
    assert took < EXIT_WITHIN_S, f"took {took:.1f} s to stop"
    lines = critical_lines(worker)
    assert len(lines) == 1, lines
    assert "CRITICAL" in lines[0]
    assert f"the space at {url} was wiped or replaced" in lines[0]
    assert f"{held} tasks this worker held are gone" in lines[0]


def start_long_task(space: Space, marks: Path, name: str) -> str:
    handle = space.get_task(name).submit(str(marks), 60.0, 60.0)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    return handle.id


@pytest.mark.timeout(60)
def test_flushall_under_a_running_task_stops_the_worker_with_exit_code_4(
    redis_server: RedisServer, redis_url: str, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    worker = redis_fleet.start()
    task_id = start_long_task(redis_space, marks, "faults.long_lease")
    began = time.monotonic()
    flushall(redis_server)
    assert_stopped_for_lost_space(worker, redis_url, held=1, since=began)
    assert markers_of(marks, task_id, "end") == []  # abandoned, not waited for


@pytest.mark.timeout(60)
def test_flushall_stops_every_supervised_worker_and_none_is_restarted(
    redis_server: RedisServer, redis_url: str, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    supervisor = redis_fleet.start_cli("--processes", "2", concurrency=2, grace=5.0)
    for _ in range(3):
        start_long_task(redis_space, marks, "faults.work")
    began = time.monotonic()
    flushall(redis_server)
    code = supervisor.wait(timeout=EXIT_WITHIN_S + 10)
    assert code == EXIT_SPACE_LOST, supervisor.log()[-3000:]
    assert time.monotonic() - began < EXIT_WITHIN_S + 1
    log = supervisor.log()
    assert "restarting" not in log, log[-3000:]
    lines = critical_lines(supervisor)
    # One line per worker process (each held some of the 3 tasks), one from the supervisor.
    held = [re.search(r"; (\d+) tasks this worker held are gone", line) for line in lines]
    counts = [int(m.group(1)) for m in held if m is not None]
    # Each child that held tasks says so (one holding none may be stopped by the
    # supervisor first), and the supervisor says why it stops them all.
    assert 1 <= len(counts) <= 2 and sum(counts) == 3, lines
    assert any("found its space wiped or replaced" in line for line in lines), lines


@pytest.mark.timeout(60)
def test_a_sqlite_file_replaced_under_a_running_task_stops_the_worker(
    tmp_path: Path, marks: Path
) -> None:
    url = f"sqlite:///{tmp_path}/space.db"
    fleet = Fleet(url, tmp_path)
    try:
        with make_space(url) as space:
            worker = fleet.start_cli()
            start_long_task(space, marks, "faults.work")
        began = time.monotonic()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"space.db{suffix}").unlink(missing_ok=True)
        with Space(url) as fresh:  # a new, empty space at the same path
            assert fresh.stats().total("running") == 0
        assert_stopped_for_lost_space(worker, url, held=1, since=began)
    finally:
        fleet.close()
        print(fleet.logs())  # shown by pytest only when the test failed


@pytest.mark.timeout(60)
def test_a_handle_of_a_task_in_a_wiped_space_raises_space_lost(
    redis_server: RedisServer, redis_space: Space, marks: Path
) -> None:
    handle = redis_space.get_task("faults.work").submit(str(marks), 1.0, 1.0)
    assert handle.status() == "queued"
    flushall(redis_server)
    for call in (handle.status, handle.info, handle.cancel, lambda: handle.result(timeout=10)):
        began = time.monotonic()
        with pytest.raises(SpaceLost):
            call()
        assert time.monotonic() - began < 3.0  # at once: never waited out as an outage
    with pytest.raises(SpaceLost):
        redis_space.handle(handle.id)


@pytest.mark.timeout(60)
def test_redis_restarted_without_persistence_stops_the_worker_once_it_reconnects(
    redis_server: RedisServer, redis_url: str, redis_space: Space, redis_fleet: Fleet, marks: Path
) -> None:
    """No AOF, no RDB: the restarted server is empty. The worker rides out the outage
    as usual, then finds on reconnecting that its space is gone, and stops."""
    worker = redis_fleet.start()
    start_long_task(redis_space, marks, "faults.long_lease")
    redis_server.kill()
    wait_for(lambda: "backend unreachable" in worker.log(), 10, "the worker to see the outage")
    assert worker.alive()  # an outage alone is ridden out
    redis_server.restart()
    assert_stopped_for_lost_space(worker, redis_url, held=1, since=time.monotonic())
