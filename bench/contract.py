"""``python -m bench contract``: latency of the store contract's primitives (v2).

For each backend (a fresh ``memory://`` store, a new SQLite file in a temporary
directory, a private ``redis-server``), ``repeat`` runs of ``n`` samples (after
``warmup`` unrecorded ones) of:

- **lease round trip**: ``leases.acquire(name, holder, ttl)`` then ``leases.release``;
- **kv.txn**: two ``VersionIs`` compares and two ``Put``\\ s that all hold, without
  and with a ``request_id`` (what a caller on a network backend passes to retry);
- **change feed**: a waiter blocked in ``kv.wait(prefix, after, timeout)`` that then
  reads ``kv.changes``; from the moment ``kv.put`` is called until the waiter holds
  the change;
- **release → wait**: a waiter blocked in ``leases.wait(name, timeout)`` on a held
  name; from the moment ``leases.release`` is called until ``wait`` has returned
  (the contract: within milliseconds; target < 5 ms on every backend).

Waiters are a thread for ``memory://`` (the store lives in one process) and a
separate process (spawned, with its own store connection) for SQLite and Redis.
Both sides read ``time.monotonic()``, CLOCK_MONOTONIC on Linux: one clock for
every process of the host. Before each sample the writer waits for the waiter's
word that it is about to block, then pauses a random 2-5 ms so that the waiter is
inside ``wait`` (random, so a polling waiter is caught at every phase of its
poll). A ``wait`` that returns with nothing new is an *early return*: the waiter
blocks again, the sample keeps running, and the count is shown in the notes.

Quoted: the median over the runs of each run's p50 and p99.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from queue import Empty
from queue import SimpleQueue as Queue
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from bench.redis_server import RedisServer
from bench.workers import BenchError
from taskspace.backends import open_store
from taskspace.backends.base import Put, Store, VersionIs

BACKENDS = ("memory", "sqlite", "redis")
TARGET_WAKE_MS = 5.0
LEASE_TTL_S = 60.0  # far longer than a run: no expiry ever ends a wait
WAIT_TIMEOUT_S = 5.0  # one blocking call of a waiter
REPLY_TIMEOUT_S = 30.0  # the longest the writer waits for the waiter's word
IDLE_EXIT_S = 120.0  # a waiter nobody talks to for this long exits by itself
JOIN_TIMEOUT_S = 15.0
PAUSE_S = (0.002, 0.005)
HOLDER = f"bench:{os.getpid()}"
STOP_KEY = "stop"


@dataclass(frozen=True)
class ContractBench:
    """Options of one ``bench contract`` run."""

    backends: tuple[str, ...] = BACKENDS
    n: int = 500
    repeat: int = 5
    warmup: int = 20
    seed: int = 1


@dataclass
class Run:
    """One run of one measure: latencies in ms, and the waiter's early returns."""

    samples_ms: list[float]
    early: int = 0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class BackendResults:
    """Every run of every measure on one backend; ``errors`` by measure."""

    backend: str
    detail: str = ""
    runs: dict[str, list[Run]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# -- the channel between the writer and a waiter --------------------------------------


class Channel(Protocol):
    """Messages between the writer and a waiter (a thread's queues or a process's pipe)."""

    def send(self, message: Any) -> None: ...

    def recv(self, timeout: float) -> Any: ...


class QueueChannel:
    """One end of a pair of in-process queues."""

    def __init__(self, inbox: Queue[Any], outbox: Queue[Any]) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, message: Any) -> None:
        self.outbox.put(message)

    def recv(self, timeout: float) -> Any:
        try:
            return self.inbox.get(timeout=timeout)
        except Empty:
            raise BenchError(f"no message in {timeout:g} s") from None


