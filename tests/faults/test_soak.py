"""1,000 tasks on 4 worker processes that keep being SIGKILLed (and restarted) or stalled."""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskspace import Space
from tests.faults.harness import (
    FIGURES,
    Fleet,
    Marker,
    WorkerProc,
    pause,
    read_markers,
    resume,
    square_violations,
)

pytestmark = pytest.mark.fault

TASKS = 1000
PROCESSES = 4
CONCURRENCY = 4
FAULT_EVERY_S = (0.15, 0.45)
STALL_SHARE = 0.25
STALL_S = (1.2, 2.0)
DEADLINE_S = 90.0


def _sleep_of(i: int) -> float:
    return 0.02 + (i % 7) * 0.01  # 20..80 ms of work per task


@dataclass
class Injector:
    """Random faults on a fleet: mostly SIGKILL (and a replacement worker), sometimes a
    SIGSTOP long enough for the worker's leases to expire, then SIGCONT."""

    fleet: Fleet
    url: str
    rng: random.Random
    slots: list[WorkerProc]
    kills: int = 0
    stalls: int = 0
    stopped: dict[int, float] = field(default_factory=dict)  # slot -> when to resume

    def inject(self) -> None:
        running = [s for s in range(len(self.slots)) if s not in self.stopped]
        slot = self.rng.choice(running)
        if self.rng.random() < STALL_SHARE and len(running) > 1:
            pause(self.slots[slot], self.url)
            self.stopped[slot] = time.monotonic() + self.rng.uniform(*STALL_S)
            self.stalls += 1
        else:
            self.slots[slot].kill()
            self.slots[slot] = self.fleet.start(concurrency=CONCURRENCY, grace=2.0)
            self.kills += 1

    def resume_due(self, now: float) -> None:
        for slot, at in list(self.stopped.items()):
            if now >= at:
                resume(self.slots[slot])
                del self.stopped[slot]

    def run_until(self, done: Callable[[], bool], deadline: float) -> None:
        next_fault = time.monotonic() + self.rng.uniform(*FAULT_EVERY_S)
        while not done():
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"tasks not all final after {DEADLINE_S} s")
            self.resume_due(now)
            if now >= next_fault:
                self.inject()
                next_fault = now + self.rng.uniform(*FAULT_EVERY_S)
            time.sleep(0.02)
        self.resume_due(float("inf"))


@pytest.mark.timeout(150)
def test_thousand_tasks_survive_random_sigkills_and_stalls(
    fault_url: str, fault_space: Space, fleet: Fleet, marks: Path
) -> None:
    seed = int(os.environ.get("TASKSPACE_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    handles = fault_space.get_task("faults.square").submit_many(
        [(str(marks), i, _sleep_of(i)) for i in range(TASKS)]
    )
    started = time.monotonic()
    slots = [fleet.start(concurrency=CONCURRENCY, grace=2.0) for _ in range(PROCESSES)]

    def all_final() -> bool:
        stats = fault_space.stats()
        return stats.total("queued") + stats.total("running") == 0

    injector = Injector(fleet, fault_url, rng, slots)
    injector.run_until(all_final, started + DEADLINE_S)
    elapsed = time.monotonic() - started
    for worker in injector.slots:
        # A replacement started just now must get to install its SIGTERM handler first.
        fleet.wait_ready(worker, fault_space)
        assert worker.terminate() == 0, worker.log()[-2000:]

    stats = fault_space.stats()
    by_task: dict[str, list[Marker]] = defaultdict(list)
    for marker in read_markers(marks):
        by_task[marker.task_id].append(marker)
    violations: list[str] = []
    retried = 0
    returned_unaccepted = 0
    for i, handle in enumerate(handles):
        record = handle.info()
        value = handle.result(timeout=0) if record.state == "succeeded" else None
        violations += square_violations(i, record, value, by_task[handle.id])
        retried += record.lost > 0
        returned_unaccepted += sum(
            m.event == "end" and m.token != record.token for m in by_task[handle.id]
        )
    figure = (
        f"soak[{fault_space.scheme}] seed={seed}: tasks={TASKS} kills={injector.kills} "
        f"stalls(SIGSTOP>lease)={injector.stalls} "
        f"retried(lost>0)={retried} stale_finishes_refused={stats.stale_finishes} "
        f"violations={len(violations)} ({elapsed:.1f} s)"
    )
    print(figure)
    FIGURES.append(figure)

    assert violations == [], "\n".join(violations[:20])
    assert stats.total("succeeded") == TASKS
    assert all(stats.total(s) == 0 for s in ("queued", "running", "failed", "dead", "cancelled"))
    # A refused finish is an attempt that returned but was not the accepted one.
    assert stats.stale_finishes <= returned_unaccepted
    assert injector.kills >= 3, f"only {injector.kills} kills: the test did not test much"
    assert retried > 0
