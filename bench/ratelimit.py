"""Rate limit accuracy: P processes hammer one limiter for S seconds.

    python -m bench.ratelimit --backend sqlite|redis [--seconds 60] [--rate 600/m]
        [--burst N] [--processes 4]

``--burst`` defaults to the limiter's own default (DEFAULT_BURST, 2): the
issue's figure is "4 processes hammering '600/m' for 60 s are admitted
600 +- 2% in all" with the default burst.

Prints what was admitted in all against the budget (rate x S + burst), the
worst window of the run against the guarantee, and the store calls' cost
(admissions per second per process). redis starts a private redis-server.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from bench.redis_server import RedisServer
from taskspace import RateLimited, Space
from taskspace.coordination.ratelimit import RateLimiter


def limiter_of(space: Space, rate: str, burst: float | None) -> RateLimiter:
    """The benchmark's limiter; ``burst`` None: the default one."""
    return space.rate_limit("bench", rate, **({} if burst is None else {"burst": burst}))


def hammer(
    url: str, rate: str, burst: float | None, ready: Any, go: Any, out: Any, run_s: float
) -> None:
    """Acquire (blocking) until run_s after the start; report admitted stamps."""
    space = Space(url)
    limiter = limiter_of(space, rate, burst)
    space.store.clock.now()
    ready.put(1)
    go.wait(60)
    end = time.monotonic() + run_s
    stamps: list[float] = []
    while True:
        try:
            stamps.append(limiter.acquire(wait=max(0.0, end - time.monotonic())).admitted_at)
        except RateLimited:
            break
    out.put(stamps)
    space.close()


def worst_excess(stamps: list[float], per_s: float, burst: float) -> float:
    """The largest (admitted - (rate x window + burst)) over windows starting at an
    admission (<= 0: the guarantee held)."""
    stamps = sorted(stamps)
    worst = -burst
    for i, start in enumerate(stamps):
        for k in range(i, len(stamps)):
            worst = max(worst, (k - i + 1) - (per_s * (stamps[k] - start) + burst))
    return worst


def run(url: str, rate: str, burst: float | None, processes: int, seconds: float) -> None:
    space = Space(url)
    limiter = limiter_of(space, rate, burst)
    per_s = 1 / limiter.limits["rate"].rate.interval
    burst = limiter.limits["rate"].burst
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=hammer, args=(url, rate, burst, ready, go, out, seconds))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    start = space.store.clock.now()
    go.set()
    stamps = [s for _ in procs for s in out.get(timeout=seconds + 60)]
    for p in procs:
        p.join(timeout=10)
    budget = per_s * seconds + burst
    print(f"{space.scheme}: {processes} processes x {seconds:g} s on {rate!r} burst {burst:g}")
    print(f"  admitted {len(stamps)} in all; budget rate x S + burst = {budget:.1f}"
          f" ({(len(stamps) - budget) / budget:+.2%}); vs rate x S = {per_s * seconds:g}:"
          f" {(len(stamps) - per_s * seconds) / (per_s * seconds):+.2%}")  # fmt: skip
    if len(stamps) <= 20_000:
        excess = worst_excess(stamps, per_s, burst)
        print(f"  worst window excess over rate x W + burst: {excess:+.3f} (<= 0: held)")
    late = [s for s in stamps if s < start]
    print(f"  admissions stamped before the start: {len(late)}")
    space.close()


@click.command()
@click.option("--backend", type=click.Choice(["sqlite", "redis"]), default="sqlite")
@click.option("--seconds", default=60.0, show_default=True)
@click.option("--rate", default="600/m", show_default=True)
@click.option("--burst", type=float, default=None, help="default: the limiter's default (2)")
@click.option("--processes", default=4, show_default=True)
def main(backend: str, seconds: float, rate: str, burst: float | None, processes: int) -> None:
    """Rate limit accuracy across processes."""
    if backend == "redis":
        with RedisServer() as server:
            run(server.url, rate, burst, processes, seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{Path(tmp) / 'bench.db'}", rate, burst, processes, seconds)


if __name__ == "__main__":
    main()
