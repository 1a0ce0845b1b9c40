"""Locks and semaphores in one process, on every backend: holding, renewal,
loss before the store's expiry, stale grants, waiting bounds, async with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from taskspace import BackendError, ConfigError, LeaseLost, LockTimeout, Space
from taskspace.backends.base import Grant
from taskspace.coordination.lease import Lease, acquire_lease, keeper


def fail_renewals(space: Space, monkeypatch: pytest.MonkeyPatch, block: threading.Event | None
                  = None) -> list[float]:  # fmt: skip
    """Every renewal of ``space`` fails from now on (or blocks on ``block``);
    returns the list of times renewals were attempted."""
    attempts: list[float] = []

    def renew(grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        attempts.append(time.monotonic())
        if block is not None:
            block.wait(30)
        raise BackendError("renewals cut off by the test")

    monkeypatch.setattr(space.store.leases, "renew", renew)
    return attempts


def test_lock_holds_and_renews_past_its_ttl(space: Space) -> None:
    lock = space.lock("a", ttl=0.3)
    lease = lock.acquire(wait=0)
    assert lease is not None and lease.held and lease.name == "lock/a"
    first_expiry = lease.grant.expires
    time.sleep(0.8)  # well past the ttl: only the renewer keeps it
    assert lease.held
    assert lease.grant.expires > first_expiry
    assert [g.id for g in lock.holders()] == [lease.grant.id]
    assert lock.acquire(wait=0) is None
    assert lease.release() is True
    assert lock.holders() == []


def test_tokens_strictly_increase(space: Space) -> None:
    lock = space.lock("tokens", ttl=5)
    tokens = []
    for _ in range(20):
        with lock as lease:
            tokens.append(lease.token)
    assert tokens == sorted(set(tokens))


def test_stale_grant_release_false_renew_lost(space: Space) -> None:
    lease = space.lock("stale", ttl=5).acquire()
    assert lease is not None
    assert lease.release() is True
    assert lease.release() is False
    assert not lease.held
    with pytest.raises(LeaseLost):
        lease.renew()
    # taken behind its back: the store refuses the renewal
    other = space.lock("stale", ttl=5).acquire()
    assert other is not None
    assert space.store.leases.release(other.grant)
    with pytest.raises(LeaseLost):
        other.renew()
    assert not other.held
    assert other.release() is False


def test_lost_before_the_store_expires(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewals fail: ``held`` turns False and on_lost fires at the renew
    deadline, while the store still holds the grant (before its TTL ran out)."""
    ttl = 1.5
    lost = threading.Event()
    seen: list[tuple[float, bool, list[str]]] = []

    def on_lost(lease: Lease) -> None:
        holders = [g.id for g in space.store.leases.holders(lease.name)]
        seen.append((time.monotonic(), lease.held, holders))
        lost.set()

    space.store.leases.holders("lock/lost")  # connect first
    start = time.monotonic()
    lease = acquire_lease(space, "lock/lost", ttl=ttl, wait=0, on_lost=on_lost)
    assert lease is not None
    attempts = fail_renewals(space, monkeypatch)
    releases = fail_releases(space, monkeypatch)  # the backend is down for releases too
    assert lost.wait(5)
    at, held, holders = seen[0]
    assert not held
    assert lease.grant.id in holders, "lost only after the store let the grant go"
    assert at - start < ttl
    assert at - start >= ttl * 2 / 3 - 0.05
    assert len(attempts) >= 2, "failed renewals are retried before the deadline"
    time.sleep(0.1)
    assert len(seen) == 1, "on_lost fires once"
    assert lease not in keeper(space).held()
    assert releases, "the lost lease is given back in the background (tried while down)"


