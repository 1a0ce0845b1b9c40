"""Tasks end to end on every backend, with in-process workers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from taskspace import (
    ResultTimeout,
    Retry,
    Space,
    TaskCancelled,
    TaskFailed,
    Worker,
    WorkerConfig,
    current_task,
)


def drain(space: Space, **options: Any) -> Any:
    options.setdefault("concurrency", 4)
    return space.run_worker(burst=True, install_signal_handlers=False, **options)


def test_submit_and_result(space: Space) -> None:
    @space.task
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.submit(2, 3)
    assert handle.status() == "queued"
    report = drain(space)
    assert handle.result(timeout=5) == 5
    assert handle.status() == "succeeded"
    assert report.succeeded == 1


def test_kwargs_and_structured_values(space: Space) -> None:
    @space.task
    def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}

    handle = echo.submit(1, [2, 3], {"x": None}, flag=True)
    drain(space)
    assert handle.result(timeout=5) == {
        "args": [1, [2, 3], {"x": None}],
        "kwargs": {"flag": True},
    }


def test_submit_many_one_step_and_ordered_handles(space: Space) -> None:
    @space.task
    def square(x: int) -> int:
        return x * x

    handles = square.submit_many([(i,) for i in range(50)])
    assert len({h.id for h in handles}) == 50
    drain(space)
    assert [h.result(timeout=5) for h in handles] == [i * i for i in range(50)]


def test_submit_by_name_and_reattach(space: Space) -> None:
    @space.task(name="greet")
    def greet(who: str) -> str:
        return f"hello {who}"

    handle = space.submit("greet", "ada")
    again = space.handle(handle.id)
    drain(space)
    assert again.result(timeout=5) == "hello ada"


def test_retries_then_succeeds(space: Space) -> None:
    calls: list[int] = []

    @space.task(max_attempts=3, retry_backoff=0)
    def flaky() -> str:
        calls.append(current_task().attempt)
        if len(calls) < 3:
            raise ValueError("not yet")
        return "ok"

    handle = flaky.submit()
    drain(space)
    assert handle.result(timeout=5) == "ok"
    assert calls == [1, 2, 3]
    assert handle.info().attempts == 3


def test_exhausted_retries_fail_with_remote_error(space: Space) -> None:
    @space.task(max_attempts=2, retry_backoff=0)
    def broken() -> None:
        raise KeyError("missing-thing")

    handle = broken.submit()
    drain(space)
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=5)
    assert info.value.status == "failed"
    assert info.value.remote_type == "KeyError"
    assert "missing-thing" in info.value.remote_message
    assert "raise KeyError" in info.value.remote_traceback
    assert handle.info().attempts == 2


def test_retry_signal_with_countdown(space: Space) -> None:
    @space.task(max_attempts=2)
    def again() -> int:
        if current_task().attempt == 1:
            raise Retry(countdown=0.3)
        return current_task().attempt

    handle = again.submit()
    started = time.monotonic()
    drain(space)
    assert handle.result(timeout=5) == 2
    assert time.monotonic() - started >= 0.3


def test_backoff_delays_the_retry(space: Space) -> None:
    stamps: list[float] = []

    @space.task(max_attempts=2, retry_backoff=0.4, retry_jitter=False)
    def slow_retry() -> None:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise RuntimeError("first")

    slow_retry.submit()
    drain(space)
    assert len(stamps) == 2
    assert stamps[1] - stamps[0] >= 0.4


def test_priority_then_fifo(space: Space) -> None:
    order: list[str] = []

    @space.task
    def record(tag: str) -> None:
        order.append(tag)

    record.submit("low-1")
    record.options(priority=5).submit("high-1")
    record.submit("low-2")
    record.options(priority=5).submit("high-2")
    record.options(priority=-1).submit("lowest")
    drain(space, concurrency=1)
    assert order == ["high-1", "high-2", "low-1", "low-2", "lowest"]


def test_queues_listed_first_are_served_first(space: Space) -> None:
    order: list[str] = []

    @space.task
    def record(tag: str) -> None:
        order.append(tag)

    record.options(queue="bulk").submit("bulk")
    record.options(queue="urgent").submit("urgent")
    drain(space, concurrency=1, queues="urgent,bulk")
    assert order == ["urgent", "bulk"]


def test_countdown_delays_execution(space: Space) -> None:
    ran_at: list[float] = []

    @space.task
    def later() -> None:
        ran_at.append(time.monotonic())

    submitted = time.monotonic()
    later.options(countdown=0.5).submit()
    drain(space)
    assert ran_at and ran_at[0] - submitted >= 0.5


def test_eta_in_the_past_runs_now(space: Space) -> None:
    @space.task
    def now() -> str:
        return "ran"

    handle = now.options(eta=time.time() - 60).submit()
    drain(space)
    assert handle.result(timeout=5) == "ran"


def test_dedup_key_returns_live_task(space: Space) -> None:
    @space.task
    def index(doc: str) -> str:
        return doc

    first = index.options(dedup_key="doc-7").submit("a")
    second = index.options(dedup_key="doc-7").submit("b")
    assert first.id == second.id
    drain(space)
    assert second.result(timeout=5) == "a"
    third = index.options(dedup_key="doc-7").submit("c")
    assert third.id != first.id


def test_cancel_queued_never_runs(space: Space) -> None:
    ran: list[int] = []

    @space.task
    def never() -> None:
        ran.append(1)

    handle = never.submit()
    assert handle.cancel() == "cancelled"
    drain(space)
    assert ran == []
    with pytest.raises(TaskCancelled):
        handle.result(timeout=1)


def test_cancel_running_sets_cooperative_flag(space: Space) -> None:
    started = threading.Event()

    @space.task(lease=0.6)
    def long_loop() -> str:
        started.set()
        ctx = current_task()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            time.sleep(0.02)
        return "finished"

    handle = long_loop.submit()
    worker = threading.Thread(target=drain, args=(space,))
    worker.start()
    assert started.wait(5)
    assert handle.cancel() == "running"
    worker.join(10)
    assert handle.status() == "cancelled"
    with pytest.raises(TaskCancelled):
        handle.result(timeout=1)


def test_progress_reported(space: Space) -> None:
    @space.task
    def steps() -> None:
        ctx = current_task()
        for i in range(1, 4):
            ctx.progress(i, 3)

    handle = steps.submit()
    assert handle.progress() is None
    drain(space)
    assert handle.progress() == (3, 3)


def test_fencing_token_exposed_and_increasing(space: Space) -> None:
    tokens: list[int] = []

    @space.task(max_attempts=3, retry_backoff=0)
    def fenced() -> None:
        tokens.append(current_task().fencing_token)
        if len(tokens) < 3:
            raise RuntimeError("again")

    fenced.submit()
    drain(space)
    assert len(tokens) == 3 and tokens == sorted(set(tokens))


def test_async_task_runs_on_event_loop(space: Space) -> None:
    @space.task
    async def fetch(n: int) -> int:
        await asyncio.sleep(0.01)
        return current_task().attempt + n

    handles = fetch.submit_many([(i,) for i in range(20)])
    drain(space, concurrency=20)
    assert [h.result(timeout=5) for h in handles] == [i + 1 for i in range(20)]


def test_async_timeout_cancels_coroutine(space: Space) -> None:
    @space.task(timeout=0.2, max_attempts=1)
    async def hang() -> None:
        await asyncio.sleep(30)

    handle = hang.submit()
    drain(space)
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=5)
    assert info.value.remote_type == "TaskTimeout"


def test_thread_timeout_is_recorded_and_slot_freed(space: Space) -> None:
    release = threading.Event()

    @space.task(timeout=0.2, max_attempts=1)
    def stuck() -> None:
        release.wait(10)

    @space.task
    def quick() -> str:
        return "done"

    slow = stuck.submit()
    fast = quick.submit()
    report = drain(space, concurrency=2)
    release.set()
    with pytest.raises(TaskFailed) as info:
        slow.result(timeout=5)
    assert info.value.remote_type == "TaskTimeout"
    assert fast.result(timeout=5) == "done"
    assert not report.wedged  # one stuck thread of two slots: the worker carries on


def test_process_isolation_runs_in_child(space: Space) -> None:
    @space.task(isolation="process")
    def where() -> int:
        current_task().progress(1, 1)
        return os.getpid()

    handle = where.submit()
    drain(space)
    assert handle.result(timeout=10) != os.getpid()
    assert handle.progress() == (1, 1)


def test_process_isolation_error_is_recorded(space: Space) -> None:
    @space.task(isolation="process", max_attempts=1)
    def explode() -> None:
        raise ZeroDivisionError("boom")

    handle = explode.submit()
    drain(space)
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=10)
    assert info.value.remote_type == "ZeroDivisionError"


def test_process_timeout_kills_child(space: Space) -> None:
    @space.task(isolation="process", timeout=0.3, max_attempts=1)
    def spin() -> None:
        while True:
            pass

    handle = spin.submit()
    started = time.monotonic()
    drain(space)
    assert time.monotonic() - started < 10
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=5)
    assert info.value.remote_type == "TaskTimeout"


def test_unencodable_result_fails_without_retry(space: Space) -> None:
    @space.task(max_attempts=3)
    def bad_result() -> object:
        return object()

    handle = bad_result.submit()
    drain(space)
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=5)
    assert info.value.remote_type == "SerializationError"
    assert handle.info().attempts == 1


def test_result_timeout_is_a_timeout_error(space: Space) -> None:
    @space.task
    def pending() -> None: ...

    handle = pending.submit()
    started = time.monotonic()
    with pytest.raises(ResultTimeout) as info:
        handle.result(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert 0.15 <= time.monotonic() - started < 2


def test_a_task_no_worker_knows_stays_queued_until_one_does(space: Space) -> None:
    @space.task(name="only-here")
    def only_here() -> str:
        return "ran"

    handle = only_here.submit()
    known = dict(space._tasks)
    space._tasks.clear()  # this worker's app does not know the name
    drain(space)
    assert handle.status() == "queued"
    assert handle.info().attempts == 0
    space._tasks.update(known)  # a worker that registers it
    drain(space)
    assert handle.result(timeout=5) == "ran"


def test_worker_result_waiter_wakes_promptly(space: Space) -> None:
    @space.task
    def ping() -> str:
        return "pong"

    w = Worker(space, WorkerConfig(concurrency=2, install_signal_handlers=False))
    worker = threading.Thread(target=w.run)
    worker.start()
    try:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert ping.submit().result(timeout=5) == "pong"
            times.append(time.perf_counter() - t0)
        times.sort()
        assert times[len(times) // 2] < 0.5  # a sanity bound, not a speed goal
        assert [x["name"] for x in space.workers()] == [w.name]
    finally:
        w.stop(grace=1)
        worker.join(10)
    assert space.workers() == []
