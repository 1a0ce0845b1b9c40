"""Regressions of the coordination review (/work/notes/review.md), on every
backend: idempotent release after close (1), wait bounds on a slow store (3),
cancelled ``async with`` and the default executor (12, 13), a blocked
waiter's store calls (17), one ticket counter (19), no ghost queue entry
after a blip (20), JSON queue entries (23), lost leases given back and a
bounded close (Notes)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskspace import BackendError, ConfigError, SerializationError, Space
from taskspace.backends.base import Grant
from taskspace.coordination.lease import CLOSE_BUDGET_S, queue_prefix
from tests.conftest import backend_url

STORE_METHODS = {
    "kv": ("get", "put", "touch", "delete", "incr", "scan", "revision", "wait", "txn"),
    "leases": ("acquire", "renew", "release", "holders", "wait"),
}


def shared_url(backend: str, tmp_path: Path) -> str:
    """A URL that several Spaces of this process share (memory: a named store)."""
    if backend == "memory":
        return f"memory://review-{uuid.uuid4().hex[:8]}"
    return backend_url(backend, tmp_path)


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    return shared_url(backend, tmp_path)


@pytest.fixture
def spaces(url: str) -> Iterator[Callable[[], Space]]:
    """Spaces on one shared URL (each its own client), closed at teardown."""
    made: list[Space] = []

    def make() -> Space:
        made.append(Space(url))
        return made[-1]

    yield make
    for space in made:
        space.close()


Around = Callable[[str, Callable[..., Any]], Callable[..., Any]]


def wrap_store(space: Space, monkeypatch: pytest.MonkeyPatch, around: Around) -> None:
    """Replace each kv/leases method of ``space``'s store by ``around(name, real)``."""
    store = space.store
    for part, names in STORE_METHODS.items():
        target = getattr(store, part)
        for name in names:
            monkeypatch.setattr(target, name, around(f"{part}.{name}", getattr(target, name)))


def queued(space: Space, lease_name: str) -> int:
    return len(space.store.kv.scan(queue_prefix(lease_name) + "q/"))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- 1: release is idempotent on the client ------------------------------------------


def test_release_after_close_makes_no_store_call(spaces: Callable[[], Space]) -> None:
    space = spaces()
    lease = space.lock("closing", ttl=5).acquire(wait=0)
    assert lease is not None
    space.close()
    assert not lease.held
    assert lease.release() is False
    assert lease.release() is False
    assert space._store is None, "a release after close reopened the store"
    assert "lease_keeper" not in space._facades, "a release after close made a new keeper"


# -- 3: a wait is a promise, also on a slow store ------------------------------------


