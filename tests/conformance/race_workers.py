"""Bodies of the processes of test_races.py (importable, so they can be spawned)."""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from taskspace.backends import open_store
from taskspace.backends.base import Put, TaskSpec, VersionIs

COUNTER = "race/counter"


def txn_increments(url: str, n: int, go: Event) -> tuple[int, int]:
    """Add 1 to COUNTER ``n`` times by read, then txn(VersionIs + Put), retrying
    on conflict; return (successes, conflicts)."""
    store = open_store(url)
    conflicts = 0
    try:
        go.wait(60)
        for _ in range(n):
            while True:
                cur = store.kv.get(COUNTER)
                version = cur.version if cur is not None else None
                value = int(cur.value) if cur is not None else 0
                r = store.kv.txn([VersionIs(COUNTER, version)], [Put(COUNTER, b"%d" % (value + 1))])
                if r.ok:
                    break
                assert r.failed == 0
                conflicts += 1
        return n, conflicts
    finally:
        store.close()


def lease_contender(
    url: str, name: str, capacity: int, seconds: float, me: int, go: Event
) -> tuple[list[tuple[float, float]], list[int], int]:
    """Acquire and release a slot of ``name`` for ``seconds``; return the hold
    intervals (store clock, each inside the real hold: the start read after
    acquire returned, the end before release was called), the tokens granted,
    and the most holders one ``holders`` snapshot showed."""
    store = open_store(url)
    rng = random.Random(me)
    intervals: list[tuple[float, float]] = []
    tokens: list[int] = []
    most = 0
    try:
        go.wait(60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            grant = store.leases.acquire(name, f"p{me}", 30.0, capacity=capacity)
            if grant is None:
                most = max(most, len(store.leases.holders(name)))
                store.leases.wait(name, 0.05)
                continue
            start = store.clock.now()
            tokens.append(grant.token)
            most = max(most, len(store.leases.holders(name)))
            time.sleep(rng.random() * 0.003)  # the work done while holding
            end = store.clock.now()
            assert store.leases.release(grant) is True
            intervals.append((start, end))
        return intervals, tokens, most
    finally:
        store.close()


def run(fn: Callable[..., Any], args: tuple[Any, ...], go: Event, out: Queue[Any], i: int) -> None:
    """Process entry point: ``out.put((i, ok, result or traceback))``."""
    try:
        out.put((i, True, fn(*args, go)))
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        out.put((i, False, traceback.format_exc()))


def waker(url: str, held: Event, steps: list[Event], go: Event) -> None:
    """Hold a lease of "w/lease" (``held`` once it does), then for each step,
    0.1 s after the test sets it: release that lease, put "w/x", append to
    stream "w", push a task to queue "w"."""
    store = open_store(url)
    try:
        go.wait(60)
        grant = store.leases.acquire("w/lease", "waker", 30.0)
        assert grant is not None
        held.set()
        actions: list[Callable[[], Any]] = [
            lambda: store.leases.release(grant),
            lambda: store.kv.put("w/x", b"1"),
            lambda: store.streams.append("w", b"1"),
            lambda: store.queue.push([TaskSpec("t-w", "job", b"{}", queue="w")]),
        ]
        for step, action in zip(steps, actions, strict=True):
            assert step.wait(60)
            time.sleep(0.1)  # so the test is blocked by then
            action()
    finally:
        store.close()
