"""space.cached: memoization with single-flight across threads and processes,
takeover after a holder dies, errors, timeouts, tasks, asyncio, bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskspace import Space
from taskspace.errors import ConfigError, ResultTimeout, SerializationError
from taskspace.state.memo import CachedError, cached
from tests.state import cache_procs


@pytest.fixture(params=["memory", "sqlite"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Space]:
    """Memory and SQLite: the memo's own logic (processes: the tests below)."""
    from tests.conftest import backend_url

    sp = Space(backend_url(str(request.param), tmp_path))
    yield sp
    sp.close()


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    """SQLite and Redis: a file and a server shared by processes. (PostgreSQL
    serves the same store protocols; its process test is the cache's
    4-process one, which keeps the suite's time down.)"""
    if backend == "memory":
        pytest.skip("the memory backend lives in one process")
    if backend == "postgres":
        pytest.skip("PostgreSQL: covered by the cache's 4-process test (suite time)")
    from tests.conftest import backend_url

    space = Space(backend_url(backend, tmp_path))
    space.store.kv.revision()
    created = space.url
    space.close()
    return created


def test_computes_once_per_call(local: Space) -> None:
    calls: list[Any] = []

    @local.cached(ttl=60)
    def add(x: int, y: int = 2) -> int:
        calls.append((x, y))
        return x + y

    assert add(1) == 3
    assert add(1) == 3
    assert add(x=1) == 3 and add(1, 2) == 3 and add(1, y=2) == 3  # one key: bound, defaults
    assert calls == [(1, 2)]
    assert add(1, 5) == 6
    assert len(calls) == 2
    assert add.memo.name.endswith("test_computes_once_per_call.<locals>.add")
    assert add.forget(1) is True
    assert add(1) == 3
    assert len(calls) == 3


def test_own_key_and_values_survive_json(local: Space) -> None:
    seen: list[str] = []

    @local.cached(key=lambda user, **_: user)
    def profile(user: str, verbose: bool = False) -> dict[str, Any]:
        seen.append(user)
        return {"user": user, "tags": ["a"], "n": None}

    assert profile("ann") == {"user": "ann", "tags": ["a"], "n": None}
    assert profile("ann", verbose=True) == {"user": "ann", "tags": ["a"], "n": None}
    assert seen == ["ann"]


def test_threads_compute_once(local: Space) -> None:
    runs: list[int] = []
    start = threading.Barrier(8)

    @local.cached(ttl=60, lease_ttl=2)
    def slow(x: int) -> int:
        runs.append(x)
        time.sleep(0.2)
        return x * 10

    results: list[int] = []

    def call() -> None:
        start.wait()
        results.append(slow(4))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [40] * 8
    assert runs == [4]


def test_errors_are_not_cached_by_default(local: Space) -> None:
    runs: list[int] = []

    @local.cached(ttl=60)
    def flaky(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            raise ValueError("first time")
        return x

    with pytest.raises(ValueError, match="first time"):
        flaky(1)
    assert flaky(1) == 1
    assert flaky(1) == 1
    assert len(runs) == 2


def test_cache_errors_reraises_until_error_ttl(local: Space) -> None:
    runs: list[int] = []

    @local.cached(ttl=60, cache_errors=True, error_ttl=0.3)
    def broken(x: int) -> int:
        runs.append(x)
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError):
        broken(1)
    with pytest.raises(CachedError, match="ValueError: bad 1") as info:
        broken(1)
    assert info.value.remote_type == "ValueError" and info.value.remote_message == "bad 1"
    assert runs == [1]
    deadline = time.monotonic() + 5
    while len(runs) == 1:  # after error_ttl the call computes again
        assert time.monotonic() < deadline
        with pytest.raises((ValueError, CachedError)):
            broken(1)
        time.sleep(0.02)


def test_cache_errors_by_type(local: Space) -> None:
    runs: list[str] = []

    @local.cached(cache_errors=(KeyError,))
    def pick(what: str) -> int:
        runs.append(what)
        raise KeyError(what) if what == "key" else ValueError(what)

    for _ in range(2):
        with pytest.raises((KeyError, CachedError)):
            pick("key")
        with pytest.raises(ValueError):
            pick("value")
    assert runs == ["key", "value", "value"]


def test_a_waiter_gives_up_after_wait(local: Space) -> None:
    release = threading.Event()
    entered = threading.Event()

    def body(x: int) -> int:
        entered.set()
        release.wait(10)
        return x

    holder = local.cached(name="blocking", wait=10)(body)
    impatient = local.cached(name="blocking", wait=0.2)(body)
    computes = local.cached(name="blocking", wait=0.2, on_timeout="compute")(lambda x: -x)
    worker = threading.Thread(target=holder, args=(5,))
    worker.start()
    try:
        assert entered.wait(5)
        started = time.monotonic()
        with pytest.raises(ResultTimeout, match=r"wait=0\.2"):
            impatient(5)
        assert time.monotonic() - started < 2
        assert computes(5) == -5  # computed itself, without the lease
    finally:
        release.set()
        worker.join()
    assert impatient(5) in (5, -5)  # whichever was stored last


def test_a_task_runs_its_memoized_function(local: Space) -> None:
    runs: list[int] = []

    @local.cached(ttl=60)
    @local.task
    def square(x: int) -> int:
        runs.append(x)
        return x * x

    assert local.get_task(square.name) is square
    assert square(3) == 9 and square(3) == 9
    assert square.fn(3) == 9  # what a worker runs
    assert runs == [3]
    assert square.fn.memo.name == square.name  # type: ignore[attr-defined]


