"""Task timeouts and isolation: what happens to the code running a task that must stop."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from taskspace import Space, TaskFailed
from tests.faults.harness import Fleet, is_running, markers_of, pid_exists, wait_for

pytestmark = pytest.mark.fault


@pytest.mark.timeout(60)
def test_process_task_past_timeout_is_killed_and_retried_then_fails(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    worker = fleet.start()
    task = fault_space.get_task("faults.hang")
    assert (task.isolation, task.opts.timeout, task.opts.max_attempts) == ("process", 0.5, 2)
    handle = task.submit(str(marks), 30.0)

    # The first attempt times out and is retried in a new child process.
    first = wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the first attempt")[0]
    assert first.pid != worker.pid  # it ran in a child of the worker
    wait_for(lambda: not pid_exists(first.pid), 10, f"timed-out child {first.pid} to be gone")
    starts = wait_for(
        lambda: (m := markers_of(marks, handle.id, "start")) and len(m) == 2 and m,
        20,
        "the retry to start",
    )
    second = starts[1]
    assert second.pid not in (first.pid, worker.pid)
    assert second.token > first.token

    # Attempts exhausted: failed with TaskTimeout; its child is killed too.
    with pytest.raises(TaskFailed) as failure:
        handle.result(timeout=20)
    assert failure.value.remote_type == "TaskTimeout"
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("failed", 2, 0)
    assert record.error is not None and record.error["type"] == "TaskTimeout"
    wait_for(lambda: not pid_exists(second.pid), 10, f"timed-out child {second.pid} to be gone")
    assert markers_of(marks, handle.id, "end") == []  # no attempt ever got to the end
    assert worker.alive()  # killing the child did not hurt the worker
    assert worker.terminate() == 0


@pytest.mark.timeout(60)
def test_process_task_child_does_not_outlive_a_sigkilled_worker(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """Process isolation exists so that a task can always be killed.

    Fails today: the task's child is forked with ``daemon=True``, which only
    helps when the worker exits normally; when the worker is SIGKILLed (OOM
    killer, node drain, `kill -9`) the child is orphaned and keeps running its
    task to the end, while the task is requeued and runs again elsewhere.
    """
    worker = fleet.start()
    handle = fault_space.get_task("faults.hang_untimed").submit(str(marks), 30.0)
    child = wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")[0]
    assert child.pid != worker.pid
    assert worker.kill() == -signal.SIGKILL
    try:
        deadline = time.monotonic() + 5.0
        while is_running(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(child.pid), (
            f"task child {child.pid} still running 5 s after its worker {worker.pid} was killed"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)  # not ours to reap: init does


@pytest.mark.timeout(60)
def test_timed_out_thread_tasks_count_against_capacity_then_the_worker_exits(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """A thread task past its timeout cannot be stopped: the worker records the
    timeout, and the stuck thread keeps its slot until it returns. A worker whose
    every slot is stuck claims nothing more and exits with code 3 (a supervisor
    restarts it), so no task is ever claimed by a worker that cannot run it."""
    worker = fleet.start(concurrency=2)
    timeout_task = fault_space.get_task("faults.work_timeout")
    first = timeout_task.submit(str(marks), 60.0, 60.0)
    wait_for(first.done, 20, "the first task to time out")
    assert (first.info().error or {}).get("type") == "TaskTimeout"
    # One slot is stuck, one is free: the worker still runs work.
    ok = fault_space.get_task("faults.work").submit(str(marks), 0.0, 0.0)
    assert ok.result(timeout=10)["pid"] == worker.pid
    second = timeout_task.submit(str(marks), 60.0, 60.0)
    wait_for(second.done, 20, "the second task to time out")
    assert worker.wait(timeout=20) == 3
    after = fault_space.get_task("faults.work").submit(str(marks), 0.0, 0.0)
    assert after.status() == "queued"
    replacement = fleet.start(concurrency=1)
    assert after.result(timeout=20)["pid"] == replacement.pid
