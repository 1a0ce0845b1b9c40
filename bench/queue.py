"""Queue benchmark: submit rate, drain throughput of no-op tasks, submit→result round trip.

Every measured phase gets a fresh store (a new SQLite file in a temporary directory,
removed at the end, a fresh ``memory://`` store, or a flushed Redis database: a private
``redis-server`` unless ``--url`` names one). Each phase is repeated
``repeat`` times and the median is quoted next to every run's figure.

Drain throughput is measured on the store's own clock: from the earliest
``TaskRecord.started`` to the latest ``TaskRecord.finished``, so interpreter and
worker start-up are excluded; wall time (launch → every worker exited) is
reported next to it.
"""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.apps import NOOP, make_space
from bench.redis_server import RedisServer, flushdb
from bench.workers import BenchError, ProcessWorkers, ThreadWorkers, WorkerGroup
from taskspace import Handle, Space
from taskspace.backends import open_store
from taskspace.backends.base import Outcome, TaskSpec

BACKENDS = ("sqlite", "memory", "redis", "postgres")
# postgres: the database phases use (each phase in a fresh schema, dropped at the end).
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_DRAIN_PER_S = 5000.0
TARGET_RTT_P50_MS = 5.0
WARMUP_ROUNDTRIPS = 20
STATS_EVERY_S = 0.25  # progress display: how often to count finished tasks
ALIVE_EVERY_S = 0.01  # how often to check whether the workers have exited (wall time)
REGISTER_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class QueueBench:
    """Options of one ``bench queue`` run."""

    backend: str = "sqlite"
    tasks: int = 20_000
    workers: int = 2
    concurrency: tuple[int, ...] = (32,)
    roundtrips: int = 500
    repeat: int = 3
    singles: int = 2_000
    batch: int = 1_000
    keep: bool = False
    # redis: the server to use (flushed before every phase); "" starts one.
    # postgres: the database (a fresh schema per phase); "" is DEFAULT_POSTGRES_URL.
    url: str = ""
    delayed: int = 100_000  # future tasks queued ahead of the claim-latency phase (0: skip it)
    claims: int = 1_000  # one-task claims timed in that phase
    claims_only: bool = False  # run only the claim-latency phase


@dataclass(frozen=True)
class DrainRun:
    """One drain: every figure but ``wall_s`` comes from the store's records."""

    concurrency: int
    tasks: int
    busy_s: float  # min(started) → max(finished), store clock
    wall_s: float  # launch → all workers exited
    startup_s: float  # launch → first task started

    @property
    def rate(self) -> float:
        return self.tasks / self.busy_s


@dataclass(frozen=True)
class RoundTripRun:
    """Latencies of sequential ``submit(); result()`` pairs, in milliseconds."""

    samples_ms: list[float]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms)


@dataclass
class Results:
    """Every run's figures, by phase."""

    single: list[float] = field(default_factory=list)
    batched: list[float] = field(default_factory=list)
    drains: dict[int, list[DrainRun]] = field(default_factory=dict)
    roundtrips: list[RoundTripRun] = field(default_factory=list)
    roundtrip_concurrency: int = 0
    delayed: dict[int, list[DelayedRun]] = field(default_factory=dict)
    load_before: float = 0.0
    load_after: float = 0.0


