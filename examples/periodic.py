"""Periodic tasks: a heartbeat every second fired by a running worker, a weekday
report on a cron schedule in Berlin time, and what the catch-up policies do with
ticks missed while no worker ran.
Run: python examples/periodic.py
"""

from __future__ import annotations

import threading
import time

from taskspace import ManualClock, Space
from taskspace.coordination.periodic import fire_due
from taskspace.worker.config import WorkerConfig
from taskspace.worker.worker import Worker

space = Space("sqlite:///.taskspace/periodic-example.db")
beats: list[str] = []


@space.periodic(every=1, catch_up="all")
def heartbeat() -> None:
    """Fired once a second, each tick exactly once across every worker."""
    beats.append(time.strftime("%H:%M:%S"))


@space.periodic(cron="0 9 * * 1-5", tz="Europe/Berlin", max_attempts=5)
def weekday_report(team: str = "ml") -> str:
    return f"report for {team}"


def run_a_worker_for_three_beats() -> None:
    # Every worker that defines a schedule fires its due ticks (so does the
    # elected maintainer); each tick fires once however many of them try.
    worker = Worker(space, WorkerConfig.build(install_signal_handlers=False, concurrency=2,
                                              maintainer_ttl=1, maintainer_retry=1))  # fmt: skip
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 20
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(grace=5)
    thread.join(10)
    print("heartbeats ran at:", beats[:3])
    report = space.schedules[weekday_report.name]
    state = space.schedules[heartbeat.name].state()
    print("heartbeat fired", state.fired if state else 0, "tick(s); last task", state and
          state.last_task_id)  # fmt: skip
    print("next weekday report (Berlin):", time.strftime(
        "%a %Y-%m-%d %H:%M UTC", time.gmtime(report.next_after(time.time()) or 0)))  # fmt: skip
    assert len(beats) >= 3


def catch_up_policies() -> None:
    # Ten minutes without any worker, back 45 s after the tenth missed tick (a
    # tick is on time for 30 s, or the maintainer failover bound if longer).
    for policy in ("latest", "all", "none"):
        clock = ManualClock()
        clock.advance(-clock.wall() % 60 + 0.5)  # just after a whole minute, for the demo
        demo = Space("memory://", clock=clock)
        demo.periodic(lambda: None, every=60, catch_up=policy, name="minutely")
        fire_due(demo)  # first sight: the schedule starts now (no backfill)
        clock.advance(645)
        fired = fire_due(demo)
        print(f"catch_up={policy!r}: {fired} task(s) fired for 10 missed ticks")
        assert fired == {"latest": 1, "all": 10, "none": 0}[policy]


if __name__ == "__main__":
    run_a_worker_for_three_beats()
    catch_up_policies()
