"""``python -m bench streams``: taskspace streams with consumer groups, and Redis
Streams' own commands in a raw redis-py loop beside them, in the same run.

Targets: a private ``redis-server`` on a free loopback port (a fresh namespace
per phase, FLUSHDB between phases) and a SQLite file in a temporary directory.
Each phase runs ``repeat`` rounds, taskspace and the raw loop interleaved in
every round so that load changing on a noisy host hits both alike; quoted are
medians over the rounds, and the ratio taskspace / raw of those medians.

- **publish, single**: ``singles`` sequential ``stream.publish(msg)`` (one
  request id each: a retried publish never appends twice) against ``XADD`` in
  a loop.
- **publish, batched**: ``messages`` in ``publish_many`` calls of ``batch``
  against a redis-py pipeline of ``batch`` ``XADD`` s (transaction=False).
- **consume + ack**: ``messages`` published beforehand; a group of
  ``consumers`` processes (spawned, waiting at a start line) each loops
  ``consumer.fetch(batch)`` (prefetch ``batch``, or ``--prefetch``: one claim txn per batch, the
  acks of the previous batch written in it) and acks every message; against
  ``XREADGROUP COUNT batch`` + one ``XACK`` of the batch per loop. Both decode
  every message's JSON. Throughput = messages / (last message handled - start).
- **latency**: one consumer process blocked in ``consumer.get`` (raw:
  ``XREADGROUP BLOCK``); the parent publishes ``latency_n`` messages one at a
  time, 2 ms apart, each carrying its publish time (CLOCK_MONOTONIC, one clock
  for every process of the host); p50/p99 of receive - publish.

The raw loop has no redelivery lease of its own beyond the PEL, no dead
letters and no retries; taskspace adds visibility timeouts with delivery
counts, dead-lettering, batched acks and request ids.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from bench.redis_server import RedisServer, command, flushdb
from bench.workers import BenchError

GO_WAIT_S = 30.0
IDLE_S = 1.0
PAYLOAD = "x" * 64


def _msg(i: int) -> dict[str, Any]:
    return {"n": i, "payload": PAYLOAD}


# -- children (spawned) ------------------------------------------------------------


def _wait_go(workdir: str, name: str) -> None:
    Path(workdir, f"ready.{name}").touch()
    deadline = time.monotonic() + GO_WAIT_S
    while not Path(workdir, "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        time.sleep(0.0005)


def _report(workdir: str, name: str, result: dict[str, Any]) -> None:
    tmp = Path(workdir, f"{name}.tmp")
    tmp.write_bytes(orjson.dumps(result))
    tmp.rename(Path(workdir, f"{name}.json"))


def ts_consume(url: str, stream: str, workdir: str, name: str, batch: int) -> None:
    from taskspace import Space

    space = Space(url)
    consumer = space.stream(stream).group("g", start="earliest").consumer(name, prefetch=batch)
    space.store.kv.get("warm-up")
    _wait_go(workdir, name)
    n, last, cpu0 = 0, time.monotonic(), time.process_time()
    while got := consumer.fetch(batch, timeout=IDLE_S):
        for msg in got:
            _ = msg.data["n"]
            msg.ack()
        n += len(got)
        last = time.monotonic()
    consumer.close()
    cpu = time.process_time() - cpu0
    _report(workdir, name, {"n": n, "last": last, "conflicts": consumer.conflicts, "cpu": cpu})


def raw_consume(url: str, stream: str, workdir: str, name: str, batch: int) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.ping()
    _wait_go(workdir, name)
    n, last, cpu0 = 0, time.monotonic(), time.process_time()
    while True:
        reply = r.xreadgroup("g", name, {stream: ">"}, count=batch, block=int(IDLE_S * 1000))
        if not reply:
            break
        entries = reply[0][1]
        for _, fields in entries:
            _ = orjson.loads(fields[b"d"])["n"]
        r.xack(stream, "g", *[entry_id for entry_id, _ in entries])
        n += len(entries)
        last = time.monotonic()
    _report(workdir, name, {"n": n, "last": last, "cpu": time.process_time() - cpu0})


def ts_latency(url: str, stream: str, workdir: str, name: str, count: int) -> None:
    from taskspace import Space

    space = Space(url)
    consumer = space.stream(stream).group("g", start="earliest").consumer(name, prefetch=1)
    consumer.fetch(1, timeout=0)
    _wait_go(workdir, name)
    deltas = []
    while len(deltas) < count and (msg := consumer.get(timeout=10.0)) is not None:
        deltas.append(time.monotonic() - msg.data["t"])
        msg.ack()
    consumer.close()
    _report(workdir, name, {"deltas": deltas})


def raw_latency(url: str, stream: str, workdir: str, name: str, count: int) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.ping()
    _wait_go(workdir, name)
    deltas: list[float] = []
    while len(deltas) < count:
        reply = r.xreadgroup("g", name, {stream: ">"}, count=1, block=10_000)
        if not reply:
            break
        for entry_id, fields in reply[0][1]:
            deltas.append(time.monotonic() - orjson.loads(fields[b"d"])["t"])
            r.xack(stream, "g", entry_id)
    _report(workdir, name, {"deltas": deltas})


def _spawn(target: Callable[..., None], args_per_child: list[tuple[Any, ...]],
           workdir: str) -> tuple[list[multiprocessing.process.BaseProcess], float]:  # fmt: skip
    """Start children, wait until each is ready, give the start signal; return
    them and the start time."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_child]
    for p in procs:
        p.start()
    deadline = time.monotonic() + GO_WAIT_S
    while len(list(Path(workdir).glob("ready.*"))) < len(procs):
        if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise BenchError("bench children did not get ready")
        time.sleep(0.005)
    start = time.monotonic()
    Path(workdir, "go").touch()
    return procs, start