class Sandbox:
    """Fresh stores for each phase; SQLite files live in one temporary directory, Redis
    phases share ``url``'s database, flushed before each."""

    def __init__(self, backend: str, keep: bool, url: str = "") -> None:
        self.backend = backend
        self.keep = keep
        self.redis_url = url
        self.pg_url = url or DEFAULT_POSTGRES_URL
        self.schemas: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="taskspace-bench-", dir="/tmp"))
        self._count = 0

    def url(self, tag: str) -> str:
        """A URL naming a store nobody has used yet."""
        self._count += 1
        if self.backend == "memory":
            return "memory://"  # a fresh store per Space
        if self.backend == "redis":
            flushdb(self.redis_url)
            return self.redis_url
        if self.backend == "postgres":
            schema = f"bench_{os.getpid()}_{self._count:02d}_{tag}".lower().replace("-", "_")
            self.schemas.append(schema)
            sep = "&" if "?" in self.pg_url else "?"
            return f"{self.pg_url}{sep}schema={schema}&pool_max=40"
        return f"sqlite:///{self.dir / f'{self._count:02d}-{tag}.db'}"

    def space(self, tag: str) -> Space:
        return make_space(self.url(tag))

    def workers(
        self, space: Space, count: int, concurrency: int, *, burst: bool, tag: str
    ) -> WorkerGroup:
        if self.backend == "memory":
            return ThreadWorkers(space, count, concurrency, burst=burst)
        return ProcessWorkers(
            space.url, count, concurrency, burst=burst, log_dir=self.dir, tag=f"{self._count}-{tag}"
        )

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._drop_schemas()

    def _drop_schemas(self) -> None:
        """Drop the schemas the PostgreSQL phases made (best effort)."""
        if not self.schemas:
            return
        import psycopg

        try:
            with psycopg.connect(self.pg_url.split("?")[0], autocommit=True) as conn:
                for schema in self.schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]
        except psycopg.Error as exc:
            print(f"could not drop the bench schemas {self.schemas}: {exc}")


@contextmanager
def _phase(progress: Progress, label: str, total: float | None) -> Iterator[TaskID]:
    task = progress.add_task(label, total=total)
    try:
        yield task
    finally:
        progress.remove_task(task)


# -- phases -------------------------------------------------------------------


