"""The task option ``rate_limit=`` and RateLimited raised in tasks, end to end
with a real worker on every backend: budgets are kept, attempts are not spent."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest

from taskspace import RateLimited, Space, current_task
from taskspace.errors import ConfigError, TaskFailed
from tests.coordination.test_ratelimit import within_bound


def drain(space: Space, **options: Any) -> Any:
    options.setdefault("concurrency", 4)
    return space.run_worker(burst=True, install_signal_handlers=False, **options)


def test_a_rate_limited_task_keeps_its_budget_without_spending_attempts(space: Space) -> None:
    stamps: list[float] = []

    @space.task(rate_limit="5/s", max_attempts=1)
    def call_model(i: int) -> int:
        stamps.append(space.store.clock.now())
        return i

    handles = call_model.submit_many([(i,) for i in range(12)])
    began = time.monotonic()
    report = drain(space, concurrency=4)
    took = time.monotonic() - began
    assert [h.result(timeout=5) for h in handles] == list(range(12))
    assert [h.info().attempts for h in handles] == [1] * 12
    runs = sorted(stamps)
    print(f"\n12 tasks at 5/s (burst 5): {took:.2f} s, {report.released} deferrals,"
          f" run times {[round(t - runs[0], 2) for t in runs]}")  # fmt: skip
    assert within_bound([(t, 1.0) for t in runs], 5, 5 + 1)  # + 1: claim latency of a run
    assert runs[-1] - runs[0] >= 1.2  # 7 past the burst, at 0.2 s each
    assert 5 <= report.released <= 12  # each waiting task deferred about once


def test_rate_limited_raised_in_a_task_is_rescheduled_without_an_attempt(space: Space) -> None:
    seen: list[tuple[float, int]] = []

    @space.task(max_attempts=1)
    def fetch() -> str:
        seen.append((space.store.clock.now(), current_task().attempt))
        if len(seen) < 3:
            raise RateLimited("HTTP 429", retry_after=0.3)
        return "ok"

    handle = fetch.submit()
    report = drain(space)
    assert handle.result(timeout=5) == "ok"
    info = handle.info()
    assert info.attempts == 1 and [a for _, a in seen] == [1, 1, 1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    print(f"\nre-runs after RateLimited(retry_after=0.3): gaps {[round(g, 2) for g in gaps]}")
    assert all(g >= 0.29 for g in gaps), gaps
    assert info.error is not None and info.error["type"] == "RateLimited"
    assert info.error["rate_limited"] == 2 and report.released == 2


def test_rate_limited_reschedules_are_bounded(space: Space) -> None:
    runs: list[int] = []

    @space.task(max_attempts=2, max_rate_limited=2)
    def always_429() -> None:
        runs.append(current_task().attempt)
        raise RateLimited("HTTP 429", retry_after=0.01)

    handle = always_429.submit()
    drain(space)
    with pytest.raises(TaskFailed, match="429"):
        handle.result(timeout=5)
    # two free reschedules, then every further one spends an attempt
    assert runs == [1, 1, 1, 2] and handle.info().attempts == 2


def test_a_shared_limiter_with_concurrency_across_task_and_caller(space: Space) -> None:
    gpu = space.rate_limit("gpu", "100/s", concurrency=1, ttl=5)
    active, peak = [0], [0]
    lock = threading.Lock()

    @space.task(rate_limit=gpu, max_attempts=1)
    def infer(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return i

    handles = infer.submit_many([(i,) for i in range(4)])
    with gpu.acquire(wait=5):  # the caller holds the one slot for a while
        waiter = threading.Thread(target=drain, args=(space,), kwargs={"concurrency": 4})
        waiter.start()
        time.sleep(0.3)
        assert all(h.status() in ("queued", "running") for h in handles)
    waiter.join(timeout=15)
    assert [h.result(timeout=5) for h in handles] == [0, 1, 2, 3]
    assert peak[0] == 1 and all(h.info().attempts == 1 for h in handles)
    assert space.store.leases.holders("ratelimit/gpu") == []


@pytest.mark.parametrize("isolation", ["thread", "async", "process"])
def test_every_isolation_is_gated(space: Space, isolation: str) -> None:
    def body(i: int) -> float:
        return time.monotonic()

    async def abody(i: int) -> float:
        await asyncio.sleep(0)
        return time.monotonic()

    fn = abody if isolation == "async" else body
    task = space.task(name=f"gated/{isolation}", rate_limit={"calls": "10/h"},
                      isolation=isolation, max_attempts=1)(fn)  # fmt: skip
    handles = task.submit_many([(i,) for i in range(5)])
    began = time.monotonic()
    drain(space, concurrency=2)
    assert all(h.info().attempts == 1 and h.status() == "succeeded" for h in handles)
    assert time.monotonic() - began < 10  # within the burst of 10: nothing waits
    limiter = space.rate_limit(f"task:gated%2F{isolation}", limits={"calls": "10/h"})
    assert limiter.available()["calls"] == pytest.approx(5, abs=0.1)  # the gate charged 5


def test_bad_rate_limit_options(space: Space) -> None:
    for bad, needle in [("fast", "'fast'"), (5, "rate_limit"), ({"a": "x/s"}, "'x/s'"),
                        ({"a/b": "1/s"}, "'/'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            space.task(rate_limit=bad)(lambda: None)
    with pytest.raises(ConfigError, match="max_rate_limited"):
        space.task(max_rate_limited=-1)(lambda: None)
