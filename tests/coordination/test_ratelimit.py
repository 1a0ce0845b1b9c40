"""Global rate limits on every backend: GCRA arithmetic, weighted and multiple
limits, concurrency, blocking without polling, reservations, bad input, faults."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from taskspace import ManualClock, Space
from taskspace.coordination.ratelimit import DEFAULT_BURST, KEY_PREFIX, RateLimiter, parse_rate
from taskspace.errors import BackendError, ConfigError, RateLimited

CLOCK_SLACK_S = 1e-5


def within_bound(stamps: list[tuple[float, float]], rate: float, burst: float) -> bool:
    """Every window [t_i, t_j] of admissions (stamp, cost) admitted at most
    rate * (t_j - t_i) + burst (the guarantee, checked over every pair), to
    within CLOCK_SLACK_S of the lease clock: the decision admits up to
    EPSILON_S early, and lease-clock floats near 1.8e9 s carry ~2.4e-7 s per
    sum (a whole early admission is 1/rate early: thousands of times more)."""
    return worst_excess(stamps, rate, burst) <= rate * CLOCK_SLACK_S


def worst_excess(stamps: list[tuple[float, float]], rate: float, burst: float) -> float:
    """The largest cost admitted in one window beyond rate * W + burst
    (negative when every window keeps the bound)."""
    ordered = sorted(stamps)
    worst = -burst
    for i in range(len(ordered)):
        total = 0.0
        for j in range(i, len(ordered)):
            total += ordered[j][1]
            worst = max(worst, total - rate * (ordered[j][0] - ordered[i][0]) - burst)
    return worst


# -- parsing and bad input ------------------------------------------------------


def test_parse_rate_forms() -> None:
    assert (parse_rate("500/m").count, parse_rate("500/m").period) == (500, 60.0)
    assert parse_rate("10/s").interval == 0.1
    assert parse_rate("10/5s").period == 5.0
    assert parse_rate("90000 / minute").period == 60.0
    assert parse_rate("1/1.5h").period == 5400.0
    assert parse_rate("7/days").period == 86400.0


@pytest.mark.parametrize(
    "bad", ["", "fast", "10", "10/", "0/s", "-1/s", "1.5/s", "10/ms", "10/0s", "10/w", 10, None]
)
def test_malformed_rates_are_refused_by_value(bad: Any) -> None:
    with pytest.raises(ConfigError, match="rate"):
        parse_rate(bad)


def test_bad_arguments_raise_config_error_and_write_nothing(space: Space) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: space.rate_limit("x", "fast"), "'fast'"),
        (lambda: space.rate_limit("x"), "needs a rate"),
        (lambda: space.rate_limit("", "1/s"), "name"),
        (lambda: space.rate_limit("a b", "1/s"), "name"),
        (lambda: space.rate_limit("a/held", "1/s"), "'/'"),
        (lambda: space.rate_limit("x", "1/s", burst=0), "burst"),
        (lambda: space.rate_limit("x", "1/s", burst=float("nan")), "burst"),
        (lambda: space.rate_limit("x", "1/s", burst={"tokens": 5}), "'tokens'"),
        (lambda: space.rate_limit("x", limits={"a": "1/s", "b": "2/s"}, burst=3), "ambiguous"),
        (lambda: space.rate_limit("x", limits={"a/b": "1/s"}), "'/'"),
        (lambda: space.rate_limit("x", limits={}), "limits"),
        (lambda: space.rate_limit("x", "1/s", limits={"rate": "2/s"}), "twice"),
        (lambda: space.rate_limit("x", "1/s", concurrency=0), "concurrency"),
        (lambda: space.rate_limit("x", "1/s", concurrency=True), "concurrency"),
        (lambda: space.rate_limit("x", "1/s", ttl=-1), "ttl"),
        (lambda: space.rate_limit("x", concurrency=1, ttl=0.01), "ttl=0.01"),  # below a lease's
        (lambda: space.rate_limit("x", concurrency=1, ttl=1e12), "ttl=1000000000000"),
        (lambda: space.rate_limit("x", concurrency=1, ttl=True), "ttl=True"),
        (lambda: space.rate_limit("x", concurrency=1, ttl=float("nan")), "ttl=nan"),
        (lambda: space.rate_limit("x", "99999999999999999999/s"), "too fast"),
        (lambda: space.rate_limit("x", "1/0.0000001s"), "too fast"),
        (lambda: space.rate_limit("x", "1/s", bogus=1), "bogus"),
    ]
    for make, needle in cases:
        with pytest.raises((ConfigError, TypeError), match=needle):
            make()
    limiter = space.rate_limit("x", limits={"requests": "5/s", "tokens": "100/s"})
    for cost, needle in [
        (-1, "-1"),
        ("1", "'1'"),
        (True, "True"),
        ({"bogus": 1}, "'bogus'"),
        ({"tokens": -2}, "-2"),
        (101, "can never fit"),
        ({"tokens": 150}, "can never fit"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            limiter.try_acquire(cost)
        with pytest.raises(ConfigError, match=needle):
            limiter.acquire(cost, wait=1)
    for wait in (-1, 1e12, float("nan"), True):  # every wait is checked as locks check it
        with pytest.raises(ConfigError, match="wait="):
            limiter.acquire(1, wait=wait)
    assert parse_rate("1000000/s").interval == 1e-6  # the fastest rate accepted
    assert space.store.kv.scan(KEY_PREFIX) == []


# -- the budget ------------------------------------------------------------------


def test_burst_then_steady_rate(space: Space) -> None:
    limiter = space.rate_limit("api", "10/s", burst=3)
    permits = [limiter.try_acquire() for _ in range(4)]
    assert all(permits[:3]) and permits[3] is None
    began = time.monotonic()
    permit = limiter.acquire(wait=2)
    waited = time.monotonic() - began
    # Admitted one interval (0.1 s) after the burst began on the lease clock
    # (the wall time waited is less when the three took a while), never late.
    assert permit.admitted_at - permits[0].admitted_at >= 0.1 - 1e-5
    assert waited < 1.0, waited
    assert permit.cost == {"rate": 1.0} and permit.lease is None


def test_default_burst_is_two_units(space: Space) -> None:
    limiter = space.rate_limit("api", "5/h")
    assert limiter.limits["rate"].burst == DEFAULT_BURST == 2
    assert limiter.try_acquire() is not None and limiter.try_acquire() is not None
    assert limiter.try_acquire() is None
    tokens = space.rate_limit("tokens", "90000/m")
    with pytest.raises(ConfigError, match="can never fit its burst of 2; raise burst"):
        tokens.try_acquire(1200)  # weighted costs need a burst of their own


def test_default_burst_keeps_the_issue_figure() -> None:
    """Issue 8's figure with the default burst: 4 callers hammering "600/m"
    for 60 s (a manual clock, 20 ms steps) are admitted 600 +- 2% in all."""
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    callers = [RateLimiter(space, "openai", "600/m") for _ in range(4)]
    began, admitted = clock.now(), 0
    while clock.now() - began < 60.0:
        admitted += sum(1 for c in callers if c.try_acquire() is not None)
        clock.advance(0.02)
    assert 588 <= admitted <= 612, admitted  # the count (600) as burst admitted 1201


def test_weighted_costs(space: Space) -> None:
    limiter = space.rate_limit("llm", "1000/s", burst=500)
    first = limiter.try_acquire(400)
    assert first is not None
    assert limiter.try_acquire(200) is None  # 100 left
    assert limiter.try_acquire(50) is not None
    began = time.monotonic()
    permit = limiter.acquire(200, wait=2)  # 50 left: 150 more units take 0.15 s
    assert permit.admitted_at - first.admitted_at >= 0.15 - 1e-5  # on the lease clock
    assert time.monotonic() - began < 1.0


def test_several_limits_are_charged_together_or_not_at_all(space: Space) -> None:
    limiter = space.rate_limit(
        "openai",
        limits={"requests": "5/s", "tokens": "100/s"},
        burst={"requests": 5, "tokens": 100},
    )
    began = time.monotonic()
    assert limiter.try_acquire({"requests": 1, "tokens": 80}) is not None
    before = limiter.available()
    assert limiter.try_acquire({"requests": 1, "tokens": 50}) is None  # tokens refuse
    after = limiter.available()
    assert after["requests"] >= before["requests"] - 0.01  # nothing charged
    refilled = 5 * (time.monotonic() - began)  # 5/s flows back meanwhile
    assert 4.0 - 0.01 <= after["requests"] <= 4.0 + refilled + 0.01  # one charged
    permit = limiter.try_acquire({"requests": 2})  # tokens not named: not charged
    assert permit is not None and permit.cost == {"requests": 2.0}
    assert limiter.try_acquire(1) is not None  # a number charges every limit
    with pytest.raises(RateLimited) as caught:
        limiter.acquire({"tokens": 90}, wait=0)
    # 81 of 100 tokens spent, 90 needed: 0.71 s at 100/s, less what flowed back.
    retry_after, elapsed = caught.value.retry_after, time.monotonic() - began
    assert retry_after is not None and 0.71 - elapsed - 0.01 <= retry_after <= 0.72
    assert "tokens" in str(caught.value)


def test_try_acquire_never_blocks_and_a_short_wait_fails_fast(space: Space) -> None:
    limiter = space.rate_limit("slow", "1/h", burst=1)
    assert limiter.try_acquire() is not None
    began = time.monotonic()
    for _ in range(5):
        assert limiter.try_acquire() is None
    with pytest.raises(RateLimited) as caught:
        limiter.acquire(wait=3)  # an hour away: known at once, never slept on
    assert time.monotonic() - began < 1.0
    assert caught.value.retry_after == pytest.approx(3600, abs=5)


def test_acquire_returns_within_its_wait(space: Space) -> None:
    limiter = space.rate_limit("half", "2/s", burst=1)
    before_first = time.monotonic()
    first = limiter.acquire()
    began = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        limiter.acquire(wait=0.2)
    assert time.monotonic() - began < 0.2
    retry_after, elapsed = caught.value.retry_after, time.monotonic() - before_first
    assert retry_after is not None and 0.5 - elapsed - 0.01 <= retry_after <= 0.51
    second = limiter.acquire(wait=1.0)
    assert second.admitted_at - first.admitted_at >= 0.5 - 1e-5  # on the lease clock
    assert time.monotonic() - began < 1.0


class Counting:
    """A store proxy counting the calls of its kv and clock."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()
        self.kv = self._wrap(store.kv, "kv")
        self.clock = self._wrap(store.clock, "clock")

    def _wrap(self, target: Any, label: str) -> Any:
        outer = self

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(target, name)
                if not callable(attr):
                    return attr

                def call(*args: Any, **kwargs: Any) -> Any:
                    outer.calls[f"{label}.{name}"] += 1
                    return attr(*args, **kwargs)

                return call

        return Proxy()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_blocked_waiter_sleeps_without_polling(space: Space) -> None:
    """A waiter about 2 s away from its budget makes a handful of store calls;
    another process's charge meanwhile wakes it, and it re-plans from the feed."""
    other = space.rate_limit("quiet", "1/s", burst=1)  # another process's instance
    first = other.acquire()
    counting = Counting(space.store)
    limiter = RateLimiter(SimpleNamespace(store=counting), "quiet", "1/s", burst=1)  # type: ignore[arg-type]
    timer = threading.Timer(0.3, other.reserve, args=("ahead",))  # charges the next second
    timer.start()
    began = time.monotonic()
    permit = limiter.acquire(wait=5)
    waited = time.monotonic() - began
    timer.join()
    total = sum(counting.calls.values())
    print(f"\nwaited {waited:.2f} s with {total} store calls: {dict(counting.calls)}")
    # Behind the other's reservation: 2 s after its first admission (lease clock).
    assert permit.admitted_at - first.admitted_at >= 2.0 - 1e-5
    assert waited < 3.0, waited
    assert counting.calls["kv.wait"] >= 2  # slept on the store, woken by the charge
    assert total <= 20, counting.calls
    assert permit.admitted_at > 0