def bench_single(sandbox: Sandbox, n: int, progress: Progress, label: str) -> float:
    """Tasks/s of ``n`` sequential ``task.submit()`` calls."""
    with sandbox.space("single") as space, _phase(progress, label, n) as bar:
        task = space.get_task(NOOP)
        task.submit(0)  # open the store outside the timed loop
        step = max(1, n // 100)
        start = time.perf_counter()
        for i in range(n):
            task.submit(i)
            if i % step == 0:
                progress.update(bar, completed=i)
        elapsed = time.perf_counter() - start
    return n / elapsed


def submit_batched(
    space: Space, n: int, batch: int, progress: Progress, label: str
) -> tuple[float, list[Handle]]:
    """Submit ``n`` no-op tasks with ``submit_many`` in chunks of ``batch``;
    return tasks/s and the handles."""
    task = space.get_task(NOOP)
    space.stats()  # open the store outside the timed loop
    handles: list[Handle] = []
    with _phase(progress, label, n) as bar:
        start = time.perf_counter()
        for lo in range(0, n, batch):
            handles.extend(task.submit_many([(i,) for i in range(lo, min(n, lo + batch))]))
            progress.update(bar, completed=len(handles))
        elapsed = time.perf_counter() - start
    return n / elapsed, handles


def bench_batched(sandbox: Sandbox, n: int, batch: int, progress: Progress, label: str) -> float:
    with sandbox.space("batched") as space:
        rate, _ = submit_batched(space, n, batch, progress, label)
    return rate


def _watch(group: WorkerGroup, space: Space, progress: Progress, bar: TaskID) -> None:
    """Show progress until every worker has exited (burst mode)."""
    next_stats = 0.0
    while group.alive():
        now = time.monotonic()
        if now >= next_stats:
            stats = space.stats()
            done = sum(stats.total(s) for s in ("succeeded", "failed", "dead", "cancelled"))
            progress.update(bar, completed=done)
            next_stats = now + STATS_EVERY_S
        time.sleep(ALIVE_EVERY_S)


def _verify(space: Space, handles: Sequence[Handle]) -> tuple[float, float]:
    """Check every task succeeded exactly once; return (min started, max finished)."""
    first, last = float("inf"), float("-inf")
    bad: dict[str, int] = {}
    for handle in handles:
        rec = handle.info()
        if rec.state != "succeeded" or rec.attempts != 1 or rec.started is None:
            key = f"{rec.state}/attempts={rec.attempts}"
            bad[key] = bad.get(key, 0) + 1
            continue
        assert rec.finished is not None
        first = min(first, rec.started)
        last = max(last, rec.finished)
    if bad:
        raise BenchError(f"not every task succeeded on its first attempt: {bad}")
    stats = space.stats()
    if stats.total("succeeded") != len(handles) or stats.stale_finishes:
        raise BenchError(f"store counts disagree: {stats}")
    return first, last


def bench_drain(
    sandbox: Sandbox, config: QueueBench, concurrency: int, progress: Progress, label: str
) -> DrainRun:
    """Pre-submit ``config.tasks`` no-ops, then drain them with burst workers."""
    with sandbox.space(f"drain-c{concurrency}") as space:
        _, handles = submit_batched(space, config.tasks, config.batch, progress, label + " submit")
        group = sandbox.workers(space, config.workers, concurrency, burst=True, tag="drain")
        with _phase(progress, label, config.tasks) as bar:
            launched_store = space.store.clock.wall()  # tasks record started on the wall clock
            start = time.perf_counter()
            group.start()
            try:
                _watch(group, space, progress, bar)
                group.join(timeout=60.0)
            except BaseException:
                group.kill()
                raise
            wall = time.perf_counter() - start
        first, last = _verify(space, handles)
    return DrainRun(concurrency, config.tasks, last - first, wall, first - launched_store)


def _wait_registered(space: Space, group: WorkerGroup, count: int) -> None:
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while len(space.workers()) < count:
        if not group.alive():
            group.join(timeout=5.0)
            raise BenchError("workers exited before registering")
        if time.monotonic() > deadline:
            raise BenchError(f"{count} workers did not register within {REGISTER_TIMEOUT_S} s")
        time.sleep(0.05)


def bench_roundtrip(
    sandbox: Sandbox, config: QueueBench, concurrency: int, progress: Progress, label: str
) -> RoundTripRun:
    """Sequential submit→result pairs against idle, already-registered workers."""
    with sandbox.space("roundtrip") as space:
        task = space.get_task(NOOP)
        group = sandbox.workers(space, config.workers, concurrency, burst=False, tag="rtt")
        group.start()
        samples: list[float] = []
        try:
            with _phase(progress, label + " (workers starting)", None):
                _wait_registered(space, group, config.workers)
            for i in range(WARMUP_ROUNDTRIPS):
                task.submit(i).result(timeout=RESULT_TIMEOUT_S)
            with _phase(progress, label, config.roundtrips) as bar:
                for i in range(config.roundtrips):
                    start = time.perf_counter()
                    value = task.submit(i).result(timeout=RESULT_TIMEOUT_S)
                    samples.append((time.perf_counter() - start) * 1000.0)
                    if value != i:
                        raise BenchError(f"round trip {i} returned {value!r}")
                    progress.update(bar, completed=i + 1)
        except BaseException:
            group.kill()
            raise
        group.stop()  # SIGTERM for processes
        group.join(timeout=60.0)
    return RoundTripRun(samples)


# -- claims behind delayed tasks ----------------------------------------------------

DELAYED_DELAY_S = 7 * 24 * 3600.0  # far in the future: never due during the run
DELAYED_PUSH_BATCH = 5_000


@dataclass(frozen=True)
class DelayedRun:
    """Claim latency (ms) with ``delayed`` future tasks sitting in the same queue."""

    delayed: int
    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)


def _spec(i: int, delay: float = 0.0) -> TaskSpec:
    return TaskSpec(id=f"{delay:g}-{i}", name=NOOP, payload=b"[0]", delay=delay)