class PipeChannel:
    """One end of a multiprocessing pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise BenchError(f"no message in {timeout:g} s")
        return self.conn.recv()


# -- waiters (run in a thread or a spawned process) -----------------------------------


def feed_waiter(store: Store, prefix: str, chan: Channel) -> None:
    """Block in ``kv.wait``, read ``kv.changes``, report each put's arrival time;
    exits on a put of ``prefix + STOP_KEY``."""
    after = store.kv.revision()
    chan.send(("waiting",))
    early, idle_since = 0, time.monotonic()
    while True:
        store.kv.wait(prefix, after, WAIT_TIMEOUT_S)
        changes = store.kv.changes(prefix, after)
        if not changes:
            early += 1
            if time.monotonic() - idle_since > IDLE_EXIT_S:
                return
            continue
        arrived = time.monotonic()
        after = changes[-1].revision
        if any(c.key == prefix + STOP_KEY for c in changes):
            return
        chan.send(("got", arrived, changes[-1].value, early))
        early, idle_since = 0, time.monotonic()
        chan.send(("waiting",))


def wake_waiter(store: Store, name: str, chan: Channel) -> None:
    """On each ``go``: block in ``leases.wait(name)`` until no grant of ``name`` is
    held, report when the wait returned; exits on ``stop``."""
    while chan.recv(IDLE_EXIT_S) != "stop":
        chan.send(("waiting",))
        early = 0
        while True:
            store.leases.wait(name, WAIT_TIMEOUT_S)
            returned = time.monotonic()
            if not store.leases.holders(name):
                break
            early += 1
        chan.send(("got", returned, None, early))


WAITERS: dict[str, Callable[[Store, str, Channel], None]] = {
    "feed": feed_waiter,
    "wake": wake_waiter,
}


def _run_waiter(kind: str, store: Store, arg: str, chan: Channel) -> None:
    try:
        WAITERS[kind](store, arg, chan)
    except Exception as exc:  # noqa: BLE001 - reported to the writer, which raises it
        chan.send(("error", f"{type(exc).__name__}: {exc}"))


def _process_waiter(kind: str, url: str, arg: str, conn: Connection) -> None:
    """Entry point of a waiter process: its own store on ``url``."""
    chan = PipeChannel(conn)
    try:
        store = open_store(url)
    except Exception as exc:  # noqa: BLE001 - reported to the writer, which raises it
        chan.send(("error", f"open_store: {type(exc).__name__}: {exc}"))
        return
    try:
        _run_waiter(kind, store, arg, chan)
    finally:
        store.close()
        conn.close()


@contextmanager
def waiter(kind: str, store: Store, url: str, arg: str, threaded: bool) -> Iterator[Channel]:
    """A waiter of ``kind`` on ``arg``: a thread sharing ``store``, or a spawned
    process opening ``url``; yields the writer's end of the channel. The waiter must
    have been told to stop when the block ends normally; on an error a process is
    killed (a thread exits by itself once idle)."""
    if threaded:
        to_waiter: Queue[Any] = Queue()
        to_writer: Queue[Any] = Queue()
        thread = threading.Thread(
            target=_run_waiter,
            args=(kind, store, arg, QueueChannel(to_waiter, to_writer)),
            name=f"bench-{kind}-waiter",
            daemon=True,
        )
        thread.start()
        yield QueueChannel(to_writer, to_waiter)
        thread.join(JOIN_TIMEOUT_S)
        return
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(
        target=_process_waiter, args=(kind, url, arg, theirs), name=f"bench-{kind}-waiter"
    )
    proc.daemon = True
    proc.start()
    theirs.close()
    try:
        yield PipeChannel(mine)
        proc.join(JOIN_TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()  # only this process, which we started
            proc.join()
        mine.close()


def _expect(chan: Channel, kind: str) -> tuple[Any, ...]:
    message = chan.recv(REPLY_TIMEOUT_S)
    if not isinstance(message, tuple) or not message:
        raise BenchError(f"waiter sent {message!r}")
    if message[0] == "error":
        raise BenchError(f"waiter failed: {message[1]}")
    if message[0] != kind:
        raise BenchError(f"waiter sent {message!r}, expected {kind!r}")
    return message


# -- measures -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a measure needs: the writer's store, and how to reach it from a waiter."""

    store: Store
    url: str
    threaded: bool
    n: int
    warmup: int
    rng: random.Random

    def pause(self) -> None:
        time.sleep(self.rng.uniform(*PAUSE_S))


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def measure_lease(ctx: Ctx) -> Run:
    """``leases.acquire`` + ``leases.release`` of one free name."""
    leases = ctx.store.leases
    name = f"bench-lease-{_tag()}"
    samples = []
    for i in range(ctx.warmup + ctx.n):
        start = time.perf_counter()
        grant = leases.acquire(name, HOLDER, LEASE_TTL_S)
        if grant is None:
            raise BenchError(f"acquire of the free name {name} returned None")
        released = leases.release(grant)
        elapsed = time.perf_counter() - start
        if not released:
            raise BenchError(f"release of a current grant of {name} returned False")
        if i >= ctx.warmup:
            samples.append(elapsed * 1000.0)
    return Run(samples)