def test_async_functions_single_flight(local: Space) -> None:
    runs: list[int] = []

    @local.cached(ttl=60)
    async def fetch(x: int) -> int:
        runs.append(x)
        await asyncio.sleep(0.1)
        return x + 1

    async def main() -> list[int]:
        return list(await asyncio.gather(*(fetch(1) for _ in range(5))))

    assert asyncio.run(main()) == [2] * 5
    assert asyncio.run(main()) == [2] * 5
    assert runs == [1]

    @local.cached(cache_errors=True)
    async def fails() -> int:
        raise RuntimeError("async boom")

    with pytest.raises(RuntimeError):
        asyncio.run(fails())
    with pytest.raises(CachedError):
        asyncio.run(fails())


def test_bad_input(local: Space) -> None:
    def f(x: Any) -> Any:
        return x

    bad: list[dict[str, Any]] = [
        {"ttl": 0}, {"ttl": "1"}, {"error_ttl": -1}, {"wait": -1}, {"wait": None},
        {"on_timeout": "wait"}, {"cache_errors": "yes"}, {"cache_errors": (int,)},
        {"cache_errors": ()}, {"key": 5}, {"lease_ttl": 0.01}, {"name": ""}, {"colour": 1},
    ]  # fmt: skip
    for options in bad:
        with pytest.raises(ConfigError):
            local.cached(**options)
        with pytest.raises(ConfigError):
            cached(local, f, **options)
    with pytest.raises(ConfigError):
        local.cached(5)  # type: ignore[call-overload]
    memo = local.cached(f)
    with pytest.raises(SerializationError, match="'x'"):
        memo((1, 2))  # a tuple would not come back equal
    with pytest.raises(SerializationError):
        memo(object())
    with pytest.raises(SerializationError):
        local.cached(name="returns-a-tuple")(lambda: (1, 2))()
    with pytest.raises(ConfigError, match="key="):
        local.cached(key=lambda x: 7)(f)(1)
    with pytest.raises(TypeError):
        memo(1, 2)  # type: ignore[call-arg]  # the call itself is wrong, as without memoization
    assert list(local.kv.scan("taskspace/cache/")) == []  # nothing was stored


# -- across processes -------------------------------------------------------------


def test_processes_compute_once(url: str, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    children = [
        cache_procs.spawn("memo", url, work, x=7, sleep=0.3, lease_ttl=5, wait=20) for _ in range(3)
    ]
    try:
        cache_procs.wait_ready(work, children)
        (work / "go").touch()
        reports = [cache_procs.report(child) for child in children]
    finally:
        cache_procs.kill_all(children)
    space = Space(url)
    try:
        calls = space.kv.get("calls")
    finally:
        space.close()
    assert [r["result"] for r in reports] == [14] * 3
    assert calls == 1


@pytest.mark.fault
def test_a_killed_holder_is_taken_over_after_its_ttl(url: str, tmp_path: Path) -> None:
    """The holder is SIGKILLed while computing: a waiter in another process
    takes the lease once it expires (lease_ttl 1 s) and computes."""
    work = tmp_path / "w"
    work.mkdir()
    holder = cache_procs.spawn("memo", url, work, x=3, sleep=60, lease_ttl=1, wait=20)
    waiter: Any = None
    try:
        cache_procs.wait_ready(work, [holder])
        (work / "go").touch()
        deadline = time.monotonic() + 15
        while not (work / f"computing.{holder.pid}").exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.01)
        waiter = cache_procs.spawn("memo", url, work, x=3, sleep=0, lease_ttl=1, wait=20)
        cache_procs.wait_ready(work, [holder, waiter])
        time.sleep(0.1)  # the waiter is now blocked on the holder's lease
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        rep = cache_procs.report(waiter)
        took_over = time.monotonic() - killed
    finally:
        cache_procs.kill_all([holder] + ([waiter] if waiter is not None else []))
    space = Space(url)
    try:
        calls = space.kv.get("calls")
    finally:
        space.close()
    print(f"taken over {took_over:.2f} s after the kill")
    assert rep["result"] == 6
    assert calls == 2
    assert (work / f"computing.{rep['pid']}").exists()
    assert took_over < 1 + 5  # lease_ttl plus a generous margin for process exit


def test_a_cancelled_async_waiter_stops_waiting(local: Space) -> None:
    release = threading.Event()
    entered = threading.Event()
    runs: list[int] = []

    def body(x: int) -> int:
        runs.append(x)
        entered.set()
        release.wait(10)
        return x

    holder = local.cached(name="async-cancel")(body)

    async def fetch_body(x: int) -> int:
        runs.append(-x)
        return -x

    fetch = local.cached(name="async-cancel")(fetch_body)
    worker = threading.Thread(target=holder, args=(1,))
    worker.start()
    try:
        assert entered.wait(5)
        waiting_before = {t.name for t in threading.enumerate()}

        async def main() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(fetch(1), 0.2)

        asyncio.run(main())
        deadline = time.monotonic() + 3
        while any(t.name.startswith("taskspace-memo-") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the waiting thread did not stop"
            time.sleep(0.01)
        assert "taskspace-memo-async-cancel" not in waiting_before
    finally:
        release.set()
        worker.join()
    assert runs == [1]  # the cancelled caller never computed
    key = fetch.memo.key_for((1,), {})
    assert local.store.leases.holders("memo/" + key) == []  # no lease left behind
    assert asyncio.run(fetch(1)) == 1  # the holder's result