def test_concurrency_slots(space: Space) -> None:
    limiter = space.rate_limit("gpu", "1000/s", concurrency=2, ttl=5)
    a, b = limiter.acquire(wait=2), limiter.acquire(wait=2)
    assert a.lease is not None and a.held
    assert limiter.try_acquire() is None
    with pytest.raises(RateLimited, match="concurrency"):
        limiter.acquire(wait=0.1)
    threading.Timer(0.3, a.release).start()
    began = time.monotonic()
    with limiter.acquire(wait=5) as c:  # woken by the release
        assert c.held and 0.2 < time.monotonic() - began < 3.0
    assert not c.held
    a.release()  # idempotent
    b.release()
    only = space.rate_limit("pool", concurrency=1)  # a concurrency limit alone
    with only.acquire(wait=1):
        assert only.try_acquire() is None
    assert only.try_acquire() is not None


def test_async_variants(space: Space) -> None:
    limiter = space.rate_limit("aio", "20/s", burst=2, concurrency=3)

    async def main() -> list[float]:
        stamps = []
        for _ in range(4):
            async with await limiter.acquire_async(wait=2) as permit:
                stamps.append(permit.admitted_at)
        assert await limiter.try_acquire_async() is None  # the budget is spent
        with pytest.raises(RateLimited):
            await limiter.acquire_async(2, wait=0.01)
        slow = space.rate_limit("aio-slow", "1/m", burst=1, concurrency=1)
        first = await slow.try_acquire_async()  # the budget: spent for a minute
        assert first is not None
        await asyncio.to_thread(first.release)
        task = asyncio.ensure_future(slow.acquire_async())  # takes the slot, waits for budget
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return stamps

    stamps = asyncio.run(main())
    assert stamps[-1] - stamps[0] >= 0.09  # 4 admissions of burst 2 at 20/s
    given_back = time.monotonic() + 2.0  # the cancelled call's slot: released on a thread
    while space.store.leases.holders("ratelimit/aio-slow") and time.monotonic() < given_back:
        time.sleep(0.02)
    assert space.store.leases.holders("ratelimit/aio-slow") == []
    assert space.store.leases.holders("ratelimit/aio") == []