def _collect(procs: list[multiprocessing.process.BaseProcess], workdir: str,
             names: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            raise BenchError("a bench child did not finish")
    try:
        return [orjson.loads(Path(workdir, f"{n}.json").read_bytes()) for n in names]
    except FileNotFoundError as exc:
        raise BenchError(f"a bench child reported nothing: {exc}") from None


# -- phases ---------------------------------------------------------------------------


@dataclass
class Config:
    messages: int
    singles: int
    batch: int
    consumers: int
    latency_n: int
    repeat: int
    prefetch: int = 0  # taskspace consumers' prefetch and fetch size (0: batch)


@dataclass
class Results:
    """Per row name: the value of each round."""

    rows: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.rows.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        values = self.rows.get(name)
        return statistics.median(values) if values else None


class Target:
    """One backend: fresh taskspace URLs per phase, and (Redis) the raw client."""

    def __init__(self, label: str, base_url: str, redis_url: str | None, tmp: str) -> None:
        self.label = label
        self.base_url = base_url
        self.redis_url = redis_url
        self.tmp = tmp

    def fresh(self) -> str:
        if self.redis_url is not None:
            flushdb(self.redis_url)
            return f"{self.redis_url}?namespace=b{uuid.uuid4().hex[:10]}"
        return f"sqlite:///{self.tmp}/s{uuid.uuid4().hex[:8]}.db"


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ts_publish(target: Target, cfg: Config, res: Results) -> None:
    from taskspace import Space

    with Space(target.fresh()) as space:
        s = space.stream("bench")
        s.publish(_msg(-1))
        took = _timed(lambda: [s.publish(_msg(i)) for i in range(cfg.singles)])
        res.add(f"{target.label} publish (msg/s)", cfg.singles / took)
        chunks = [[_msg(i) for i in range(j, min(j + cfg.batch, cfg.messages))]
                  for j in range(0, cfg.messages, cfg.batch)]  # fmt: skip
        took = _timed(lambda: [s.publish_many(c) for c in chunks])
        res.add(f"{target.label} publish_many (msg/s)", cfg.messages / took)


def raw_publish(url: str, cfg: Config, res: Results) -> None:
    import redis

    flushdb(url)
    r = redis.Redis.from_url(url)
    r.ping()
    took = _timed(lambda: [r.xadd("raw", {"d": orjson.dumps(_msg(i))}) for i in range(cfg.singles)])
    res.add("raw XADD (msg/s)", cfg.singles / took)

    def batched() -> None:
        for j in range(0, cfg.messages, cfg.batch):
            pipe = r.pipeline(transaction=False)
            for i in range(j, min(j + cfg.batch, cfg.messages)):
                pipe.xadd("raw2", {"d": orjson.dumps(_msg(i))})
            pipe.execute()

    res.add("raw XADD pipelined (msg/s)", cfg.messages / _timed(batched))
    r.close()


def redis_cpu(url: str | None) -> float:
    """CPU seconds the redis-server has used (user + sys), 0 without one."""
    if url is None:
        return 0.0
    info = command(url, "INFO", "cpu")
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def _consume_phase(
    target: Callable[..., None],
    url: str,
    stream: str,
    cfg: Config,
    tmp: str,
    redis_url: str | None = None,
) -> tuple[float, float, float]:
    """Throughput, client CPU µs per message and redis-server CPU µs per message."""
    workdir = tempfile.mkdtemp(dir=tmp)
    names = [f"c{i}" for i in range(cfg.consumers)]
    size = (cfg.prefetch or cfg.batch) if target is ts_consume else cfg.batch
    procs, start = _spawn(target, [(url, stream, workdir, name, size) for name in names], workdir)
    server0 = redis_cpu(redis_url)
    reports = _collect(procs, workdir, names)
    server = (redis_cpu(redis_url) - server0) / cfg.messages * 1e6
    total = sum(r["n"] for r in reports)
    if os.environ.get("BENCH_STREAMS_DEBUG"):
        print(reports)
    if total != cfg.messages:
        raise BenchError(f"consumers got {total} messages, not {cfg.messages}")
    client = sum(r["cpu"] for r in reports) / cfg.messages * 1e6
    return cfg.messages / (max(r["last"] for r in reports) - start), client, server


def ts_consume_phase(target: Target, cfg: Config, res: Results) -> None:
    from taskspace import Space

    url = target.fresh()
    with Space(url) as space:
        s = space.stream("bench")
        s.group("g", start="earliest").consumer("setup").fetch(1, timeout=0)
        for j in range(0, cfg.messages, 1000):
            s.publish_many([_msg(i) for i in range(j, min(j + 1000, cfg.messages))])
    rate, client, server = _consume_phase(
        ts_consume, url, "bench", cfg, target.tmp, target.redis_url
    )
    res.add(f"{target.label} consume+ack, {cfg.consumers} procs (msg/s)", rate)
    res.add(f"{target.label} consume+ack client CPU (µs/msg)", client)
    if target.redis_url is not None:
        res.add(f"{target.label} consume+ack redis-server CPU (µs/msg)", server)


def raw_consume_phase(url: str, cfg: Config, res: Results, tmp: str) -> None:
    import redis

    flushdb(url)
    r = redis.Redis.from_url(url)
    r.xgroup_create("raw", "g", id="0", mkstream=True)
    for j in range(0, cfg.messages, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(j, min(j + 1000, cfg.messages)):
            pipe.xadd("raw", {"d": orjson.dumps(_msg(i))})
        pipe.execute()
    r.close()
    rate, client, server = _consume_phase(raw_consume, url, "raw", cfg, tmp, url)
    res.add(f"raw XREADGROUP+XACK, {cfg.consumers} procs (msg/s)", rate)
    res.add("raw XREADGROUP+XACK client CPU (µs/msg)", client)
    res.add("raw XREADGROUP+XACK redis-server CPU (µs/msg)", server)


def _latency_phase(target: Callable[..., None], publish: Callable[[dict[str, Any]], None],
                   url: str, stream: str, cfg: Config, tmp: str) -> list[float]:  # fmt: skip
    workdir = tempfile.mkdtemp(dir=tmp)
    procs, _ = _spawn(target, [(url, stream, workdir, "lat", cfg.latency_n)], workdir)
    time.sleep(0.2)  # the consumer is blocked in its read
    for _ in range(cfg.latency_n):
        publish({"t": time.monotonic()})
        time.sleep(0.002)
    [report] = _collect(procs, workdir, ["lat"])
    deltas: list[float] = report["deltas"]
    if len(deltas) != cfg.latency_n:
        raise BenchError(f"latency consumer got {len(deltas)} of {cfg.latency_n}")
    return deltas


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ts_latency_phase(target: Target, cfg: Config, res: Results) -> None:
    from taskspace import Space

    url = target.fresh()
    with Space(url) as space:
        s = space.stream("bench")
        deltas = _latency_phase(ts_latency, s.publish, url, "bench", cfg, target.tmp)
    res.add(f"{target.label} publish→deliver p50 (ms)", _pct(deltas, 0.5) * 1000)
    res.add(f"{target.label} publish→deliver p99 (ms)", _pct(deltas, 0.99) * 1000)


def raw_latency_phase(url: str, cfg: Config, res: Results, tmp: str) -> None:
    import redis

    flushdb(url)
    r = redis.Redis.from_url(url)
    r.xgroup_create("raw", "g", id="$", mkstream=True)
    deltas = _latency_phase(raw_latency, lambda m: r.xadd("raw", {"d": orjson.dumps(m)}),
                            url, "raw", cfg, tmp)  # fmt: skip
    r.close()
    res.add("raw XADD→XREADGROUP p50 (ms)", _pct(deltas, 0.5) * 1000)
    res.add("raw XADD→XREADGROUP p99 (ms)", _pct(deltas, 0.99) * 1000)


# -- report -------------------------------------------------------------------------------

PAIRS = [
    ("redis publish (msg/s)", "raw XADD (msg/s)"),
    ("redis publish_many (msg/s)", "raw XADD pipelined (msg/s)"),
    ("redis consume+ack, {c} procs (msg/s)", "raw XREADGROUP+XACK, {c} procs (msg/s)"),
    ("redis consume+ack client CPU (µs/msg)", "raw XREADGROUP+XACK client CPU (µs/msg)"),
    (
        "redis consume+ack redis-server CPU (µs/msg)",
        "raw XREADGROUP+XACK redis-server CPU (µs/msg)",
    ),
    ("redis publish→deliver p50 (ms)", "raw XADD→XREADGROUP p50 (ms)"),
    ("redis publish→deliver p99 (ms)", "raw XADD→XREADGROUP p99 (ms)"),
]


def report(res: Results, cfg: Config, console: Console) -> None:
    table = Table(title=f"streams: medians of {cfg.repeat} rounds")
    cols = ("measure", "taskspace", "raw redis-py", "ratio of medians", "median of round ratios")
    for col in cols:
        table.add_column(col, justify="left" if col == "measure" else "right")
    for ts_name, raw_name in PAIRS:
        ts_name, raw_name = ts_name.format(c=cfg.consumers), raw_name.format(c=cfg.consumers)
        ts, raw = res.median(ts_name), res.median(raw_name)
        ratio = f"{ts / raw:.2f}x" if ts and raw else "-"
        pairs = zip(res.rows.get(ts_name, []), res.rows.get(raw_name, []), strict=False)
        per_round = [a / b for a, b in pairs if b]
        paired = f"{statistics.median(per_round):.2f}x" if per_round else "-"
        table.add_row(ts_name, _fmt(ts), _fmt(raw), ratio, paired)
    for name in res.rows:
        if name.startswith("sqlite"):
            table.add_row(name, _fmt(res.median(name)), "", "")
    console.print(table)
    console.print("rounds: " + "; ".join(
        f"{k}: {', '.join(_fmt(v) for v in vs)}" for k, vs in res.rows.items()))  # fmt: skip


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def run(cfg: Config, sqlite: bool, console: Console) -> Results:
    res = Results()
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="ts-streams-") as tmp:
        py = sys.version.split()[0]
        console.print(f"redis-server {server.version}; python {py}; {os.cpu_count()} CPUs;"
                      f" {cfg.messages} messages, batch {cfg.batch}, prefetch"
                      f" {cfg.prefetch or cfg.batch}, {cfg.consumers} consumers")  # fmt: skip
        redis_t = Target("redis", server.url, server.url, tmp)
        sqlite_t = Target("sqlite", "", None, tmp)
        for rnd in range(cfg.repeat):
            console.print(f"round {rnd + 1}/{cfg.repeat}")
            ts_publish(redis_t, cfg, res)
            raw_publish(server.url, cfg, res)
            ts_consume_phase(redis_t, cfg, res)
            raw_consume_phase(server.url, cfg, res, tmp)
            ts_latency_phase(redis_t, cfg, res)
            raw_latency_phase(server.url, cfg, res, tmp)
            if sqlite:
                ts_publish(sqlite_t, cfg, res)
                ts_consume_phase(sqlite_t, cfg, res)
                ts_latency_phase(sqlite_t, cfg, res)
    return res


@click.command()
@click.option("--messages", default=20_000, show_default=True, type=click.IntRange(min=100),
              help="Messages of the batched publish and of each consume phase.")  # fmt: skip
@click.option("--singles", default=2_000, show_default=True, type=click.IntRange(min=10),
              help="Sequential single publishes.")  # fmt: skip
@click.option("--batch", default=100, show_default=True, type=click.IntRange(1, 1000),
              help="publish_many size, consumer prefetch/fetch and XREADGROUP COUNT.")  # fmt: skip
@click.option("--consumers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Consumer processes of the group.")  # fmt: skip
@click.option("--latency-n", default=500, show_default=True, type=click.IntRange(min=10),
              help="Messages timed publish→deliver.")  # fmt: skip
@click.option("--prefetch", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="taskspace consumers' prefetch (0: --batch); COUNT stays --batch.")  # fmt: skip
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Rounds; medians are quoted.")  # fmt: skip
@click.option("--sqlite/--no-sqlite", default=True, show_default=True,
              help="Also measure a SQLite file.")  # fmt: skip
def cli(messages: int, singles: int, batch: int, consumers: int, latency_n: int, prefetch: int,
        repeat: int, sqlite: bool) -> None:  # fmt: skip
    """Streams with consumer groups against Redis Streams in a raw redis-py loop."""
    console = Console(width=160)
    cfg = Config(messages, singles, batch, consumers, latency_n, repeat, prefetch)
    try:
        res = run(cfg, sqlite, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)
    report(res, cfg, console)


if __name__ == "__main__":
    cli()
