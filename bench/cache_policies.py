"""``python -m bench.cache_policies``: hit rates and speed of the in-process eviction policies.

**Hit rates.** A read-through client (``get``; on a miss ``put``) replays a
request stream over ``keys`` keys with ``capacity`` entries:

- *zipf*: ``requests`` requests, key ranks drawn from Zipf(1.0) over
  ``keys`` keys (p(rank r) ∝ 1/r, numpy, fixed ``seed``), rank r → key r;
- *zipf, shifting*: the same draws, but the rank → key mapping is a new
  random permutation at 4 points (every ``requests / 5`` requests), so the
  popular set changes 4 times.

Rows: taskspace's ``tinylfu``, ``lru`` and ``lfu`` (``make_policy``),
cachetools' ``LRUCache`` and ``LFUCache``, and Bélády's optimum (offline MIN:
on a miss with a full cache, evict the entry whose next use is farthest, or
bypass the new key if its own next use is farther still; next-use indices
and a lazy max-heap). Hit rate = hits / requests, the cold start included.

**Speed.** ``throughput`` (``lru_throughput``: LRU only): the read-through
loop over the zipf stream (requests/s, the Python loop included; a miss puts
the key itself, so no loader cost), and the hit path alone (``get`` of a
held key in a ``timeit`` loop, ns per call), for each policy; medians of
``repeat`` runs. These are the policies alone, without ``space.cache``'s lock
and bookkeeping (``python -m bench cache`` measures those).

cachetools is a benchmark/test-only dependency, never used by taskspace.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from taskspace.state.policies import MISSING, POLICIES, make_policy

SHIFTS = 4


@dataclass(frozen=True)
class Row:
    """One policy's hit rates on both streams (fractions of requests)."""

    name: str
    zipf: float
    shifting: float
    seconds: float  # wall time of both replays


@dataclass(frozen=True)
class Throughput:
    """Speed of one policy: read-through requests/s on the zipf stream, ns per hit."""

    name: str
    requests_per_s: float
    hit_ns: float
    hit_rate: float