@pytest.mark.timeout(20)
def test_cancelled_async_waits_hold_no_thread_queue_place_or_slot(space: Space) -> None:
    """The review's proof: 8 acquire_async() cancelled by wait_for while the
    one slot is held used to fill the loop's default executor (an unrelated
    to_thread never ran, asyncio.run hung at exit) and keep their queue places."""
    limiter = space.rate_limit("gpu", concurrency=1, ttl=5)
    holder = limiter.try_acquire()
    assert holder is not None

    async def main() -> float:
        for _ in range(8):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(limiter.acquire_async(), 0.2)
        began = time.monotonic()
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 1), 2.0) == 1
        assert time.monotonic() - began < 1.0
        gone = time.monotonic() + 3.0  # their threads stop within about 0.5 s
        while space.store.kv.scan("taskspace/locks/", limit=100) and time.monotonic() < gone:
            await asyncio.sleep(0.05)
        assert [k for k, _ in space.store.kv.scan("taskspace/locks/", limit=100)
                if "/q/" in k] == []  # fmt: skip
        await asyncio.to_thread(holder.release)
        began = time.monotonic()
        async with await limiter.acquire_async(wait=3):  # no cancelled waiter ahead of it
            return time.monotonic() - began

    took = asyncio.run(main())  # returns: nothing left for shutdown_default_executor
    assert took < 1.0, took
    assert space.store.leases.holders("ratelimit/gpu") == []


