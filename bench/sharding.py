"""ShardedKV figures: balance of keys over shards, keys moved on a join, and
what a rebalance costs (``python -m bench sharding``).

For each shard count N: write ``--keys`` keys (``key:<i>``) through ShardedKV
on N fresh shards, count the keys each shard holds (max/mean), add shard
N+1 and rebalance while a writer thread keeps overwriting keys, then check:

- the fraction of keys that moved, against the ideal 1/(N+1);
- that no key moved between two shards that stay (only to the new one);
- that every key holds its last written value (0 lost or stale);
- the writer's put latency during the rebalance (p50, p99, max: the wait of
  a write to a slot being copied) and the rebalance's time and copy rate.

Targets (printed as ok/MISS): max/mean <= 1.01; moved within 2 % of 1/(N+1);
0 keys between staying shards; 0 lost.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import click

from taskspace.state.sharding import ShardedKV

BACKENDS = ("memory", "sqlite", "redis")


@dataclass
class Figures:
    shards: int
    keys: int
    max_over_mean: float
    moved_fraction: float
    ideal_fraction: float
    between_staying: int
    lost: int
    rebalance_s: float
    keys_copied: int
    batches: int
    put_p50_ms: float
    put_p99_ms: float
    put_max_ms: float
    puts_during: int


@contextmanager
def _urls(backend: str, n: int) -> Iterator[tuple[list[str], str]]:
    """``n + 1`` fresh shard URLs and a coordinator URL on ``backend``."""
    tag = uuid.uuid4().hex[:8]
    if backend == "memory":
        yield [f"memory://bench-{tag}-{i}" for i in range(n + 1)], f"memory://bench-{tag}-c"
    elif backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="taskspace-bench-shard-") as work:
            yield [f"sqlite:///{work}/s{i}.db" for i in range(n + 1)], f"sqlite:///{work}/c.db"
    else:
        from bench.redis_server import RedisServer

        with RedisServer() as server:
            base = f"redis://127.0.0.1:{server.port}/0?namespace="
            yield [f"{base}s{tag}{i}" for i in range(n + 1)], f"{base}c{tag}"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(backend: str, n: int, keys: int, batch_slots: int) -> Figures:
    with _urls(backend, n) as (urls, coord):
        kv = ShardedKV(urls[:n], coordinator=coord, wait=60)
        try:
            names = [f"key:{i}" for i in range(keys)]
            for i, key in enumerate(names):
                kv.put(key, i)
            counts = kv.counts()
            ratio = max(counts.values()) / (keys / n)
            before = {key: kv.shard_for(key) for key in names}

            stop = threading.Event()
            latencies: list[float] = []
            last: dict[str, int] = {}

            def write() -> None:
                i = 0
                while not stop.is_set():
                    key = names[(i * 7919) % keys]
                    value = keys + i
                    started = time.perf_counter()
                    kv.put(key, value)
                    latencies.append(time.perf_counter() - started)
                    last[key] = value
                    i += 1

            kv.add_shard(urls[n])
            writer = threading.Thread(target=write, name="bench-writer")
            writer.start()
            try:
                report = kv.rebalance(batch_slots=batch_slots)
            finally:
                stop.set()
                writer.join()
            after = {key: kv.shard_for(key) for key in names}
            moved = [key for key in names if before[key] != after[key]]
            between = sum(1 for key in moved if after[key] != urls[n])
            expected = {key: i for i, key in enumerate(names)} | last
            lost = sum(1 for key, value in expected.items() if kv.get(key) != value)
            lost += abs(sum(kv.counts().values()) - keys)  # copies left behind
            return Figures(
                shards=n,
                keys=keys,
                max_over_mean=ratio,
                moved_fraction=len(moved) / keys,
                ideal_fraction=1 / (n + 1),
                between_staying=between,
                lost=lost,
                rebalance_s=report.seconds,
                keys_copied=report.keys_moved,
                batches=report.batches,
                put_p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
                put_p99_ms=_percentile(latencies, 0.99) * 1000,
                put_max_ms=max(latencies, default=0.0) * 1000,
                puts_during=len(latencies),
            )
        finally:
            kv.close()


def op_latency(backend: str, ops: int) -> dict[str, tuple[float, float]]:
    """Median and p99 (ms) of get/put/cas through ShardedKV (3 shards) and
    through ``space.kv`` on one space of the same backend: the cost of the
    ownership check (a get reads the marker too; a write is a txn with a
    compare on it)."""
    from taskspace import Space

    out: dict[str, tuple[float, float]] = {}
    with _urls(backend, 3) as (urls, coord):
        kv = ShardedKV(urls[:3], coordinator=coord)
        plain = Space(urls[3])
        try:
            for name, target in (("ShardedKV", kv), ("space.kv", plain.kv)):
                for i in range(ops):
                    target.put(f"op:{i}", i)
                timings: dict[str, list[float]] = {"get": [], "put": [], "cas": []}
                for i in range(ops):
                    key = f"op:{i}"
                    started = time.perf_counter()
                    entry = target.get_versioned(key)
                    timings["get"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    target.put(key, -i)
                    timings["put"].append(time.perf_counter() - started)
                    assert entry is not None
                    fresh = target.get_versioned(key)
                    assert fresh is not None
                    started = time.perf_counter()
                    target.cas(key, i, version=fresh.version)
                    timings["cas"].append(time.perf_counter() - started)
                for op, values in timings.items():
                    out[f"{name} {op}"] = (
                        statistics.median(values) * 1000,
                        _percentile(values, 0.99) * 1000,
                    )
        finally:
            kv.close()
            plain.close()
    return out


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


@click.command()
@click.option("--backend", type=click.Choice(BACKENDS), default="memory", show_default=True)
@click.option("--keys", default=100_000, show_default=True, type=click.IntRange(min=100))
@click.option("--shards", default="3,4,5", show_default=True,
              help="Comma list of shard counts N (each joined by shard N+1).")  # fmt: skip
@click.option("--batch-slots", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Slots moved per rebalance batch.")  # fmt: skip
@click.option("--ops", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Timed get/put/cas per client for the latency table (0: skip).")  # fmt: skip
def cli(backend: str, keys: int, shards: str, batch_slots: int, ops: int) -> None:
    """ShardedKV balance and keys moved on a join (with a writer during the move)."""
    try:
        counts = [int(part) for part in shards.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{shards!r}: a comma list", param_hint="--shards") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{shards!r}: shard counts must be >= 1", param_hint="--shards")
    click.echo(f"ShardedKV on {backend}: {keys:,} keys, batch {batch_slots} slots\n")
    header = (f"{'N':>2} {'max/mean':>9} {'':4} {'moved':>7} {'ideal':>7} {'':4} {'between':>7}"
              f" {'lost':>5} {'rebal s':>8} {'copied':>7} {'keys/s':>8} {'put p50':>8}"
              f" {'p99 ms':>7} {'max ms':>7} {'puts':>6}")  # fmt: skip
    click.echo(header)
    failed = False
    for n in counts:
        f = measure(backend, n, keys, batch_slots)
        balanced = f.max_over_mean <= 1.01
        moved_ok = abs(f.moved_fraction - f.ideal_fraction) <= 0.02 * f.ideal_fraction
        failed |= not (balanced and moved_ok and f.between_staying == 0 and f.lost == 0)
        rate = f.keys_copied / f.rebalance_s if f.rebalance_s else 0.0
        click.echo(
            f"{n:>2} {f.max_over_mean:>9.4f} {_mark(balanced):4} {f.moved_fraction:>7.4f}"
            f" {f.ideal_fraction:>7.4f} {_mark(moved_ok):4} {f.between_staying:>7} {f.lost:>5}"
            f" {f.rebalance_s:>8.2f} {f.keys_copied:>7} {rate:>8.0f} {f.put_p50_ms:>8.3f}"
            f" {f.put_p99_ms:>7.2f} {f.put_max_ms:>7.1f} {f.puts_during:>6}"
        )
    click.echo(
        "\nmax/mean: keys on the fullest shard over the mean (target <= 1.01); moved: fraction"
        " of keys\nthat changed shard on the join N -> N+1 (target within 2 % of 1/(N+1));"
        " between: keys moved\nbetween two shards that stay (target 0); lost: keys not holding"
        " their last acknowledged\nvalue afterwards, or left behind (target 0); put p50/p99/max:"
        " a writer thread's puts\nduring the rebalance (max = a write that waited for its"
        " slot's batch to be copied)."
    )
    if ops:
        click.echo(f"\nlatency, {ops} ops each (ms): median / p99")
        for name, (p50, p99) in op_latency(backend, ops).items():
            click.echo(f"  {name:<16} {p50:8.3f} / {p99:7.3f}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    cli()
