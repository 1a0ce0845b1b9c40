"""One budget across real processes: 4 processes hammer one limiter for ~3 s;
together they are admitted at most rate x T + burst, and at least 90% of it
(the memory backend lives in one process: there, 4 threads)."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from typing import Any

from taskspace import RateLimited, Space
from tests.coordination.test_ratelimit import within_bound, worst_excess

PROCESSES = 4
RUN_S = 3.0
RATE, PER_S, BURST = "60/s", 60.0, 10


def hammer(where: str | Space, ready: Any, go: Any, out: Any, run_s: float) -> None:
    """Acquire in a loop (demand far above the rate) until run_s has passed
    since the start signal; report the lease-clock stamps admitted."""
    space = Space(where) if isinstance(where, str) else where
    limiter = space.rate_limit("shared", RATE, burst=BURST)
    space.store.clock.now()  # connected before the start
    ready.put(1)
    go.wait(30)
    end = time.monotonic() + run_s
    stamps: list[float] = []
    calls = 0
    while time.monotonic() < end:
        calls += 1
        permit = limiter.try_acquire() if calls % 2 else None  # some callers poll,
        if permit is None:
            try:  # the others block, never past the end
                permit = limiter.acquire(wait=max(0.0, end - time.monotonic()))
            except RateLimited:  # the end of the run
                break
        stamps.append(permit.admitted_at)
    out.put(stamps)
    if isinstance(where, str):
        space.close()


class _Queue:
    """queue.Queue with multiprocessing's get(timeout=) call shape."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()

    def put(self, item: Any) -> None:
        self._q.put(item)

    def get(self, timeout: float) -> Any:
        return self._q.get(timeout=timeout)


def _collect(space: Space, ready: Any, go: Any, out: Any, workers: list[Any]) -> Any:
    for _ in workers:
        ready.get(timeout=30)
    start = space.store.clock.now()
    go.set()
    stamps = [s for _ in workers for s in out.get(timeout=30)]
    end = space.store.clock.now()
    for w in workers:
        w.join(timeout=10)
    return stamps, start, end


def test_four_processes_share_one_budget(space: Space) -> None:
    if space.scheme == "memory":  # one store per process: 4 threads share it
        ready, out, go = _Queue(), _Queue(), threading.Event()
        workers: list[Any] = [
            threading.Thread(target=hammer, args=(space, ready, go, out, RUN_S))
            for _ in range(PROCESSES)
        ]
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        workers = [ctx.Process(target=hammer, args=(space.url, ready, go, out, RUN_S))
                   for _ in range(PROCESSES)]  # fmt: skip
    for w in workers:
        w.start()
    stamps, start, _ = _collect(space, ready, go, out, workers)
    assert all(getattr(w, "exitcode", 0) == 0 for w in workers)
    window = max(stamps) - start if stamps else 0.0
    bound = PER_S * window + BURST
    admitted = len(stamps)
    print(f"\n{space.scheme}: {PROCESSES} x {RUN_S:.0f} s on {RATE} burst {BURST}:"
          f" admitted {admitted} in {window:.2f} s; bound rate x T + burst = {bound:.1f}"
          f" ({admitted / bound:.1%} of it)")  # fmt: skip
    assert all(s >= start - 1e-6 for s in stamps)
    assert admitted <= bound + 1e-6
    costed = [(s, 1.0) for s in stamps]
    assert within_bound(costed, PER_S, BURST), (
        f"a window admitted {worst_excess(costed, PER_S, BURST):.6f} beyond rate x W + burst"
    )
    assert admitted >= 0.9 * (PER_S * RUN_S + BURST)  # demand far above the rate