# -- the guarantee -----------------------------------------------------------------


def test_gcra_bound_holds_for_random_weighted_demand() -> None:
    """A manual clock: random costs at random times against two limits; every
    window of admissions stays within rate * window + burst, for each limit."""
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    limiter = space.rate_limit(
        "model",
        limits={"requests": "30/s", "tokens": "1000/s"},
        burst={"requests": 5, "tokens": 1000},
    )
    rng = random.Random(7)
    admitted: dict[str, list[tuple[float, float]]] = {"requests": [], "tokens": []}
    refused = 0
    for _ in range(3000):
        clock.advance(rng.expovariate(80))
        cost = {"requests": 1, "tokens": rng.randint(1, 400)}
        permit = limiter.try_acquire(cost)
        if permit is None:
            refused += 1
            continue
        for name, value in permit.cost.items():
            admitted[name].append((permit.admitted_at, value))
    assert refused > 500
    assert within_bound(admitted["requests"], 30, 5)
    assert within_bound(admitted["tokens"], 1000, 1000)
    elapsed = clock.now() - 1000.0
    assert len(admitted["requests"]) > 0.5 * 30 * elapsed  # the budget is used


def test_reservations_defer_each_holder_once() -> None:
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    limiter = space.rate_limit("tasks", "1/s", burst=1)
    assert limiter.reserve("t1").delay == 0.0  # admitted now
    r2 = limiter.reserve("t2")
    r3 = limiter.reserve("t3")
    assert (r2.delay, r2.held, r3.delay, r3.held) == (1.0, True, 2.0, True)
    assert limiter.reserve("t2").delay == 1.0  # early: still the same moment, not charged again
    assert limiter.try_acquire() is None
    clock.advance(1.0)
    assert limiter.reserve("t2").delay == 0.0  # its moment: consumed
    assert limiter.reserve("t4").delay == pytest.approx(2.0)  # behind t3
    clock.advance(1.0 + 2.5)  # t3 comes 2.5 s late: void, decided afresh
    again = limiter.reserve("t3")
    assert (again.charged, again.delay, again.held) == (True, 0.0, False)  # charged anew
    assert limiter.try_acquire() is None
    assert space.store.kv.get(f"{KEY_PREFIX}tasks/held/t3") is None  # the void one is gone
    near = space.rate_limit("near", "10/s", burst=1)
    near.try_acquire()
    short = near.reserve("x", hold_after=0.5)
    assert (short.delay, short.held, short.charged) == (pytest.approx(0.1), False, True)
    far = space.rate_limit("far", "1/h", burst=1)
    far.try_acquire()
    assert far.reserve("y", horizon=60).charged is False