def fail_releases(space: Space, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``leases.release`` of ``space`` fails from now on; the times tried."""
    attempts: list[float] = []

    def release(grant: Grant) -> bool:
        attempts.append(time.monotonic())
        raise BackendError("releases cut off by the test")

    monkeypatch.setattr(space.store.leases, "release", release)
    return attempts


def test_lost_lease_is_given_back_in_the_background(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewals fail (a blip) but the store still answers releases: a lease
    declared lost at its deadline is released on the store in the
    background, so the next holder does not wait out the rest of its TTL."""
    ttl = 1.5
    lost = threading.Event()
    lease = acquire_lease(space, "lock/blip", ttl=ttl, wait=0, on_lost=lambda _: lost.set())
    assert lease is not None
    fail_renewals(space, monkeypatch)
    assert lost.wait(5)
    lost_at = time.monotonic()
    other = space.lock("blip", ttl=ttl).acquire(wait=ttl)
    took = time.monotonic() - lost_at
    assert other is not None and other.token > lease.token
    assert took < ttl / 3 - 0.1, f"the next holder waited {took:.2f} s: the grant ran out its TTL"
    assert lease.release() is False


def test_paused_renewer_still_lost_on_time(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal stuck in the store (a socket timeout) cannot delay the loss:
    the watchdog declares it at the deadline and ``held`` reads False."""
    release = threading.Event()
    lost = threading.Event()
    lease = acquire_lease(space, "lock/stuck", ttl=0.6, wait=0, on_lost=lambda _: lost.set())
    assert lease is not None
    fail_renewals(space, monkeypatch, block=release)
    try:
        assert lost.wait(3)
        assert not lease.held
        assert lease.lost_reason and "deadline" in lease.lost_reason
    finally:
        release.set()


def test_held_is_checked_on_read(space: Space) -> None:
    """A holder that missed its deadline (here: the deadline moved into the
    past, as after a SIGSTOP) reads held False even before any thread ran."""
    lease = space.lock("read", ttl=5).acquire()
    assert lease is not None
    lease._deadline = time.monotonic() - 0.001
    assert not lease.held
    with pytest.raises(LeaseLost):
        lease.check()


def test_callbacks_errors_are_logged(space: Space, caplog: pytest.LogCaptureFixture) -> None:
    renewed = threading.Event()

    def on_renewed(lease: Lease) -> None:
        renewed.set()
        raise RuntimeError("boom")

    lease = space.lock("cb", ttl=0.3, on_renewed=on_renewed).acquire()
    assert lease is not None
    assert renewed.wait(3)
    time.sleep(0.3)
    assert lease.held, "an exception in a callback harms nothing"
    assert any("on_renewed" in r.message for r in caplog.records)
    lease.release()


def test_wait_zero_and_timeout_bounds(space: Space) -> None:
    lock = space.lock("busy", ttl=5)
    holder = lock.acquire()
    assert holder is not None
    start = time.monotonic()
    assert lock.acquire(wait=0) is None
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    assert lock.acquire(wait=0.4) is None
    took = time.monotonic() - start
    assert 0.4 <= took < 1.0
    start = time.monotonic()
    with pytest.raises(LockTimeout), space.lock("busy", wait=0.2):
        pass
    assert time.monotonic() - start < 0.7
    # a wait that ran out leaves the queue in the background, at once
    _wait_queued(space, "lock/busy", 0, exact=True, timeout=1.0)
    holder.release()


def test_release_wakes_a_waiter_quickly(space: Space) -> None:
    lock = space.lock("handoff", ttl=10)
    holder = lock.acquire()
    assert holder is not None
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(_acquire_time(lock)))
    waiter.start()
    _wait_queued(space, "lock/handoff", 1)
    time.sleep(0.2)  # the waiter is asleep in its wait
    released = time.monotonic()
    holder.release()
    waiter.join(10)
    assert got and got[0] - released < 0.3, f"handoff took {got[0] - released:.3f} s"


def _acquire_time(lock: Any) -> float:
    lease = lock.acquire(wait=10)
    at = time.monotonic()
    assert lease is not None
    lease.release()
    return at


def _wait_queued(space: Space, lease_name: str, n: int, timeout: float = 5.0,
                 exact: bool = False) -> None:  # fmt: skip
    from taskspace.coordination.lease import queue_prefix

    deadline = time.monotonic() + timeout
    while True:
        queued = len(space.store.kv.scan(queue_prefix(lease_name) + "q/"))
        if queued == n or (queued > n and not exact):
            return
        assert time.monotonic() < deadline, f"{queued} waiters queued, not {n}"
        time.sleep(0.005)


def test_waiters_acquire_in_arrival_order(space: Space) -> None:
    lock = space.lock("fifo", ttl=10)
    holder = lock.acquire()
    assert holder is not None
    order: list[int] = []

    def wait_then_record(i: int) -> None:
        lease = lock.acquire(wait=15)
        assert lease is not None
        order.append(i)
        time.sleep(0.01)
        lease.release()

    threads = []
    for i in range(6):
        thread = threading.Thread(target=wait_then_record, args=(i,))
        thread.start()
        threads.append(thread)
        _wait_queued(space, "lock/fifo", i + 1)
    # a newcomer does not barge ahead of the queue, even with wait=0
    assert lock.acquire(wait=0) is None
    holder.release()
    for thread in threads:
        thread.join(15)
    assert order == list(range(6))


def test_semaphore_limit_and_fairness(space: Space) -> None:
    sem = space.semaphore("pool", limit=3, ttl=5)
    leases = [sem.acquire(wait=0) for _ in range(3)]
    assert all(lease is not None for lease in leases)
    assert sem.acquire(wait=0) is None
    assert len(sem.holders()) == 3
    with pytest.raises(ConfigError, match="capacity"):
        space.semaphore("pool", limit=4).acquire(wait=0)
    for lease in leases:
        assert lease is not None and lease.release()
    with sem as lease:
        assert lease.name == "sem/pool"


def test_semaphore_never_exceeds_limit_threads(space: Space) -> None:
    sem = space.semaphore("hammer", limit=2, ttl=5)
    inside, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        for _ in range(8):
            with sem:
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.002)
                with lock:
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert peak[0] == 2


def test_async_with(space: Space) -> None:
    lock = space.lock("aio", ttl=5)

    async def main() -> tuple[bool, int]:
        async with lock as lease:
            assert lease.held
            inner = await asyncio.to_thread(lock.acquire, 0)
            return lease.held, 0 if inner is None else 1

    held, inner = asyncio.run(main())
    assert held and inner == 0
    assert lock.holders() == []

    async def lease_ctx() -> bool:
        lease = await asyncio.to_thread(lock.acquire)
        assert lease is not None
        async with lease:
            pass
        return lease.held

    assert asyncio.run(lease_ctx()) is False
    assert lock.holders() == []


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda sp: sp.lock("x", ttl=-1), "ttl"),
        (lambda sp: sp.lock("x", ttl=0.01), "ttl"),
        (lambda sp: sp.lock("", ttl=1), "name"),
        (lambda sp: sp.lock("x", wait=-1), "wait"),
        (lambda sp: sp.lock("x", data="str"), "data"),
        (lambda sp: sp.semaphore("x", 0), "limit"),
        (lambda sp: sp.semaphore("x", True), "limit"),
        (lambda sp: sp.lock("x").acquire(wait=float("nan")), "wait"),
    ],
)
def test_bad_input(space: Space, factory: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        factory(space)


def test_backend_down_for_the_whole_wait(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout is a promise with the backend down: BackendError after the
    wait if no call ever succeeded, None if some did."""

    def down(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("down")

    monkeypatch.setattr(space.store.leases, "acquire", down)
    monkeypatch.setattr(space.store.kv, "scan", down)
    start = time.monotonic()
    with pytest.raises(BackendError):
        space.lock("down").acquire(wait=0.3)
    assert 0.3 <= time.monotonic() - start < 0.8
    monkeypatch.undo()
    holder = space.lock("down").acquire()
    assert holder is not None
    calls = [0]
    real = space.store.leases.acquire

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] % 2:
            raise BackendError("flaky")
        return real(*args, **kwargs)

    monkeypatch.setattr(space.store.leases, "acquire", flaky)
    start = time.monotonic()
    assert space.lock("down").acquire(wait=0.4) is None
    assert time.monotonic() - start < 0.9
    holder.release()


def test_one_renewal_call_per_ttl_group(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases acquired at different moments are renewed together: one store
    call for all grants of a ttl, not one per lease."""
    calls: list[int] = []
    real = space.store.leases.renew

    def renew(grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        calls.append(len(grants))
        return real(grants, ttl)

    monkeypatch.setattr(space.store.leases, "renew", renew)
    leases = []
    for i in range(6):
        lease = space.lock(f"group-{i}", ttl=0.6).acquire(wait=0)
        assert lease is not None
        leases.append(lease)
        time.sleep(0.03)
    time.sleep(1.2)
    assert all(lease.held for lease in leases)
    assert calls.count(6) >= 2, calls
    for lease in leases:
        assert lease.release()
