"""``python -m bench cache``: the two-level cache and memoization, in one run.

1. **Hit rates** of the eviction policies against cachetools and Bélády's
   optimum (:mod:`bench.cache_policies`, owned by the policies work).
2. **Read-through requests/s in process**, LRU mode: ``cache.get_or_set`` of
   keys held in L1 (the hit path; target >= 1,000,000/s), beside a
   ``cachetools.LRUCache`` under a lock doing the same, and the zipf stream
   read through ``space.cache`` on ``memory://`` (misses go to L2).
3. **Invalidation visibility across processes** on a private redis-server
   (and SQLite): the parent ``set``s a key; a child process with the same
   cache reports when its listener has applied the change; latency from the
   ``set`` returning (p50/p99; target p99 <= 5 ms on Redis).
4. **Cost of one invalidation at 100,000 L1 entries** (target <= 5 µs):
   ``Cache._apply`` of one change (lock, policy lookup, pop) for the
   ``lru`` and ``tinylfu`` policies, beside redis-py's client-side cache
   (``redis.cache.DefaultCache.delete_by_redis_keys``, the code its
   invalidation push runs) filled with the same number of entries.
5. **Memoization**: a second identical call from another process on Redis
   (an L2 hit: p50 target <= 1 ms), the first call (compute and store) and
   an L1 hit.

Medians are quoted; each figure's run count is in its table.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click
from rich.console import Console
from rich.table import Table

from bench.redis_server import RedisServer
from bench.workers import BenchError
from taskspace import Space
from taskspace.backends.base import Change
from taskspace.state.cache import Cache

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE_CONSOLE = 160


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _wait_fresh(cache: Cache, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    cache.get("warm-up")
    while not cache._fresh:
        if time.monotonic() > deadline:
            raise BenchError(f"cache {cache.name} never caught up with the feed")
        time.sleep(0.005)


# -- 2. read-through in process -------------------------------------------------------


def _rate(repeat: int, n: int, run: Callable[[], object]) -> float:
    """Median calls/s of ``run`` (``n`` calls each) over ``repeat`` runs."""
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _cachetools_rate(held: list[str], capacity: int, rounds: int, repeat: int) -> float:
    """The same hit loop over a cachetools LRUCache under a lock (a read-through)."""
    import cachetools

    lru: cachetools.LRUCache[str, str] = cachetools.LRUCache(capacity)
    for key in held:
        lru[key] = key
    lock = threading.Lock()

    def get_or_set(key: str) -> str:
        with lock:
            found = lru.get(key)
        if found is None:
            found = key
            with lock:
                lru[key] = found
        return found

    def run() -> None:
        for _ in range(rounds):
            for key in held:
                get_or_set(key)

    return _rate(repeat, rounds * len(held), run)


def read_through(requests: int, keys: int, capacity: int, repeat: int) -> dict[str, Any]:
    """requests/s of the L1 hit path (get_or_set of held keys), a locked
    cachetools LRUCache doing the same, and the zipf read-through."""
    from bench.cache_policies import zipf_stream

    space = Space("memory://")
    try:
        cache = space.cache("bench-hits", policy="lru", capacity=capacity)
        held = [f"k{i}" for i in range(min(1000, capacity))]
        for key in held:
            cache.set(key, key)
        _wait_fresh(cache)
        for key in held:
            cache.get(key)  # filled again after the listener's start
        get_or_set, load = cache.get_or_set, str
        rounds = max(1, requests // len(held))

        def hits() -> None:
            for _ in range(rounds):
                for key in held:
                    get_or_set(key, load)

        hit_rate = _rate(repeat, rounds * len(held), hits)
        if cache.stats().l1_hits < rounds * len(held) * repeat:
            raise BenchError(f"the hit path missed L1: {cache.stats()}")
        zcache = space.cache("bench-zipf", policy="lru", capacity=capacity)
        _wait_fresh(zcache)
        stream = [f"z{k}" for k in zipf_stream(requests, keys, 0)]
        zget = zcache.get_or_set

        def zipf() -> None:
            for key in stream:
                zget(key, load)

        z_rate = _rate(1, len(stream), zipf)
        z = zcache.stats()
    finally:
        space.close()
    return {
        "hit_rate_s": hit_rate,
        "cachetools_rate_s": _cachetools_rate(held, capacity, rounds, repeat),
        "zipf_rate_s": z_rate,
        "zipf_l1": z.l1_hits / len(stream),
        "zipf_hit": z.hit_rate,
    }


# -- 3. visibility across processes ------------------------------------------------------


def _visibility_child(url: str) -> None:
    """The child: report each change its listener applies, with the time."""
    space = Space(url)
    cache = space.cache("bench-vis")
    out = sys.stdout

    def probe(changes: list[Change]) -> None:
        now = time.monotonic()
        for change in changes:
            out.write(f"{change.version} {now!r}\n")
        out.flush()

    cache._on_apply = probe
    _wait_fresh(cache)
    out.write("ready\n")
    out.flush()
    sys.stdin.readline()  # the parent closes stdin when done
    space.close()


def _child(target: str, *args: str) -> subprocess.Popen[str]:
    code = f"import bench.cache as b; b.{target}(*{list(args)!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip


def visibility(url: str, n: int, warmup: int) -> dict[str, Any]:
    """p50/p99 from a set returning to the other process applying it (ms)."""
    child = _child("_visibility_child", url)
    space = Space(url)
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            raise BenchError("the visibility child did not start")
        cache = space.cache("bench-vis")
        samples = []
        for i in range(n + warmup):
            version = cache.set("k", i)
            done = time.monotonic()
            while True:
                line = child.stdout.readline()
                if not line:
                    raise BenchError("the visibility child died")
                seen, at = line.split()
                if int(seen) >= version:
                    break
            if i >= warmup:
                samples.append((float(at) - done) * 1000)
        child.stdin.close()
        child.wait(10)
    finally:
        space.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    return {"p50": _pct(samples, 0.5), "p99": _pct(samples, 0.99), "max": max(samples), "n": n}


# -- 4. one invalidation at 100,000 entries -------------------------------------------


def invalidation_cost(entries: int, n: int, repeat: int) -> dict[str, float]:
    """µs per invalidation applied (median of ``repeat`` runs of ``n``)."""
    out: dict[str, float] = {}
    space = Space("memory://")
    try:
        for policy in ("lru", "tinylfu"):
            cache = space.cache(f"bench-inv-{policy}", policy=policy, capacity=entries)
            runs = []
            for r in range(repeat):
                cache._l1.clear()
                for i in range(entries):
                    cache._l1.put(f"k{i}", (i, 1))
                changes = [Change(2 + i, f"{cache.prefix}k{i * (entries // n)}", "put", 2)
                           for i in range(n)]  # fmt: skip
                if r == 0 and len(cache._l1) < entries * 0.9:
                    raise BenchError(f"{policy}: L1 holds {len(cache._l1)} of {entries}")
                apply = cache._apply
                start = time.perf_counter()
                for change in changes:
                    apply([change])
                runs.append((time.perf_counter() - start) / n * 1e6)
            if cache.stats().invalidations == 0:
                raise BenchError("no L1 entry was invalidated")
            out[policy] = statistics.median(runs)
    finally:
        space.close()
    out["redis-py"] = _redis_py_cost(entries, max(1, min(n, 50)), repeat)
    return out


def _redis_py_cost(entries: int, n: int, repeat: int) -> float:
    """µs per key of redis-py's DefaultCache.delete_by_redis_keys at ``entries``."""
    from redis.cache import CacheConfig, CacheEntry, CacheEntryStatus, CacheKey, DefaultCache

    runs = []
    for _ in range(repeat):
        cache = DefaultCache(CacheConfig(max_size=entries + 1))
        for i in range(entries):
            key = CacheKey(command="GET", redis_keys=(f"k{i}",))
            cache.set(CacheEntry(key, b"v", CacheEntryStatus.VALID, None))
        start = time.perf_counter()
        for i in range(n):
            cache.delete_by_redis_keys([f"k{i * (entries // n)}".encode()])
        runs.append((time.perf_counter() - start) / n * 1e6)
        if len(cache.collection) != entries - n:
            raise BenchError("redis-py's cache did not drop the keys")
    return statistics.median(runs)