def measure_txn(ctx: Ctx, request_ids: bool = False) -> Run:
    """``kv.txn`` of 2 VersionIs + 2 Put (with a fresh ``request_id`` each if asked)."""
    kv = ctx.store.kv
    a, b = f"bench/txn/{_tag()}/a", f"bench/txn/{_tag()}/b"
    va, vb = kv.put(a, b"0").version, kv.put(b, b"0").version
    samples = []
    for i in range(ctx.warmup + ctx.n):
        value = str(i).encode()
        request_id = uuid.uuid4().hex if request_ids else None
        start = time.perf_counter()
        result = kv.txn([VersionIs(a, va), VersionIs(b, vb)], [Put(a, value), Put(b, value)],
                        request_id=request_id)  # fmt: skip
        elapsed = time.perf_counter() - start
        if not result.ok or len(result.versions) != 2:
            raise BenchError(f"txn whose compares hold was refused: {result}")
        va, vb = result.versions
        if i >= ctx.warmup:
            samples.append(elapsed * 1000.0)
    return Run(samples)


def measure_feed(ctx: Ctx) -> Run:
    """``kv.put`` called → a waiter in ``kv.wait`` + ``kv.changes`` holds the change."""
    prefix = f"bench/feed/{_tag()}/"
    key = prefix + "k"
    samples, early = [], 0
    with waiter("feed", ctx.store, ctx.url, prefix, ctx.threaded) as chan:
        for i in range(ctx.warmup + ctx.n):
            _expect(chan, "waiting")
            ctx.pause()
            value = str(i).encode()
            start = time.monotonic()
            ctx.store.kv.put(key, value)
            _, arrived, got, returns = _expect(chan, "got")
            if got != value:
                raise BenchError(f"waiter got {got!r} for the put of {value!r}")
            if i >= ctx.warmup:
                samples.append((arrived - start) * 1000.0)
                early += returns
        _expect(chan, "waiting")
        ctx.store.kv.put(prefix + STOP_KEY, b"")
    return Run(samples, early)


def measure_wake(ctx: Ctx) -> Run:
    """``leases.release`` called → a waiter blocked in ``leases.wait`` has returned."""
    leases = ctx.store.leases
    name = f"bench-wake-{_tag()}"
    samples, early = [], 0
    with waiter("wake", ctx.store, ctx.url, name, ctx.threaded) as chan:
        for i in range(ctx.warmup + ctx.n):
            grant = leases.acquire(name, HOLDER, LEASE_TTL_S)
            if grant is None:
                raise BenchError(f"acquire of the free name {name} returned None")
            chan.send("go")
            _expect(chan, "waiting")
            ctx.pause()
            start = time.monotonic()
            leases.release(grant)
            _, returned, _, returns = _expect(chan, "got")
            if returned < start:  # an early return raced the release: no sample
                returns += 1
            elif i >= ctx.warmup:
                samples.append((returned - start) * 1000.0)
            if i >= ctx.warmup:
                early += returns
        chan.send("stop")
    if not samples:
        raise BenchError("every wait returned before its release")
    return Run(samples, early)


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    fn: Callable[[Ctx], Run]
    waits: bool = False  # a waiter is involved (early returns are meaningful)


TXN = "kv.txn 2 VersionIs + 2 Put"
MEASURES = (
    Measure("lease", "lease acquire+release round trip", measure_lease),
    Measure("txn", TXN, measure_txn),
    Measure("txn_rid", f"{TXN}, request_id", partial(measure_txn, request_ids=True)),
    Measure("feed", "change feed: put → waiter has it", measure_feed, waits=True),
    Measure("wake", "release → blocked leases.wait returns", measure_wake, waits=True),
)


# -- driver ---------------------------------------------------------------------------


