"""A worker SIGKILLed or SIGSTOPped mid-task: the task still ends exactly once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from taskspace import Space
from tests.faults.harness import (
    Fleet,
    markers_of,
    pause,
    pid_exists,
    process_state,
    resume,
    wait_for,
)

pytestmark = pytest.mark.fault


@pytest.mark.timeout(60)
def test_sigkill_mid_task_completes_in_another_worker(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    first = fleet.start()
    handle = fault_space.get_task("faults.work").submit(str(marks), 60.0, 0.05)
    started = wait_for(
        lambda: markers_of(marks, handle.id, "start"), 20, "the first attempt to start"
    )
    assert [m.pid for m in started] == [first.pid]
    assert first.kill() == -signal.SIGKILL

    second = fleet.start()
    value = handle.result(timeout=20)

    record = handle.info()
    assert record.state == "succeeded"
    assert (record.attempts, record.lost) == (2, 1)
    assert value == {"pid": second.pid, "token": record.token, "attempt": 2}
    stats = fault_space.stats()
    assert stats.total("succeeded") == 1
    assert sum(stats.total(s) for s in ("queued", "running", "failed", "dead")) == 0
    assert stats.stale_finishes == 0
    # Two attempts really ran, one per worker; only the second one got to the end.
    starts = markers_of(marks, handle.id, "start")
    assert [m.pid for m in starts] == [first.pid, second.pid]
    assert starts[1].token == record.token
    ends = markers_of(marks, handle.id, "end")
    assert [(m.pid, m.token) for m in ends] == [(second.pid, record.token)]
    assert second.terminate() == 0


@pytest.mark.timeout(60)
def test_sigstop_past_lease_late_finish_is_refused(
    fault_url: str, fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    paused = fleet.start()
    handle = fault_space.get_task("faults.work").submit(str(marks), 1.5, 0.05)
    wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the first attempt to start")
    stale_before = fault_space.stats().stale_finishes
    pause(paused, fault_url)

    # While it is stopped, its lease (1 s) expires and another worker runs the task.
    other = fleet.start()
    value = handle.result(timeout=20)
    assert value["pid"] == other.pid
    assert process_state(paused.pid) == "T"
    ends = markers_of(marks, handle.id, "end")
    assert [m.pid for m in ends] == [other.pid]  # the paused attempt has not ended
    done = handle.info()
    assert (done.state, done.attempts, done.lost) == ("succeeded", 2, 1)

    # Resumed, the paused worker finishes its attempt late: refused and counted.
    resume(paused)
    wait_for(
        lambda: fault_space.stats().stale_finishes > stale_before,
        20,
        "the late finish to be refused",
    )
    ends = markers_of(marks, handle.id, "end")
    assert sorted(m.pid for m in ends) == sorted([paused.pid, other.pid])
    # The space is intact: a lost lease and a stale finish make the worker check it,
    # and it carries on (it still claims: it runs the next task too).
    assert other.terminate() == 0
    assert paused.alive()
    after_resume = fault_space.get_task("faults.once").submit(str(marks), 0.05, 0.05)
    assert after_resume.result(timeout=20)["pid"] == paused.pid
    assert "wiped or replaced" not in paused.log()
    assert "refused: lease" in paused.log()
    assert paused.terminate() == 0

    assert fault_space.stats().stale_finishes == stale_before + 1
    after = handle.info()
    assert after == done  # nothing about the task changed
    assert value == {"pid": other.pid, "token": done.token, "attempt": 2}
    assert handle.result(timeout=0) == value


@pytest.mark.timeout(60)
def test_supervisor_restarts_a_sigkilled_child_and_the_task_completes(
    fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    supervisor = fleet.start_cli("--processes", "2", grace=5.0)

    def children() -> list[int]:
        return [int(w["pid"]) for w in fault_space.workers() if pid_exists(int(w["pid"]))]

    first_children = wait_for(lambda: len(children()) == 2 and children(), 20, "2 children")
    assert supervisor.pid not in first_children
    handle = fault_space.get_task("faults.work").submit(str(marks), 60.0, 0.05)
    victim = wait_for(lambda: markers_of(marks, handle.id, "start"), 20, "the task to start")[0]
    assert victim.pid in first_children
    os.kill(victim.pid, signal.SIGKILL)  # the supervisor's child: the supervisor reaps it

    value = handle.result(timeout=20)
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 2, 1)
    survivor = next(pid for pid in first_children if pid != victim.pid)
    restarted = wait_for(
        lambda: [pid for pid in children() if pid not in first_children],
        20,
        "the supervisor to restart the killed child",
    )
    # The survivor or the restarted child took the task over once the lease expired.
    assert value["pid"] in [survivor, *restarted]
    assert supervisor.alive()

    assert supervisor.terminate(timeout=20) == 0  # SIGTERM is forwarded to every child
    for pid in [survivor, *restarted]:
        wait_for(lambda pid=pid: not pid_exists(pid), 10, f"child {pid} to exit")