def zipf_stream(
    requests: int, keys: int, seed: int = 0, shifts: int = 0, alpha: float = 1.0
) -> list[int]:
    """``requests`` keys in ``range(keys)`` with Zipf(``alpha``) rank popularity; with
    ``shifts``, the rank → key mapping is re-permuted at ``shifts`` evenly spaced points."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(requests), side="right")
    ranks = np.minimum(ranks, keys - 1)
    if not shifts:
        return [int(r) for r in ranks]
    out = np.empty(requests, dtype=np.int64)
    bounds = [requests * i // (shifts + 1) for i in range(shifts + 2)]
    for lo, hi in itertools.pairwise(bounds):
        mapping = rng.permutation(keys) if lo else np.arange(keys)
        out[lo:hi] = mapping[ranks[lo:hi]]
    return [int(k) for k in out]


def replay_policy(name: str, capacity: int, stream: Sequence[int]) -> int:
    """Hits of a read-through client of ``make_policy(name, capacity)`` over ``stream``."""
    policy = make_policy(name, capacity)
    get, put = policy.get, policy.put
    hits = 0
    for key in stream:
        if get(key) is MISSING:
            put(key, key)
        else:
            hits += 1
    return hits


def replay_cachetools(cls_name: str, capacity: int, stream: Sequence[int]) -> int:
    """Hits of a read-through client of ``cachetools.<cls_name>(capacity)``."""
    import cachetools

    cache: Any = getattr(cachetools, cls_name)(capacity)
    get = cache.get
    hits = 0
    for key in stream:
        if get(key, MISSING) is MISSING:
            cache[key] = key
        else:
            hits += 1
    return hits


def belady_hits(capacity: int, stream: Sequence[int]) -> int:
    """Hits of the offline optimum (Bélády's MIN with bypass) for ``capacity`` entries."""
    n = len(stream)
    never = n  # a next use past the end
    next_use = [never] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        key = stream[i]
        next_use[i] = last.get(key, never)
        last[key] = i
    held: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    hits = 0
    for i, key in enumerate(stream):
        nxt = next_use[i]
        if key in held:
            hits += 1
        elif len(held) >= capacity:
            while True:  # the held entry used farthest in the future
                far, victim = heap[0]
                if held.get(victim) == -far:
                    break
                heapq.heappop(heap)
            if nxt >= -far:  # the new key is needed later than any held one: bypass
                continue
            heapq.heappop(heap)
            del held[victim]
        if nxt == never:  # never used again: holding it is useless
            held.pop(key, None)
            continue
        held[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return hits


def _contenders() -> list[tuple[str, Callable[[int, Sequence[int]], int]]]:
    rows: list[tuple[str, Callable[[int, Sequence[int]], int]]] = [
        (f"taskspace {name}", lambda c, s, name=name: replay_policy(name, c, s))  # type: ignore[misc]
        for name in POLICIES
    ]
    rows.append(("cachetools LRUCache", lambda c, s: replay_cachetools("LRUCache", c, s)))
    rows.append(("cachetools LFUCache", lambda c, s: replay_cachetools("LFUCache", c, s)))
    rows.append(("Bélády (offline optimum)", belady_hits))
    return rows


def hit_rates(
    requests: int = 1_000_000, keys: int = 100_000, capacity: int = 10_000, seed: int = 0
) -> list[Row]:
    """Hit rates of every contender on the zipf and the shifting zipf stream."""
    plain = zipf_stream(requests, keys, seed)
    shifting = zipf_stream(requests, keys, seed, shifts=SHIFTS)
    rows = []
    for name, replay in _contenders():
        start = time.perf_counter()
        a = replay(capacity, plain) / requests
        b = replay(capacity, shifting) / requests
        rows.append(Row(name, a, b, time.perf_counter() - start))
    return rows


def throughput(
    requests: int = 1_000_000,
    keys: int = 100_000,
    capacity: int = 10_000,
    seed: int = 0,
    repeat: int = 5,
    policies: Sequence[str] = POLICIES,
) -> list[Throughput]:
    """For each policy: read-through requests/s over the zipf stream (a miss puts the
    key itself: no loader cost) and ns per ``get`` of a held key; medians of ``repeat``."""
    stream = zipf_stream(requests, keys, seed)
    out = []
    for name in policies:
        rates, hits = [], 0
        for _ in range(repeat):
            start = time.perf_counter()
            hits = replay_policy(name, capacity, stream)
            rates.append(requests / (time.perf_counter() - start))
        out.append(Throughput(name, statistics.median(rates), _hit_ns(name, capacity, repeat),
                              hits / requests))  # fmt: skip
    return out


def _hit_ns(name: str, capacity: int, repeat: int) -> float:
    """Median ns per ``get`` of one of 64 held keys (a loop of gets, timeit)."""
    policy = make_policy(name, capacity)
    for key in range(capacity):
        policy.put(key, key)
    held = [k for k in range(0, capacity, max(1, capacity // 64)) if k in policy][:64]
    for key in held:  # tinylfu: promoted to protected, where steady hits are
        policy.get(key)
    number = max(1, 50_000 // len(held))
    timings = timeit.repeat(
        "for k in held: get(k)",
        globals={"held": held, "get": policy.get},
        number=number,
        repeat=max(repeat, 5),
    )
    return statistics.median(timings) / (number * len(held)) * 1e9


def lru_throughput(
    requests: int = 1_000_000,
    keys: int = 100_000,
    capacity: int = 10_000,
    seed: int = 0,
    repeat: int = 5,
) -> Throughput:
    """LRU mode's read-through requests/s over the zipf stream (target: >= 1,000,000/s
    for the policy alone) and its ns per hit; see :func:`throughput`."""
    return throughput(requests, keys, capacity, seed, repeat, policies=("lru",))[0]


def print_hit_rates(
    console: Console,
    requests: int = 1_000_000,
    keys: int = 100_000,
    capacity: int = 10_000,
    seed: int = 0,
) -> list[Row]:
    """Run :func:`hit_rates` and print its table; returns the rows."""
    console.print(
        f"[bold]Hit rates[/]: read-through, {requests:,} requests over {keys:,} keys,"
        f" capacity {capacity:,}, Zipf(1.0), seed {seed}; shifting: popularity re-permuted"
        f" {SHIFTS} times"
    )
    rows = hit_rates(requests, keys, capacity, seed)
    table = Table()
    table.add_column("policy")
    table.add_column("zipf", justify="right")
    table.add_column("zipf, shifting", justify="right")
    table.add_column("replay s", justify="right")
    for row in rows:
        table.add_row(row.name, f"{row.zipf:.3f}", f"{row.shifting:.3f}", f"{row.seconds:.1f}")
    console.print(table)
    return rows


def print_throughput(
    console: Console,
    requests: int = 1_000_000,
    keys: int = 100_000,
    capacity: int = 10_000,
    seed: int = 0,
    repeat: int = 5,
) -> list[Throughput]:
    """Run :func:`throughput` for every policy and print its table; returns the rows."""
    console.print(
        f"[bold]Speed[/]: read-through loop over the zipf stream ({requests:,} requests,"
        f" capacity {capacity:,}) and get() of a held key; medians of {repeat} runs"
    )
    rows = throughput(requests, keys, capacity, seed, repeat)
    table = Table()
    table.add_column("policy")
    table.add_column("read-through req/s", justify="right")
    table.add_column("hit ns/get", justify="right")
    table.add_column("hit rate", justify="right")
    for row in rows:
        table.add_row(
            row.name, f"{row.requests_per_s:,.0f}", f"{row.hit_ns:.0f}", f"{row.hit_rate:.3f}"
        )
    console.print(table)
    return rows


@click.command()
@click.option("--requests", default=1_000_000, show_default=True, type=click.IntRange(min=1))
@click.option("--keys", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option("--capacity", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs of each speed measure; medians are quoted.")  # fmt: skip
@click.option("--only", type=click.Choice(("all", "hits", "speed")), default="all",
              show_default=True)  # fmt: skip
def cli(requests: int, keys: int, capacity: int, seed: int, repeat: int, only: str) -> None:
    """Hit rates of taskspace's eviction policies against cachetools and Bélády's
    optimum, and the speed of their read-through and hit paths."""
    console = Console()
    if only in ("all", "hits"):
        print_hit_rates(console, requests, keys, capacity, seed)
    if only in ("all", "speed"):
        print_throughput(console, requests, keys, capacity, seed, repeat)


if __name__ == "__main__":
    cli()
