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
from taskspace.coordination.periodic import fire_due
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
    print(f"\n12 tasks at 5/s (default burst 2): {took:.2f} s, {report.released} deferrals,"
          f" run times {[round(t - runs[0], 2) for t in runs]}")  # fmt: skip
    assert within_bound([(t, 1.0) for t in runs], 5, 2 + 1)  # + 1: a start's lag (grace)
    assert runs[-1] - runs[0] >= 1.9  # 10 past the burst, at 0.2 s each
    assert 1 <= report.released <= 12  # each waiting task deferred about once


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
    limiter = space.rate_limit(f"gated-{isolation}", limits={"calls": "10/h"}, burst=10)
    task = space.task(name=f"gated/{isolation}", rate_limit=limiter,
                      isolation=isolation, max_attempts=1)(fn)  # fmt: skip
    handles = task.submit_many([(i,) for i in range(5)])
    began = time.monotonic()
    drain(space, concurrency=2)
    assert all(h.info().attempts == 1 and h.status() == "succeeded" for h in handles)
    assert time.monotonic() - began < 10  # within the burst of 10: nothing waits
    assert limiter.available()["calls"] == pytest.approx(5, abs=0.1)  # the gate charged 5


def test_bad_rate_limit_options(space: Space) -> None:
    for bad, needle in [("fast", "'fast'"), (5, "rate_limit"), ({"a": "x/s"}, "'x/s'"),
                        ({"a/b": "1/s"}, "'/'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            space.task(rate_limit=bad)(lambda: None)
    with pytest.raises(ConfigError, match="max_rate_limited"):
        space.task(max_rate_limited=-1)(lambda: None)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_attempts": True}, "max_attempts must be an integer >= 1, got True"),
        ({"max_rate_limited": False}, "max_rate_limited must be an integer >= 0, got False"),
        ({"priority": True}, "priority"),
        ({"retry_jitter": "no"}, "retry_jitter must be True or False, got 'no'"),
        ({"lease": True}, "lease=True"),
        ({"lease": 0}, "lease=0"),
        ({"timeout": float("nan")}, "timeout=nan"),
        ({"timeout": 0}, "timeout=0"),
        ({"result_ttl": float("inf")}, "result_ttl=inf"),
        ({"retry_backoff": -1}, "retry_backoff=-1"),
        ({"retry_backoff_max": 1e12}, "retry_backoff_max=1000000000000"),
    ],
)
def test_task_options_are_checked_up_front(
    space: Space, options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        space.task(**options)(lambda: None)
    assert needle in str(caught.value)
    assert space.task_names == []


def test_submit_options_are_checked_up_front(space: Space) -> None:
    task = space.task(lambda: None)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"countdown": float("nan")}, "countdown=nan"),
        ({"countdown": True}, "countdown=True"),
        ({"eta": True}, "eta"),
    ]
    for options, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            task.options(**options).submit()
    assert space.store.queue.stats().total("queued", ["default"]) == 0


def test_task_options_are_immutable_and_hashable(space: Space) -> None:
    limits = {"requests": "500/m"}
    task = space.task(rate_limit=limits)(lambda: None)
    limits["requests"] = "1000/s"  # the caller's dict: copied
    opts = task.opts
    assert dict(opts.rate_limit) == {"requests": "500/m"}  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        opts.rate_limit["requests"] = "1000/s"  # type: ignore[index]
    assert hash(opts) == hash(opts.updated())  # hashable, and equal to a copy
    assert opts == opts.updated()


def test_a_task_id_with_spaces_is_gated_never_failed(space: Space) -> None:
    """A periodic task's id embeds its name ("periodic:daily report:<tick>"):
    the gate escapes the id into its reservation key instead of refusing it."""

    @space.periodic(every=1, name="daily report", rate_limit="1/s")
    def report() -> str:
        return "done"

    wall = space.store.clock.wall()
    fired = sum(fire_due(space, at=wall + 1.5 * k) for k in range(3))
    assert fired >= 2
    drain(space)
    records = [space.store.queue.get(t.id) for t in space.store.queue.list(limit=10)]
    assert len(records) == fired and all(r is not None and " " in r.id for r in records)
    assert [r.state for r in records if r is not None] == ["succeeded"] * fired, [
        (r.state, r.error) for r in records if r is not None
    ]
    limiter = space.rate_limit("holders", "1/m", burst=1)
    assert limiter.reserve("a b/c").delay == 0
    odd = limiter.reserve("a%20b/c")  # distinct from "a b/c" once escaped
    assert odd.held and limiter.reserve("a%20b/c").at == odd.at  # its own hold, kept