@contextmanager
def target(backend: str) -> Iterator[tuple[str, bool, str]]:
    """(url, threaded waiters, description) of a fresh store of ``backend``."""
    if backend == "memory":
        yield "memory://", True, "memory://, waiter threads"
    elif backend == "sqlite":
        tmp = Path(tempfile.mkdtemp(prefix="taskspace-bench-contract-", dir="/tmp"))
        try:
            yield f"sqlite:///{tmp / 'contract.db'}", False, "SQLite file, waiter processes"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif backend == "redis":
        with RedisServer() as server:
            yield server.url, False, f"private redis-server {server.version}, waiter processes"
    else:
        raise BenchError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def run_backend(backend: str, config: ContractBench, console: Console) -> BackendResults:
    """Every measure ``config.repeat`` times on a fresh store (runs interleaved, so drift
    on a noisy host hits every measure alike); a failing measure is recorded, not raised."""
    results = BackendResults(backend, runs={m.key: [] for m in MEASURES})
    rng = random.Random(config.seed)
    with target(backend) as (url, threaded, detail):
        results.detail = detail
        store = open_store(url)
        try:
            ctx = Ctx(store, url, threaded, config.n, config.warmup, rng)
            for r in range(config.repeat):
                started = time.monotonic()
                for m in MEASURES:
                    if m.key in results.errors:
                        continue
                    try:
                        results.runs[m.key].append(m.fn(ctx))
                    except Exception as exc:  # noqa: BLE001 - reported in the table
                        results.errors[m.key] = f"{type(exc).__name__}: {exc}"
                console.print(
                    f"[dim]{backend}: run {r + 1}/{config.repeat}"
                    f" ({time.monotonic() - started:.1f} s)"
                )
        finally:
            store.close()
    return results


def run(config: ContractBench, console: Console) -> list[BackendResults]:
    return [run_backend(b, config, console) for b in config.backends]


def _verdict(met: bool) -> str:
    return "[green]met[/]" if met else "[red]MISSED[/]"


def report(config: ContractBench, all_results: list[BackendResults], console: Console) -> bool:
    """Print the table; True if no measure failed and every release → wait p50 is
    under the target."""
    table = Table(title=f"store contract v2: {config.n:,} samples x {config.repeat} runs")
    table.add_column("backend")
    table.add_column("measure")
    table.add_column(f"p50\nmedian of {config.repeat}", justify="right")
    table.add_column(f"p99\nmedian of {config.repeat}", justify="right")
    table.add_column("p50 of each run (ms)", justify="right", style="dim")
    table.add_column("target / notes")
    ok = True
    for res in all_results:
        for i, m in enumerate(MEASURES):
            last = i == len(MEASURES) - 1
            name = f"[bold]{res.backend}[/]" if i == 0 else ""
            runs = res.runs.get(m.key, [])
            if m.key in res.errors or not runs:
                ok = False
                error = res.errors.get(m.key, "no run")
                table.add_row(name, m.label, "error", "error", "", f"[red]{error}[/]",
                              end_section=last)  # fmt: skip
                continue
            p50 = statistics.median([r.quantile(0.5) for r in runs])
            p99 = statistics.median([r.quantile(0.99) for r in runs])
            notes = []
            if m.key == "wake":
                met50, met99 = p50 < TARGET_WAKE_MS, p99 < TARGET_WAKE_MS
                ok = ok and met50
                notes.append(
                    f"< {TARGET_WAKE_MS:g} ms: p50 {_verdict(met50)}, p99 {_verdict(met99)}"
                )
            if m.waits:
                total = sum(len(r.samples_ms) for r in runs)
                notes.append(f"early returns: {sum(r.early for r in runs)} in {total:,}")
            table.add_row(name, m.label, f"{p50:.3f} ms", f"{p99:.3f} ms",
                          "  ".join(f"{r.quantile(0.5):.3f}" for r in runs), "; ".join(notes),
                          end_section=last)  # fmt: skip
    console.print(table)
    details = "; ".join(f"{r.backend}: {r.detail}" for r in all_results)
    console.print(
        f"each run: {config.warmup} unrecorded warm-up samples, then {config.n:,} timed;"
        " quoted: the median over the runs of each run's p50 / p99.",
        "round trips: time.perf_counter around the calls. feed and release → wait: from"
        " just before put/release (time.monotonic, CLOCK_MONOTONIC, shared by every process)"
        " to the waiter having the change / wait having returned; the writer pauses a random"
        f" {PAUSE_S[0] * 1000:g}-{PAUSE_S[1] * 1000:g} ms after the waiter says it is blocking.",
        f"stores: {details}.",
        f"host: {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {platform.platform(terse=True)}; 1-min load average {os.getloadavg()[0]:.2f}",
        sep="\n",
        highlight=False,
    )
    return ok
