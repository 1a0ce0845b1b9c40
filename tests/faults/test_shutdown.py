"""SIGTERM: running tasks get the shutdown grace; past it they go back to the queue."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from taskspace import Space
from tests.faults.harness import Fleet, markers_of, wait_for

pytestmark = pytest.mark.fault


@pytest.mark.timeout(60)
def test_sigterm_within_grace_finishes_the_running_task(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    worker = fleet.start_cli(grace=10.0)  # through the CLI: `taskspace worker APP --url ...`
    handle = fault_space.get_task("faults.cooperative").submit(str(marks), 1.0, 1.0)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=15) == 0
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0)
    assert handle.result(timeout=0) == {"pid": worker.pid, "token": record.token, "attempt": 1}
    assert [m.pid for m in markers_of(marks, handle.id, "end")] == [worker.pid]
    assert fault_space.workers() == []  # it withdrew from the registry on the way out


@pytest.mark.timeout(60)
def test_sigterm_waits_for_the_finish_of_a_task_that_ended_within_grace(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """A task that ends within the grace is recorded before the worker exits, even
    when the store takes its time (here 0.3 s, well within the lease) to accept the finish.

    Fails today (since "finish in the completing thread"): Worker._settle removes
    the attempt from ``_running`` and then calls ``_report_outcome``, which runs
    ``store.finish`` in the task's own (daemon) thread. Worker._shutdown waits only
    for ``_running`` to empty, then stops the finisher and returns: the process
    exits 0 while that finish is still in flight, and the task stays ``running``
    until its lease expires and it runs again. (Without the delay it is a race:
    test_sigterm_within_grace_finishes_the_running_task fails about 1 run in 3
    on SQLite.)
    """
    worker = fleet.start(grace=10.0, slow_finish=0.3)
    handle = fault_space.get_task("faults.cooperative").submit(str(marks), 0.5, 0.5)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    worker.send(signal.SIGTERM)

    assert worker.wait(timeout=15) == 0
    assert [m.pid for m in markers_of(marks, handle.id, "end")] == [worker.pid]
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0), (
        f"worker exited 0 but the task it ran within the grace is {record.state}"
    )


@pytest.mark.timeout(60)
def test_sigterm_past_grace_releases_the_task_without_spending_an_attempt(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    first = fleet.start(grace=0.3)
    handle = fault_space.get_task("faults.cooperative").submit(str(marks), 60.0, 0.05)
    assert handle.info().attempts == 0
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    claimed = handle.info()
    assert (claimed.state, claimed.attempts) == ("running", 1)
    first.send(signal.SIGTERM)

    assert first.wait(timeout=10) == 0
    released = handle.info()
    assert released.state == "queued"
    assert (released.attempts, released.lost) == (0, 0)  # the claim was given back
    assert released.worker is None
    assert markers_of(marks, handle.id, "end") == []  # the first attempt never finished

    second = fleet.start()
    value = handle.result(timeout=20)
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0)
    assert value == {"pid": second.pid, "token": record.token, "attempt": 1}
    assert fault_space.stats().stale_finishes == 0
    assert second.terminate() == 0


@pytest.mark.timeout(60)
def test_sigterm_past_grace_exits_even_if_a_task_ignores_cancellation(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    """A thread cannot be killed, but the worker promised to stop after its grace:
    the task is released, and the process must exit rather than wait for the task.

    Fails today: Worker.run() returns after the grace, then the interpreter joins
    the ThreadPoolExecutor's (non-daemon) task thread at exit and the process
    lives until the task returns (here 30 s) — the task is meanwhile re-runnable
    elsewhere, so two attempts of it run at once, and a supervisor (or k8s)
    waiting on the worker's exit waits for the task anyway.
    """
    worker = fleet.start(grace=0.3)
    handle = fault_space.get_task("faults.work").submit(str(marks), 30.0, 0.05)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    sent = time.monotonic()
    worker.send(signal.SIGTERM)

    wait_for(lambda: handle.info().state == "queued", 10, "the task to be released")
    try:
        code = worker.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        code = None
    waited = time.monotonic() - sent
    record = handle.info()
    assert (record.state, record.attempts) == ("queued", 0)
    assert code == 0, (
        f"worker still running {waited:.1f} s after SIGTERM with a 0.3 s grace: "
        "it waits for the abandoned task thread"
    )


@pytest.mark.timeout(60)
def test_second_sigterm_cuts_the_grace_short(fault_space: Space, fleet: Fleet, marks: Path) -> None:
    """The worker's signal handler turns a second SIGTERM into ``stop(0.0)``: stop now.

    Fails today: Worker._shutdown computes its deadline from ``self._grace`` once,
    before waiting, so the second signal (which arrives during that wait) changes
    nothing and the worker keeps waiting out the full 30 s grace.
    """
    worker = fleet.start(grace=30.0)
    handle = fault_space.get_task("faults.cooperative").submit(str(marks), 60.0, 0.05)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")
    worker.send(signal.SIGTERM)
    wait_for(lambda: "got signal 15" in worker.log(), 10, "the worker to log the SIGTERM")
    # No store-visible event marks "now waiting out the grace"; give the claim loop
    # (idle_wait 0.05 s) ample time to get there, so the second signal lands in the wait.
    time.sleep(0.5)
    worker.send(signal.SIGTERM)

    try:
        code = worker.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, "worker still waiting out its 30 s grace 5 s after a second SIGTERM"
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("queued", 0, 0)