def bench_claim_behind_delayed(
    sandbox: Sandbox, delayed: int, claims: int, progress: Progress, label: str
) -> DelayedRun:
    """p50 of one-task claims (each followed by its finish) while ``delayed`` tasks
    due in a week wait in the same queue, submitted before the ready ones."""
    store = open_store(sandbox.url(f"delayed-{delayed}"))
    try:
        with _phase(progress, label + " submit", delayed) as bar:
            for lo in range(0, delayed, DELAYED_PUSH_BATCH):
                hi = min(delayed, lo + DELAYED_PUSH_BATCH)
                store.queue.push([_spec(i, DELAYED_DELAY_S) for i in range(lo, hi)])
                progress.update(bar, completed=hi)
        store.queue.push([_spec(i) for i in range(claims)])
        samples: list[float] = []
        with _phase(progress, label, claims) as bar:
            for i in range(claims):
                start = time.perf_counter()
                (record,) = store.queue.claim(["default"], "bench", 1)
                samples.append((time.perf_counter() - start) * 1000.0)
                store.queue.finish([(record.lease, Outcome("succeeded", result=b"0"))])
                if i % 100 == 0:
                    progress.update(bar, completed=i)
        return DelayedRun(delayed, samples)
    finally:
        store.close()


# -- driver and report -----------------------------------------------------------


def _repeat(config: QueueBench, what: str, fn: Callable[[str], T]) -> list[T]:
    """``fn(label)`` ``config.repeat`` times."""
    return [fn(f"{what} [{r + 1}/{config.repeat}]") for r in range(config.repeat)]


def run(config: QueueBench, console: Console) -> Results:
    """Run every phase ``config.repeat`` times; return the raw figures."""
    with ExitStack() as stack:
        if config.backend == "redis" and not config.url:
            server = stack.enter_context(RedisServer())
            console.print(f"[dim]private redis-server {server.version} on {server.url}")
            config = replace(config, url=server.url)
        return _run(config, console)


def _probe(sandbox: Sandbox) -> None:
    """Open the backend once, so a missing one fails with one line, not mid-phase."""
    try:
        with sandbox.space("probe"):
            pass
    except Exception as exc:
        raise BenchError(f"backend {sandbox.backend} unavailable: {exc}") from exc


def _run(config: QueueBench, console: Console) -> Results:
    results = Results(load_before=os.getloadavg()[0])
    sandbox = Sandbox(config.backend, config.keep, config.url)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    try:
        _probe(sandbox)
        with progress:
            if not config.claims_only:
                _run_phases(config, sandbox, progress, results)
            if config.delayed:
                _run_delayed(config, sandbox, progress, results)
    finally:
        sandbox.cleanup()
    results.load_after = os.getloadavg()[0]
    if config.keep:
        console.print(f"kept {sandbox.dir}")
    return results


def _run_delayed(
    config: QueueBench, sandbox: Sandbox, progress: Progress, results: Results
) -> None:
    """Claim latency with no delayed task and with ``config.delayed`` of them."""
    results.delayed = {0: [], config.delayed: []}
    for r in range(config.repeat):
        for count in results.delayed:
            label = f"claims behind {count:,} delayed [{r + 1}/{config.repeat}]"
            run = bench_claim_behind_delayed(sandbox, count, config.claims, progress, label)
            results.delayed[count].append(run)


def _run_phases(config: QueueBench, sandbox: Sandbox, progress: Progress, results: Results) -> None:
    """Submit rates, drains and round trips, ``config.repeat`` times each."""
    single = partial(bench_single, sandbox, config.singles, progress)
    results.single = _repeat(config, "submit single", single)
    batched = partial(bench_batched, sandbox, config.tasks, config.batch, progress)
    results.batched = _repeat(config, "submit_many", batched)
    # Interleave the concurrency levels so a noisy host's drift hits them all alike.
    results.drains = {k: [] for k in config.concurrency}
    for r in range(config.repeat):
        for k in config.concurrency:
            label = f"drain c={k} [{r + 1}/{config.repeat}]"
            results.drains[k].append(bench_drain(sandbox, config, k, progress, label))
    best = max(config.concurrency, key=lambda k: _median(r.rate for r in results.drains[k]))
    results.roundtrip_concurrency = best
    roundtrip = partial(bench_roundtrip, sandbox, config, best, progress)
    results.roundtrips = _repeat(config, "round trip", roundtrip)


def _median(values: Iterator[float] | Sequence[float]) -> float:
    return statistics.median(list(values))


def _runs(values: Sequence[float], fmt: str) -> str:
    return "  ".join(format(v, fmt) for v in values)