def test_overdue_tasks_never_start_in_a_bunch(space: Space) -> None:
    """The review's proof with a real worker: while long jobs hold every slot,
    the reserved moments of rate-limited tasks pass; when the slots free, the
    overdue tasks are decided afresh instead of all starting at once."""
    starts: list[float] = []

    @space.task(rate_limit="10/s")
    def call_api(i: int) -> None:
        starts.append(time.monotonic())

    @space.task(priority=10)
    def long_job() -> None:
        time.sleep(1.5)

    call_api.submit_many([(i,) for i in range(30)])
    worker = threading.Thread(target=drain, args=(space,), kwargs={"concurrency": 6})
    worker.start()
    time.sleep(0.3)
    long_job.submit_many([() for _ in range(6)])
    worker.join(timeout=18)
    assert len(starts) == 30
    print(f"\nstarts: {[round(t - min(starts), 2) for t in sorted(starts)]}")
    assert within_bound([(t, 1.0) for t in starts], 10, 2 + 1)  # burst 2, + 1: the grace


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_the_timeout_starts_after_the_gate(space: Space, isolation: str, tmp_path: Any) -> None:
    """A gate sleep longer than the timeout spends no attempt, and the body
    runs once per task (the review saw a timed-out gate retried while its
    abandoned thread ran the body too)."""
    log = tmp_path / "runs"
    timeout = 0.3 if isolation == "thread" else 0.45  # a fork takes its time too

    @space.task(rate_limit="2/s", timeout=timeout, max_attempts=3, retry_backoff=0,
                isolation=isolation)  # fmt: skip
    def call_api(i: int) -> int:
        with open(log, "a") as f:  # also from a forked child (os._exit skips flushes)
            f.write(f"{i}\n")
        return i

    handles = call_api.submit_many([(i,) for i in range(3)])  # the third sleeps 0.5 s
    drain(space)
    assert [h.result(timeout=5) for h in handles] == [0, 1, 2]
    assert [h.info().attempts for h in handles] == [1, 1, 1]
    time.sleep(0.6)  # an abandoned thread would run its body by now
    assert sorted(log.read_text().split()) == ["0", "1", "2"]


def test_an_attempt_settled_in_the_gate_never_runs() -> None:
    from types import SimpleNamespace

    from taskspace.worker import execution as ex

    record = SimpleNamespace(timeout=1.0)
    attempt = ex.Attempt(record, None, SimpleNamespace(lease_lost=False), deadline=None)  # type: ignore[arg-type]
    assert ex.begin(attempt, deadline=True) and attempt.deadline is not None
    attempt.deadline, attempt.settled = None, True
    assert not ex.begin(attempt, deadline=True) and attempt.deadline is None
    attempt.settled, attempt.ctx.lease_lost = False, True
    assert not ex.begin(attempt, deadline=True)


def test_async_tasks_behind_a_concurrency_limit_do_not_convoy() -> None:
    """Review 29: async tasks waiting in the gate for a concurrency slot must not
    hold every thread that the permits' releases need (the loop's default
    executor has min(32, cpus + 4) threads unless the worker sizes it)."""
    from taskspace.worker.config import WorkerConfig
    from taskspace.worker.worker import Worker

    space = Space("memory://")
    gpu = space.rate_limit("gpu", concurrency=2, ttl=5)
    done: list[float] = []

    @space.task(rate_limit=gpu, isolation="async")
    async def infer(i: int) -> None:
        await asyncio.sleep(0.2)
        done.append(time.monotonic())

    for i in range(20):
        infer.submit(i)
    began = time.monotonic()
    worker = Worker(space, WorkerConfig(concurrency=20, install_signal_handlers=False))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        while len(done) < 20 and time.monotonic() - began < 20:
            time.sleep(0.05)
        took = time.monotonic() - began
    finally:
        worker.stop()
        thread.join(10)
        space.close()
    assert len(done) == 20
    assert took < 8.0, f"20 tasks of 0.2 s two at a time took {took:.1f} s (ideal ~2 s)"
