"""Races between processes (backends with ``multi_process``: SQLite, Redis):
optimistic txn increments lose no update, a capacity-3 lease is never held by
more than 3 at once, and blocking waits wake on another process's writes. The
bodies live in race_workers.py (spawned)."""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskspace.backends import open_store
from tests.conformance import race_workers
from tests.conftest import backend_url

PROCESSES = 8


def _url(backend: str, caps: Any, tmp_path: Path) -> str:
    if not caps.multi_process:
        pytest.skip(f"{backend} is in-process only")
    url = backend_url(backend, tmp_path)
    open_store(url).close()  # create the space once, before the processes race
    return url


def _run(fn: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn(*a, go)`` for each ``a`` in its own spawned process, released
    together by ``go`` once started; return their results in order."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=race_workers.run, args=(fn, a, go, out, i), daemon=True)
        for i, a in enumerate(args)
    ]
    for p in procs:
        p.start()
    go.set()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            i, ok, value = out.get(timeout=120)
            assert ok, f"process {i} failed:\n{value}"
            results[i] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [results[i] for i in range(len(args))]


def test_txn_increments_from_many_processes_lose_nothing(
    backend: str, caps: Any, tmp_path: Path
) -> None:
    url = _url(backend, caps, tmp_path)
    per = 1000  # ~3 s on SQLite, ~7 s on Redis (2 cores, spawn included)
    started = time.monotonic()
    results = _run(race_workers.txn_increments, [(url, per)] * PROCESSES)
    elapsed = time.monotonic() - started
    store = open_store(url)
    try:
        final = store.kv.get(race_workers.COUNTER)
        assert final is not None
        assert int(final.value) == PROCESSES * per
        assert sum(ok for ok, _ in results) == PROCESSES * per
        # every success is one revision (revisions need not be dense), conflicts none
        changes = store.kv.changes(race_workers.COUNTER, 0, limit=PROCESSES * per + 1)
        assert [int(c.value or b"") for c in changes] == list(range(1, PROCESSES * per + 1))
        revisions = [c.revision for c in changes]
        assert all(a < b for a, b in itertools.pairwise(revisions))
        assert [c.version for c in changes] == revisions
        assert store.kv.revision() == revisions[-1]
    finally:
        store.close()
    print(f"{PROCESSES} x {per} txn increments [{backend}]: {elapsed:.1f} s")  # a figure


def test_capacity_3_lease_is_never_held_by_more_than_3_processes(
    backend: str, caps: Any, tmp_path: Path
) -> None:
    url = _url(backend, caps, tmp_path)
    capacity = 3
    args = [(url, "race/lease", capacity, 3.0, i) for i in range(PROCESSES)]
    results = _run(race_workers.lease_contender, args)
    intervals = [iv for ivs, _, _ in results for iv in ivs]
    tokens = [t for _, ts, _ in results for t in ts]
    assert max(most for _, _, most in results) <= capacity
    assert len(intervals) >= PROCESSES  # there was contention to speak of
    assert sum(1 for ivs, _, _ in results if ivs) >= capacity  # several processes held it
    assert len(set(tokens)) == len(tokens)  # no token granted twice
    for ts in (ts for _, ts, _ in results):
        assert all(a < b for a, b in itertools.pairwise(ts))
    # Each interval lies inside its real hold, so at no instant may more than
    # `capacity` overlap (an end sorts before a start at the same instant).
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    held = peak = 0
    for _, step in events:
        held += step
        peak = max(peak, held)
    assert peak <= capacity, peak
    assert peak >= 2  # the slots were really shared
    store = open_store(url)
    try:
        assert store.leases.holders("race/lease") == []
    finally:
        store.close()


def test_blocking_waits_wake_on_writes_by_another_process(
    backend: str, caps: Any, tmp_path: Path
) -> None:
    url = _url(backend, caps, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    held, go = ctx.Event(), ctx.Event()
    steps = [ctx.Event() for _ in range(4)]
    proc = ctx.Process(target=race_workers.waker, args=(url, held, steps, go), daemon=True)
    proc.start()
    store = open_store(url)
    try:
        go.set()
        assert held.wait(60)
        rev = store.kv.revision()
        # (wait, the condition it waits for): waits may return early, so loop
        waits: list[tuple[Callable[[], object], Callable[[], bool]]] = [
            (lambda: store.leases.wait("w/lease", 10.0),
             lambda: store.leases.holders("w/lease") == []),
            (lambda: store.kv.wait("w/", rev, 10.0),
             lambda: store.kv.changes("w/", rev) != []),
            (lambda: store.streams.read("w", wait=10.0),
             lambda: store.streams.read("w") != []),
            (lambda: store.queue.wait_for_tasks(["w"], 10.0),
             lambda: store.queue.state("t-w") == "queued"),
        ]  # fmt: skip
        took = []
        for step, (wait, done) in zip(steps, waits, strict=True):
            start = time.monotonic()
            step.set()
            while not done():
                assert time.monotonic() - start < 10.0
                wait()
            took.append(time.monotonic() - start)
        # each woke soon after the write 0.1 s in, far before its 10 s timeout
        assert max(took) < 1.5, took
    finally:
        store.close()
        proc.join(10)
    assert proc.exitcode == 0