# -- 5. memoization -----------------------------------------------------------------------


def _memoized(space: Space) -> Callable[[int], int]:
    @space.cached(ttl=600, name="bench.cache.square")
    def square(x: int) -> int:
        return x * x

    return cast(Callable[[int], int], square)


def _memo_child(url: str, n: str) -> None:
    """The child: time the second (identical) call of each x, then an L1 hit."""
    space = Space(url)
    square = _memoized(space)
    square(-1)  # warm-up: connections, scripts, the lease keeper (computed here)
    l2, l1 = [], []
    for x in range(int(n)):
        start = time.perf_counter()
        if square(x) != x * x:
            raise BenchError("wrong memoized value")
        l2.append((time.perf_counter() - start) * 1000)
    for x in range(int(n)):
        start = time.perf_counter()
        square(x)
        l1.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"l2": l2, "l1": l1}), flush=True)
    space.close()


def memoization(url: str, n: int) -> dict[str, float]:
    space = Space(url)
    try:
        square = _memoized(space)
        square(-2)  # warm-up: connections, scripts, the lease keeper
        first = []
        for x in range(n):
            start = time.perf_counter()
            square(x)
            first.append((time.perf_counter() - start) * 1000)
    finally:
        space.close()
    child = _child("_memo_child", url, str(n))
    out, _ = child.communicate(timeout=120)
    if child.returncode != 0:
        raise BenchError("the memo child failed")
    rep = json.loads(out.strip().splitlines()[-1])
    return {"first_p50": _pct(first, 0.5), "l2_p50": _pct(rep["l2"], 0.5),
            "l2_p99": _pct(rep["l2"], 0.99), "l1_p50": _pct(rep["l1"], 0.5), "n": n}  # fmt: skip