def test_wait_bound_on_a_slow_store(spaces: Callable[[], Space],
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Every store call takes 0.1 s; the lock is held and a waiter queued:
    ``acquire(wait=0.3)`` returns within 0.3 s plus one call in flight."""
    holder_space, waiter_space, slow = spaces(), spaces(), spaces()
    held = holder_space.lock("slow", ttl=5).acquire(wait=0)
    assert held is not None
    waiter = threading.Thread(target=lambda: waiter_space.lock("slow", ttl=5).acquire(wait=4))
    waiter.start()
    wait_until(lambda: queued(holder_space, "lock/slow") == 1, 5, "the waiter to queue")
    calls: list[str] = []

    def around(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            time.sleep(0.1)
            return real(*args, **kwargs)

        return call

    wrap_store(slow, monkeypatch, around)
    lock = slow.lock("slow", ttl=5)
    start = time.monotonic()
    assert lock.acquire(wait=0.3) is None
    took = time.monotonic() - start
    assert took < 0.3 + 0.1 + 0.12, f"wait=0.3 took {took:.2f} s: {calls}"
    start = time.monotonic()
    assert lock.acquire(wait=0) is None
    assert time.monotonic() - start < 0.2 + 0.12, "wait=0: the queue scan and nothing else"
    held.release()
    waiter.join(10)


# -- 12, 13: a cancelled async acquisition never takes the lock later --------------


def test_cancelled_async_with_never_takes_the_lock(spaces: Callable[[], Space]) -> None:
    space = spaces()
    lock = space.lock("doc", ttl=1.0)
    first = lock.acquire(wait=0)
    assert first is not None

    async def user() -> None:
        async with lock:
            raise AssertionError("entered a lock that is held")

    async def main() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(user(), 0.2)

    loop = asyncio.new_event_loop()  # not asyncio.run: it would join a stuck default executor
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    first.release()
    other = spaces().lock("doc", ttl=1.0).acquire(wait=1.5)
    assert other is not None, "an orphaned waiter took the lock after its caller was cancelled"
    time.sleep(0.6)  # the orphan's wait step is over: it must have given up
    assert [g.id for g in lock.holders()] == [other.grant.id]
    other.release()


def test_cancelled_async_waits_leave_the_default_executor_free(
    spaces: Callable[[], Space],
) -> None:
    """Eight cancelled waits (a request timeout each): ``asyncio.to_thread``
    still runs at once, and ``asyncio.run`` returns."""
    space = spaces()
    lock = space.lock("pool", ttl=5, wait=3)
    first = lock.acquire(wait=0)
    assert first is not None

    async def enter() -> None:
        async with lock:
            pass

    async def main() -> int:
        for _ in range(8):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enter(), 0.05)
        return await asyncio.wait_for(asyncio.to_thread(lambda: 1), 1.0)

    start = time.monotonic()
    assert asyncio.run(main()) == 1
    assert time.monotonic() - start < 2.0
    wait_until(lambda: queued(space, "lock/pool") == 0, 2.0, "the cancelled waiters to leave")
    assert [g.id for g in lock.holders()] == [first.grant.id]
    first.release()


def test_async_acquire_and_release(spaces: Callable[[], Space]) -> None:
    lock = spaces().lock("aio2", ttl=2)

    async def main() -> tuple[bool, bool]:
        lease = await lock.acquire_async(wait=0)
        assert lease is not None
        again = await lock.acquire_async(wait=0.1)
        async with lease:
            pass
        return lease.held, again is None

    assert asyncio.run(main()) == (False, True)
    assert lock.holders() == []


# -- 17: a blocked waiter does not poll ------------------------------------------------


@pytest.mark.parametrize("ttl", [0.3, 5.0])
def test_blocked_waiter_makes_few_store_calls(
    spaces: Callable[[], Space], monkeypatch: pytest.MonkeyPatch, ttl: float
) -> None:
    holder, waiter = spaces(), spaces()
    held = holder.lock("busy", ttl=ttl).acquire(wait=0)
    assert held is not None
    calls: list[str] = []

    def around(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    wrap_store(waiter, monkeypatch, around)
    start = time.monotonic()
    assert waiter.lock("busy", ttl=ttl).acquire(wait=2.0) is None
    rate = len(calls) / (time.monotonic() - start)
    bound = 15 if ttl < 1 else 5
    assert rate < bound, f"{rate:.1f} store calls/s while blocked: {calls}"
    held.release()


# -- 19: one ticket counter for the space -----------------------------------------------


def test_one_ticket_counter_for_every_name(spaces: Callable[[], Space]) -> None:
    space, other = spaces(), spaces()
    for i in range(4):
        held = space.lock(f"doc:{i}", ttl=5).acquire(wait=0)
        assert held is not None
        waiter = threading.Thread(target=lambda n=i: _acquire_release(other, f"doc:{n}"))
        waiter.start()
        wait_until(lambda n=i: queued(space, f"lock/doc:{n}") == 1, 5, "a queued waiter")
        held.release()
        waiter.join(10)
    keys = [key for key, _ in space.store.kv.scan("taskspace/locks/")]
    assert keys == ["taskspace/locks/ticket"], keys
    ticket = space.store.kv.get("taskspace/locks/ticket")
    assert ticket is not None and ticket.expires is None


def _acquire_release(space: Space, name: str) -> None:
    lease = space.lock(name, ttl=5).acquire(wait=5)
    assert lease is not None
    lease.release()


# -- 20: a wait that ends during a blip leaves no ghost entry ------------------------


def test_no_ghost_entry_after_a_blip(spaces: Callable[[], Space],
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    holder, blipped, newcomer = spaces(), spaces(), spaces()
    held = holder.lock("ghost", ttl=10).acquire(wait=0)
    assert held is not None
    down = threading.Event()

    def around(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if down.is_set():
                raise BackendError(f"blip: {name}")
            return real(*args, **kwargs)

        return call

    wrap_store(blipped, monkeypatch, around)
    threading.Timer(0.3, down.set).start()
    assert blipped.lock("ghost", ttl=10).acquire(wait=0.5) is None
    assert queued(holder, "lock/ghost") == 1, "the entry is still there while the backend is down"
    down.clear()  # the backend is back
    held.release()
    start = time.monotonic()
    while (lease := newcomer.lock("ghost", ttl=10).acquire(wait=0)) is None:
        assert time.monotonic() - start < 2.0, "a ghost entry blocks wait=0 on a free lock"
        time.sleep(0.02)
    lease.release()


# -- 23: queue entries are JSON; a bad value names its key ---------------------------


def test_kv_scan_reads_lock_queues_and_names_bad_keys(spaces: Callable[[], Space]) -> None:
    space, other = spaces(), spaces()
    space.kv.put("app/config", {"x": 1})
    held = space.lock("x", ttl=5).acquire(wait=0)
    assert held is not None
    waiter = threading.Thread(target=lambda: other.lock("x", ttl=5).acquire(wait=3))
    waiter.start()
    wait_until(lambda: queued(space, "lock/x") == 1, 5, "a queued waiter")
    values = dict(space.kv.scan(""))
    assert values["app/config"] == {"x": 1}
    assert any(isinstance(v, str) and ":" in v for k, v in values.items() if "/q/" in k)
    held.release()
    waiter.join(10)
    space.store.kv.put("raw/blob", b"\x00not json")
    with pytest.raises(SerializationError, match="raw/blob"):
        list(space.kv.scan("raw/"))
    with pytest.raises(SerializationError, match="raw/blob"):
        space.kv.get("raw/blob")


# -- Notes: close is bounded overall ---------------------------------------------------


def test_close_is_bounded_overall(spaces: Callable[[], Space],
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Releases fail (the backend is down for them) while renewals work:
    close gives up within its budget, not after one deadline per lease."""
    space = spaces()
    leases = [space.semaphore("permits", 6, ttl=1.5).acquire(wait=0) for _ in range(6)]
    assert all(lease is not None for lease in leases)

    def release(grant: Grant) -> bool:
        time.sleep(0.05)
        raise BackendError("releases cut off by the test")

    monkeypatch.setattr(space.store.leases, "release", release)
    start = time.monotonic()
    space.close()
    took = time.monotonic() - start
    assert took < CLOSE_BUDGET_S + 0.5, f"close took {took:.2f} s"
    assert not any(lease is not None and lease.held for lease in leases)


def test_bad_fair_flag(spaces: Callable[[], Space]) -> None:
    with pytest.raises(ConfigError, match="fair"):
        spaces().lock("x", fair="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wait"):
        spaces().lock("x").acquire(wait=float("inf"))