def report(config: QueueBench, results: Results, console: Console) -> bool:
    """Print the results table; return True if every target that applies was met."""
    sqlite = config.backend == "sqlite"
    kind = (
        "worker processes (python -m taskspace worker --burst)"
        if config.backend != "memory"
        else "in-process worker threads (memory:// lives in one process)"
    )
    table = Table(title=f"taskspace queue benchmark: {config.backend}")
    table.add_column("measure")
    table.add_column(f"median of {config.repeat}", justify="right")
    table.add_column("runs", justify="right", style="dim")
    table.add_column("target", justify="right")
    ok = True

    def row(
        label: str, values: Sequence[float], unit: str, target: str = "", end: bool = False
    ) -> None:
        fmt = ",.0f" if unit == "tasks/s" else ".2f"
        median = f"{_median(values):{fmt}} {unit}"
        table.add_row(label, median, _runs(values, fmt), target, end_section=end)

    def verdict(met: bool, text: str) -> str:
        nonlocal ok
        if not sqlite:
            return ""
        ok = ok and met
        return f"{text} " + ("[green]met[/]" if met else "[red]MISSED[/]")

    row(f"submit() x {config.singles:,} sequential", results.single, "tasks/s")
    row(
        f"submit_many, {config.tasks:,} in {config.batch:,}s",
        results.batched, "tasks/s", end=True,
    )  # fmt: skip
    for k, runs in results.drains.items():
        rates = [r.rate for r in runs]
        target = verdict(_median(rates) >= TARGET_DRAIN_PER_S, f">= {TARGET_DRAIN_PER_S:,.0f}/s")
        row(f"drain c={k}: throughput", rates, "tasks/s", target)
        row("  wall time", [r.wall_s for r in runs], "s")
        row("  start-up", [r.startup_s for r in runs], "s", end=True)
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        values = [r.quantile(q) for r in results.roundtrips]
        target = ""
        if q == 0.5:
            target = verdict(_median(values) <= TARGET_RTT_P50_MS, f"<= {TARGET_RTT_P50_MS:g} ms")
        row(f"round trip {label}", values, "ms", target)
    row("round trip mean", [r.mean for r in results.roundtrips], "ms")
    console.print(table)
    console.print(
        f"drain: {config.tasks:,} pre-submitted no-op tasks, {config.workers} {kind},"
        " c = --concurrency per worker. throughput = tasks / (max finished - min started)"
        " from the store's records (store clock, start-up excluded); wall time = launch"
        " until every worker exited; start-up = launch until the first task started.",
        f"round trip: {config.roundtrips} sequential submit(); result() pairs after"
        f" {WARMUP_ROUNDTRIPS} warm-up pairs, {config.workers} idle registered workers at"
        f" c={results.roundtrip_concurrency} (the best drain median).",
        "targets: " + ("SQLite, this host" if sqlite else "apply to SQLite only"),
        f"host: {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" SQLite {sqlite3.sqlite_version}, {platform.platform(terse=True)};"
        f" 1-min load average {results.load_before:.2f} before, {results.load_after:.2f} after",
        sep="\n",
    )
    return ok


def report_delayed(config: QueueBench, results: Results, console: Console) -> None:
    """Print claim latency without and with ``config.delayed`` future tasks queued."""
    table = Table(title=f"claims behind delayed tasks: {config.backend}")
    table.add_column("delayed tasks in the queue", justify="right")
    table.add_column(f"claim p50, median of {config.repeat}", justify="right")
    table.add_column("runs (p50, ms)", justify="right", style="dim")
    table.add_column("claim p99", justify="right")
    for count, runs in results.delayed.items():
        p50s = [r.p50 for r in runs]
        p99 = _median([RoundTripRun(r.samples_ms).quantile(0.99) for r in runs])
        table.add_row(f"{count:,}", f"{_median(p50s):.3f} ms", _runs(p50s, ".3f"), f"{p99:.3f} ms")
    console.print(table)
    console.print(
        f"{config.claims:,} one-task claims (each followed by its finish) with the delayed"
        " tasks (due in 7 days, submitted first) in the same queue; store API called"
        " in-process, no worker."
    )