def test_overdue_reservations_never_start_in_a_bunch() -> None:
    """Holders that come back late (their worker was busy) are decided afresh:
    at most one cost's worth of grace, so starts keep within rate x W + burst
    + 1 (the review's proof had 19 of them admitted in one instant)."""
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    limiter = space.rate_limit("api", "10/s", burst=1)
    first = [limiter.reserve(f"t{i}", hold_after=0.5) for i in range(25)]
    assert sum(r.held for r in first) >= 19 and all(r.held for r in first[6:])
    clock.advance(2.45)
    now = clock.now()
    again = [limiter.reserve(f"t{i}", hold_after=0.5) for i in range(25)]
    starts = [(now + r.delay, 1.0) for r in again if r.charged and not r.held]
    assert sum(1 for at, _ in starts if at == now) <= 2
    assert within_bound(starts, 10, 1 + 1)
    assert again[24].delay == 0.0  # 0.05 s late: within its grace (0.1 s), consumed


def test_a_hold_near_its_moment_is_consumed_and_waited_for() -> None:
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    limiter = space.rate_limit("api", "1/s", burst=1)
    limiter.try_acquire()
    held = limiter.reserve("t", hold_after=0.5)
    assert held.held and held.delay == pytest.approx(1.0)
    clock.advance(0.3)
    assert limiter.reserve("t", hold_after=0.5).held  # 0.7 s early: still held
    clock.advance(0.3)
    near = limiter.reserve("t", hold_after=0.5)  # 0.4 s early: consumed, wait the rest
    assert (near.held, near.charged, near.delay) == (False, True, pytest.approx(0.4))
    assert near.at == pytest.approx(held.at)
    assert space.store.kv.get(f"{KEY_PREFIX}api/held/t") is None
    with pytest.raises(ConfigError, match="holder"):
        limiter.reserve("")


# -- faults ----------------------------------------------------------------------------


class DownKV:
    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise BackendError("backend unreachable (test)")

        return fail


def test_backend_down_raises_and_never_admits(space: Space) -> None:
    limiter = space.rate_limit("down", "100/s")
    real = space.store
    broken = Counting(real)
    broken.kv = DownKV()
    space._store = broken  # type: ignore[assignment]
    try:
        with pytest.raises(BackendError):
            limiter.try_acquire()
        began = time.monotonic()
        with pytest.raises(BackendError):
            limiter.acquire(wait=1)
        assert time.monotonic() - began < 1.0
    finally:
        space._store = real
    assert limiter.try_acquire() is not None  # back: works again


def test_rate_limiter_repr_and_binding(space: Space, tmp_path: Any) -> None:
    limiter = RateLimiter(space, "r", "3/m", concurrency=2)
    assert "3/m" in repr(limiter) and "concurrency=2" in repr(limiter)
    other = Space("memory://")
    bound = limiter.bound_to(other)
    assert bound.space is other and bound.limits == limiter.limits
    assert bound.try_acquire() is not None
    other.close()


def test_redis_down_raises_backend_error_within_the_wait_and_recovers() -> None:
    """A real, killed Redis: every acquire raises BackendError at once (never
    admitted without the store, never past its wait); after a restart it works."""
    from tests.services import RedisServer

    server = RedisServer().start()
    try:
        space = Space(server.namespaced_url())
        limiter = space.rate_limit("down", "1/s", burst=1)
        limiter.acquire()
        server.kill()
        for wait in (0.0, 0.5, 2.0):
            began = time.monotonic()
            with pytest.raises(BackendError):
                limiter.acquire(wait=wait)
            assert time.monotonic() - began <= wait + 0.5
        with pytest.raises(BackendError):
            limiter.try_acquire()
        server.restart()
        assert limiter.acquire(wait=5).admitted_at > 0
        space.close()
    finally:
        server.close()