# -- the command --------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]missed[/]"


@click.command()
@click.option("--requests", default=300_000, show_default=True, type=click.IntRange(min=1000),
              help="Requests of the hit-rate replays and of each read-through run.")  # fmt: skip
@click.option("--keys", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option("--capacity", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs of the in-process measures; medians are quoted.")  # fmt: skip
@click.option("--writes", default=500, show_default=True, type=click.IntRange(min=10),
              help="Timed writes of the visibility measure (per backend).")  # fmt: skip
@click.option("--entries", default=100_000, show_default=True, type=click.IntRange(min=100),
              help="L1 entries for the invalidation cost.")  # fmt: skip
@click.option("--calls", default=1000, show_default=True, type=click.IntRange(min=10),
              help="Memoized calls timed (per phase).")  # fmt: skip
@click.option("--skip-hit-rates", is_flag=True, help="Leave out the policies' hit-rate table.")
def cli(requests: int, keys: int, capacity: int, repeat: int, writes: int, entries: int,
        calls: int, skip_hit_rates: bool) -> None:  # fmt: skip
    """The cache: hit rates, read-through speed, invalidation across processes
    and its cost, memoization across processes."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE_CONSOLE)
    try:
        _run(console, requests, keys, capacity, repeat, writes, entries, calls, skip_hit_rates)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)


def _run(console: Console, requests: int, keys: int, capacity: int, repeat: int, writes: int,
         entries: int, calls: int, skip_hit_rates: bool) -> None:  # fmt: skip
    if not skip_hit_rates:
        from bench.cache_policies import print_hit_rates

        print_hit_rates(console, requests, keys, capacity)

    rt = read_through(requests, keys, capacity, repeat)
    table = Table(title=f"Read-through in process (LRU, medians of {repeat} runs)")
    for col in ("what", "requests/s", "target"):
        table.add_column(col, justify="right" if col != "what" else "left")
    table.add_row("space.cache get_or_set, L1 hit", f"{rt['hit_rate_s']:,.0f}",
                  f">= 1,000,000 {_mark(rt['hit_rate_s'] >= 1e6)}")  # fmt: skip
    table.add_row("cachetools LRUCache + lock, hit", f"{rt['cachetools_rate_s']:,.0f}", "")
    table.add_row(f"space.cache zipf read-through (memory://, hit rate {rt['zipf_hit']:.3f},"
                  f" L1 {rt['zipf_l1']:.3f})", f"{rt['zipf_rate_s']:,.0f}", "")  # fmt: skip
    console.print(table)

    inv = invalidation_cost(entries, 2000, repeat)
    table = Table(title=f"Applying one invalidation at {entries:,} L1 entries (µs, median of"
                        f" {repeat} runs)")  # fmt: skip
    table.add_column("cache")
    table.add_column("µs / invalidation", justify="right")
    table.add_column("target", justify="right")
    for name in ("lru", "tinylfu"):
        table.add_row(f"space.cache ({name})", f"{inv[name]:.2f}", f"<= 5 {_mark(inv[name] <= 5)}")
    table.add_row("redis-py client-side cache (DefaultCache)", f"{inv['redis-py']:,.0f}",
                  "")  # fmt: skip
    console.print(table)

    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="ts-bench-cache-") as tmp:
        console.print(f"[dim]redis-server {server.version} on {server.url}[/]")
        targets = {"redis": server.url, "sqlite": f"sqlite:///{tmp}/space.db"}
        table = Table(title=f"Invalidation visible in another process ({writes} writes, ms"
                            " after set returned)")  # fmt: skip
        for col in ("backend", "p50", "p99", "max", "target"):
            table.add_column(col, justify="right" if col != "backend" else "left")
        for name, url in targets.items():
            vis = visibility(url, writes, 20)
            target = f"p99 <= 5 {_mark(vis['p99'] <= 5)}" if name == "redis" else ""
            table.add_row(name, f"{vis['p50']:.2f}", f"{vis['p99']:.2f}", f"{vis['max']:.1f}",
                          target)  # fmt: skip
        console.print(table)

        memo = memoization(server.url, calls)
        table = Table(title=f"Memoization on Redis ({calls} distinct calls, ms)")
        table.add_column("call")
        table.add_column("p50", justify="right")
        table.add_column("target", justify="right")
        table.add_row("first call (compute, store, lease)", f"{memo['first_p50']:.3f}", "")
        table.add_row(f"same call, another process (L2; p99 {memo['l2_p99']:.3f})",
                      f"{memo['l2_p50']:.3f}", f"<= 1 {_mark(memo['l2_p50'] <= 1)}")  # fmt: skip
        table.add_row("same call again there (L1)", f"{memo['l1_p50']:.4f}", "")
        console.print(table)


if __name__ == "__main__":
    cli()
