"""``python -m bench locks``: taskspace's locks and elections, and Redis locks beside them.

For each backend (``memory://``, a new SQLite file in a temporary directory, a
private ``redis-server`` on a free loopback port; a fresh namespace per phase):

- **uncontended**: one client, ``ops`` acquire+release pairs of one lock per run,
  ``repeat`` runs (after ``warmup`` unrecorded pairs), the contenders interleaved 50
  pairs at a time so that load changing on a noisy host hits each alike: taskspace's ``space.lock``
  (default ``fair=True``, and ``fair=False``) and, on Redis, redis-py's
  ``redis.lock.Lock`` and python-redis-lock (``redis_lock.Lock``, no auto-renewal).
  All of them run in one child process with the same redis-py and hiredis; the
  child counts the store calls (taskspace's ``leases``/``kv`` methods) and, on
  Redis, the round trips (redis-py ``send_packed_command`` calls: one per command
  or pipeline) of each pair. Quoted: the median over the runs of each run's
  p50/p99; ops/s is one client's rate (pairs over the time spent in them).
- **contended**: ``procs`` spawned processes (threads for ``memory://``, whose store
  lives in one process) loop acquire → release (nothing held in between) on one
  lock for ``contend_s`` seconds, fair and ``fair=False``. Each holder stamps the
  moment ``acquire`` returned and the moment before it called ``release``
  (``time.monotonic``: CLOCK_MONOTONIC, one clock for every process of the host).
  Handoff = the next holder's acquire - the previous holder's release, over the
  handoffs to *another* holder; acquisitions/s over the whole phase; an overlap
  of two holding intervals would be a mutual exclusion violation (must be 0).
- **election failover** (SQLite and Redis): ``candidates`` processes (3) campaign
  (``ttl=failover_ttl``); the leader is SIGKILLed ``kills`` times, each after a
  random 0.2-0.6 s of leading; failover = from just before the kill to the next
  leader's campaign() having returned (its term begun and its record written).
  A candidate's retry is the lease waiter's wake-up (a third of its queue
  entry's TTL, so ttl/3 here), hence the bound TTL + ttl/3.

python-redis-lock is a benchmark-only install: ``pip install --target
<venv-root>/python-redis-lock --no-deps python-redis-lock`` (pure Python; it runs on
the project's redis-py in the child, via PYTHONPATH), made once and reused; never a
project dependency.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.redis_server import RedisServer
from bench.workers import ROOT, BenchError

BACKENDS = ("memory", "sqlite", "redis")
VENV_ROOT = ROOT / ".bench-venv"
REDIS_LOCK_DIR = "python-redis-lock"
REDIS_LOCK_REQUIREMENT = "python-redis-lock>=4"
INSTALL_TIMEOUT_S = 600.0
CHILD_TIMEOUT_S = 600.0
LOCK_TTL_S = 10.0  # far longer than any pair: no renewal, no expiry during a run
CHUNK = 50  # pairs of one contender before the next contender's turn
ACQUIRE_WAIT_S = 5.0  # uncontended acquisitions never wait; this only bounds a bug
START_TIMEOUT_S = 60.0  # spawned processes importing taskspace on a busy host
LEAD_PAUSE_S = (0.2, 0.6)
TARGET_RATIO = 1.2

OURS_FAIR = "taskspace lock (fair)"
OURS_UNFAIR = "taskspace lock (fair=False)"
REDIS_PY = "redis-py Lock"
REDIS_LOCK = "python-redis-lock"


@dataclass(frozen=True)
class LocksBench:
    """Options of one ``bench locks`` run."""

    backends: tuple[str, ...] = BACKENDS
    ops: int = 1_000
    repeat: int = 3
    warmup: int = 50
    procs: int = 8
    contend_s: float = 2.0
    kills: int = 5
    failover_ttl: float = 1.0
    candidates: int = 3
    skip_install: bool = False
    venv_root: Path = VENV_ROOT
    seed: int = 1


def quantile(samples: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks."""
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Latency:
    """One contender's uncontended pairs: ms per run, store calls and round trips per pair."""

    label: str
    runs: list[list[float]] = field(default_factory=list)
    calls: float | None = None
    trips: float | None = None
    version: str = ""
    error: str = ""

    def p(self, q: float) -> float:
        return statistics.median(quantile(run, q) for run in self.runs)

    @property
    def per_second(self) -> float:
        every = [ms for run in self.runs for ms in run]
        return 1000.0 * len(every) / sum(every)


@dataclass
class Contended:
    """One contended phase: every holding interval (acquired, releasing, holder)."""

    label: str
    holders: int
    events: list[tuple[float, float, int]] = field(default_factory=list)
    error: str = ""

    def ordered(self) -> list[tuple[float, float, int]]:
        return sorted(self.events)

    @property
    def per_second(self) -> float:
        got = self.ordered()
        span = max(e[1] for e in got) - got[0][0]
        return len(got) / span if span > 0 else 0.0

    def handoffs_ms(self) -> list[float]:
        """Release → next acquire, for handoffs to another holder."""
        got = self.ordered()
        return [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(got) if a[2] != b[2]]

    def other_share(self) -> float:
        got = self.ordered()
        pairs = len(got) - 1
        return len(self.handoffs_ms()) / pairs if pairs > 0 else 0.0

    def overlaps(self) -> int:
        got = self.ordered()
        return sum(1 for a, b in itertools.pairwise(got) if b[0] < a[1])


@dataclass
class Failover:
    """Election failover times in seconds, and the terms seen (strictly increasing)."""

    ttl: float
    seconds: list[float] = field(default_factory=list)
    terms: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def bound(self) -> float:
        return self.ttl + self.ttl / 3


@dataclass
class BackendResults:
    backend: str
    detail: str = ""
    latency: list[Latency] = field(default_factory=list)
    contended: list[Contended] = field(default_factory=list)
    failover: Failover | None = None

    def errors(self) -> list[str]:
        found = [x.error for x in (*self.latency, *self.contended) if x.error]
        if self.failover is not None and self.failover.error:
            found.append(self.failover.error)
        return found


# -- python-redis-lock, a benchmark-only install ----------------------------------------


def ensure_redis_lock(root: Path, skip_install: bool, console: Console) -> Path:
    """The directory python-redis-lock is installed in (``pip --target``), installed on
    first use; a stamp file holding the requirement makes later runs reuse it."""
    target = root / REDIS_LOCK_DIR
    stamp = target / ".bench-requirements"
    ready = (target / "redis_lock").is_dir() and stamp.exists()
    if ready and stamp.read_text() == REDIS_LOCK_REQUIREMENT:
        return target
    if skip_install:
        raise BenchError(f"{target} is missing or out of date; run without --skip-install")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--upgrade", "--target", str(target), REDIS_LOCK_REQUIREMENT]  # fmt: skip
    with console.status(f"installing {REDIS_LOCK_REQUIREMENT} into {target}"):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"pip install took more than {INSTALL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        noise = "WARNING: Location"  # the configured local indexes' harmless complaints
        err = "\n".join(x for x in done.stderr.splitlines() if not x.startswith(noise))
        raise BenchError(f"pip install {REDIS_LOCK_REQUIREMENT} failed:\n{err[-3000:]}")
    stamp.write_text(REDIS_LOCK_REQUIREMENT)
    return target


# -- uncontended: the child process -----------------------------------------------------


class Counter:
    """Store calls (taskspace's leases/kv methods) and Redis round trips of this process."""

    calls = 0
    trips = 0


class _Counting:
    """Counts every method call of the wrapped store protocol object."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            Counter.calls += 1
            return attr(*args, **kwargs)

        return counted


def _count_redis_sends() -> None:
    from redis.connection import AbstractConnection

    send = AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        Counter.trips += 1
        send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


Pair = Callable[[], None]


def _ours(url: str, name: str, fair: bool) -> tuple[Pair, str]:
    from taskspace import Space

    space = Space(url)
    store = space.store
    store.leases = _Counting(store.leases)  # type: ignore[misc]
    store.kv = _Counting(store.kv)  # type: ignore[misc]
    lock = space.lock(name, ttl=LOCK_TTL_S, fair=fair)

    def pair() -> None:
        lease = lock.acquire(wait=ACQUIRE_WAIT_S)
        if lease is None or not lease.release():
            raise RuntimeError(f"{name}: uncontended acquire+release failed")

    return pair, "taskspace"


def _redis_py(url: str, name: str) -> tuple[Pair, str]:
    import redis

    lock = redis.Redis.from_url(url).lock(name, timeout=LOCK_TTL_S)

    def pair() -> None:
        if not lock.acquire(blocking=True, blocking_timeout=ACQUIRE_WAIT_S):
            raise RuntimeError(f"{name}: redis-py Lock not acquired")
        lock.release()

    return pair, f"redis-py {redis.__version__}"


def _redis_lock(url: str, name: str) -> tuple[Pair, str]:
    import importlib.metadata

    import redis
    import redis_lock

    lock = redis_lock.Lock(redis.Redis.from_url(url), name, expire=int(LOCK_TTL_S))

    def pair() -> None:
        if not lock.acquire(blocking=True, timeout=int(ACQUIRE_WAIT_S)):
            raise RuntimeError(f"{name}: python-redis-lock not acquired")
        lock.release()

    return pair, f"python-redis-lock {importlib.metadata.version('python-redis-lock')}"


def _contender(label: str, url: str, plain: str, tag: str) -> tuple[Pair, str]:
    if label == OURS_FAIR:
        return _ours(url, f"{tag}-fair", True)
    if label == OURS_UNFAIR:
        return _ours(url, f"{tag}-unfair", False)
    if label == REDIS_PY:
        return _redis_py(plain, f"bench-locks:{tag}:redis-py")
    if label == REDIS_LOCK:
        return _redis_lock(plain, f"bench-locks:{tag}:python-redis-lock")
    raise BenchError(f"unknown contender {label!r}")


def _timed(pair: Pair, n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        began = clock()
        pair()
        out.append((clock() - began) * 1000)
    return out


def _chunk(
    row: Latency, pair: Pair, n: int, sink: list[float], tally: dict[str, list[int]]
) -> None:
    """``n`` timed pairs of ``row`` into ``sink``, their store calls and round trips
    into ``tally``; an exception marks the row failed."""
    try:
        before = (Counter.calls, Counter.trips)
        sink.extend(_timed(pair, n))
        tally[row.label][0] += Counter.calls - before[0]
        tally[row.label][1] += Counter.trips - before[1]
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row.error = f"{type(exc).__name__}: {exc}"


def _measure(rows: list[Latency], pairs: dict[str, Pair], spec: dict[str, Any]) -> None:
    """``repeat`` runs of ``ops`` pairs per contender, interleaved CHUNK pairs at a time
    (in a rotating order), so that load changing on the host hits every contender alike."""
    ops, repeat = spec["ops"], spec["repeat"]
    live = [row for row in rows if not row.error]
    if not live:
        return
    tally = {row.label: [0, 0] for row in live}
    for row in live:
        _chunk(row, pairs[row.label], spec["warmup"], [], {row.label: [0, 0]})
    for r in range(repeat):
        samples: dict[str, list[float]] = {row.label: [] for row in live}
        for i, done in enumerate(range(0, ops, CHUNK)):
            turn = (r + i) % len(live)
            for row in live[turn:] + live[:turn]:
                if not row.error:
                    _chunk(row, pairs[row.label], min(CHUNK, ops - done), samples[row.label],
                           tally)  # fmt: skip
        for row in live:
            row.runs.append(samples[row.label])
    for row in live:
        if not row.error:
            calls, trips = (n / (repeat * ops) for n in tally[row.label])
            row.calls = calls if row.label.startswith("taskspace") else None
            row.trips = trips if spec["redis"] else None


def uncontended_child(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run in the child: every contender of ``spec`` interleaved; rows as dicts."""
    if spec["redis"]:
        _count_redis_sends()
    rows = [Latency(label) for label in spec["contenders"]]
    pairs: dict[str, Pair] = {}
    for row in rows:
        try:
            pairs[row.label], row.version = _contender(row.label, spec["url"], spec["plain"],
                                                       spec["tag"])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row.error = f"{type(exc).__name__}: {exc}"
    _measure(rows, pairs, spec)
    return [asdict(row) for row in rows]


def run_uncontended(spec: dict[str, Any], pythonpath: list[Path]) -> list[Latency]:
    """``uncontended_child(spec)`` in a fresh interpreter (``pythonpath`` first)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    cmd = [sys.executable, "-m", "bench.locks", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BenchError(f"the uncontended run took more than {CHILD_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(f"the uncontended run failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")  # fmt: skip
    last = done.stdout.strip().splitlines()[-1]
    return [Latency(**row) for row in json.loads(last)]


# -- contended ---------------------------------------------------------------------------


Event = tuple[float, float, int]


def contend(space: Any, name: str, fair: bool, seconds: float, who: int) -> list[Event]:
    """Acquire → release (nothing held between) until ``seconds`` have passed."""
    lock = space.lock(name, ttl=LOCK_TTL_S, fair=fair)
    end = time.monotonic() + seconds
    events: list[Event] = []
    while (left := end - time.monotonic()) > 0:
        lease = lock.acquire(wait=left)
        if lease is None:
            break
        got = time.monotonic()
        releasing = time.monotonic()
        lease.release()
        events.append((got, releasing, who))
    return events


def _contend_child(url: str, phases: list[tuple[str, bool, float]], barrier: Any,
                   out: Any) -> None:  # fmt: skip
    from taskspace import Space

    space = Space(url)
    space.store.leases.holders("warm-up")  # connect before the clock starts
    for name, fair, seconds in phases:
        barrier.wait(START_TIMEOUT_S)
        out.put(contend(space, name, fair, seconds, os.getpid()))
    space.close()


def _phases(config: LocksBench, tag: str) -> list[tuple[str, bool, float]]:
    return [(f"{tag}-contended-{'fair' if fair else 'unfair'}", fair, config.contend_s)
            for fair in (True, False)]  # fmt: skip


def contended_threads(url: str, config: LocksBench, tag: str) -> list[Contended]:
    """The contended phases with ``procs`` threads of one process (``memory://``)."""
    from taskspace import Space

    space = Space(url)
    rows = []
    for name, fair, seconds in _phases(config, tag):
        row = Contended(OURS_FAIR if fair else OURS_UNFAIR, config.procs)
        found: list[list[Event]] = []

        def one(who: int, name: str = name, fair: bool = fair, seconds: float = seconds,
                found: list[list[Event]] = found) -> None:  # fmt: skip
            found.append(contend(space, name, fair, seconds, who))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(config.procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row.events = [e for events in found for e in events]
        rows.append(row)
    space.close()
    return rows


def contended_processes(url: str, config: LocksBench, tag: str) -> list[Contended]:
    """The contended phases with ``procs`` spawned processes, all phases on one set."""
    ctx = multiprocessing.get_context("spawn")
    phases = _phases(config, tag)
    barrier = ctx.Barrier(config.procs + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_contend_child, args=(url, phases, barrier, out), daemon=True)
             for _ in range(config.procs)]  # fmt: skip
    for p in procs:
        p.start()
    rows = []
    try:
        for _name, fair, seconds in phases:
            barrier.wait(START_TIMEOUT_S)
            row = Contended(OURS_FAIR if fair else OURS_UNFAIR, config.procs)
            for _ in procs:
                row.events.extend(out.get(timeout=seconds + START_TIMEOUT_S))
            rows.append(row)
    finally:
        for p in procs:
            p.join(START_TIMEOUT_S)
            if p.is_alive():
                p.kill()
    return rows


# -- election failover -------------------------------------------------------------------


def _candidate(url: str, name: str, ttl: float, out: Any) -> None:
    from taskspace import Space

    election = Space(url).election(name)
    identity = f"candidate-{os.getpid()}"
    out.put(("ready", os.getpid(), 0, 0.0))
    while True:
        term = election.campaign(identity=identity, ttl=ttl)
        out.put(("leads", os.getpid(), term.number, time.monotonic()))
        while term.active:
            time.sleep(0.02)


def _next(out: Any, kind: str, timeout: float) -> tuple[str, int, int, float]:
    deadline = time.monotonic() + timeout
    while True:
        message: tuple[str, int, int, float] = out.get(timeout=max(0.01, deadline -
                                                                  time.monotonic()))  # fmt: skip
        if message[0] == kind:
            return message


def failover(url: str, config: LocksBench, tag: str, rng: random.Random) -> Failover:
    """SIGKILL the leader ``config.kills`` times; time to the next leader acting."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    result = Failover(config.failover_ttl)
    name, ttl = f"{tag}-failover", config.failover_ttl
    procs: dict[int, Any] = {}

    def start() -> None:
        p = ctx.Process(target=_candidate, args=(url, name, ttl, out), daemon=True)
        p.start()
        procs[p.pid or 0] = p

    for _ in range(config.candidates):
        start()
    try:
        _, leader, term, _ = _next(out, "leads", START_TIMEOUT_S)
        result.terms.append(term)
        for left in reversed(range(config.kills)):
            time.sleep(rng.uniform(*LEAD_PAUSE_S))
            killed = time.monotonic()
            procs.pop(leader).kill()
            _, leader, term, acting = _next(out, "leads", ttl * 10 + 5)
            result.seconds.append(acting - killed)
            result.terms.append(term)
            if left:
                start()  # back to config.candidates, ready before the next kill
                _next(out, "ready", START_TIMEOUT_S)
    finally:
        for p in procs.values():
            p.kill()
            p.join(5)
    return result


# -- driver ------------------------------------------------------------------------------


@contextmanager
def target(backend: str, server: RedisServer | None) -> Iterator[tuple[str, str, str]]:
    """(taskspace URL, plain Redis URL or "", description) of a fresh store."""
    if backend == "memory":
        yield "memory://", "", "memory://, threads"
    elif backend == "sqlite":
        tmp = Path(tempfile.mkdtemp(prefix="taskspace-bench-locks-", dir="/tmp"))
        try:
            yield f"sqlite:///{tmp / 'locks.db'}", "", "SQLite file in /tmp, processes"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif backend == "redis" and server is not None:
        namespace = f"bench-locks-{uuid.uuid4().hex[:8]}"
        yield (
            f"{server.url}?namespace={namespace}",
            server.url,
            f"private redis-server {server.version} on port {server.port}, processes",
        )
    else:
        raise BenchError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def _guarded(what: str, fn: Callable[[], Any]) -> tuple[Any, str]:
    try:
        return fn(), ""
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"{what}: {type(exc).__name__}: {exc}"


def run_backend(backend: str, config: LocksBench, server: RedisServer | None,
                redis_lock_dir: Path | str, console: Console) -> BackendResults:  # fmt: skip
    """Every phase on one backend; a failing phase is recorded, not raised."""
    res = BackendResults(backend)
    rng = random.Random(config.seed)
    with target(backend, server) as (url, plain, detail):
        res.detail = detail
        tag = uuid.uuid4().hex[:8]
        started = time.monotonic()
        contenders = [OURS_FAIR, OURS_UNFAIR]
        if plain:
            contenders += [REDIS_PY, REDIS_LOCK]
        spec = {
            "url": url,
            "plain": plain,
            "redis": bool(plain),
            "tag": tag,
            "ops": config.ops,
            "repeat": config.repeat,
            "warmup": config.warmup,
            "contenders": contenders,
        }
        path = [redis_lock_dir] if isinstance(redis_lock_dir, Path) else []
        rows, error = _guarded("uncontended", lambda: run_uncontended(spec, path))
        res.latency = rows or [Latency(c, error=error) for c in contenders]
        if plain and isinstance(redis_lock_dir, str):
            res.latency[-1] = Latency(REDIS_LOCK, error=redis_lock_dir)
        console.print(f"[dim]{backend}: uncontended ({time.monotonic() - started:.1f} s)")
        started = time.monotonic()
        many = contended_threads if backend == "memory" else contended_processes
        found, error = _guarded("contended", lambda: many(url, config, tag))
        res.contended = found or [Contended(OURS_FAIR, config.procs, error=error)]
        console.print(f"[dim]{backend}: contended ({time.monotonic() - started:.1f} s)")
        if backend != "memory" and config.kills > 0:
            started = time.monotonic()
            got, error = _guarded("failover", lambda: failover(url, config, tag, rng))
            res.failover = got or Failover(config.failover_ttl, error=error)
            console.print(f"[dim]{backend}: election failover ({time.monotonic() - started:.1f} s)")
    return res


def run(config: LocksBench, console: Console) -> list[BackendResults]:
    redis_lock_dir: Path | str = ""
    if "redis" in config.backends:
        try:
            redis_lock_dir = ensure_redis_lock(config.venv_root, config.skip_install, console)
        except BenchError as exc:
            redis_lock_dir = str(exc)  # that row shows the error; the rest still runs
    server = RedisServer().start() if "redis" in config.backends else None
    try:
        return [run_backend(b, config, server, redis_lock_dir, console) for b in config.backends]
    finally:
        if server is not None:
            server.stop()


# -- report ------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f} ms"


def _ratio(row: Latency, base: Latency | None) -> str:
    if base is None or row.error or base.error or not base.runs or row is base:
        return ""
    ratio = row.p(0.5) / base.p(0.5)
    verdict = ""
    if row.label == OURS_FAIR or row.label == OURS_UNFAIR:
        verdict = " [green]met[/]" if ratio <= TARGET_RATIO else " [red]MISSED[/]"
    return f"{ratio:.2f}x{verdict}"


def _latency_table(config: LocksBench, results: list[BackendResults]) -> Table:
    table = Table(title=f"uncontended acquire+release: one client, {config.ops:,} pairs x "
                        f"{config.repeat} runs (medians of the runs' p50/p99)")  # fmt: skip
    for col in ("backend", "lock", "p50", "p99", "pairs/s", "store calls", "round trips",
                f"p50 vs redis-py (target <= {TARGET_RATIO}x)"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("backend", "lock") else "right")
    for res in results:
        base = next((r for r in res.latency if r.label == REDIS_PY), None)
        for i, row in enumerate(res.latency):
            name = f"[bold]{res.backend}[/]" if i == 0 else ""
            last = i == len(res.latency) - 1
            label = row.version if row.label.startswith(("redis-py", "python-")) else row.label
            label = label or row.label
            if row.error or not row.runs:
                table.add_row(name, label, "error", "", "", "", "",
                              f"[red]{row.error or 'no run'}[/]", end_section=last)  # fmt: skip
                continue
            calls = f"{row.calls:.2f}" if row.calls is not None else ""
            trips = f"{row.trips:.2f}" if row.trips is not None else ""
            table.add_row(name, label, _ms(row.p(0.5)), _ms(row.p(0.99)),
                          f"{row.per_second:,.0f}", calls, trips, _ratio(row, base),
                          end_section=last)  # fmt: skip
    return table


def _contended_table(config: LocksBench, results: list[BackendResults]) -> Table:
    table = Table(title=f"contended: {config.procs} holders on one lock, acquire → release"
                        f" for {config.contend_s:g} s")  # fmt: skip
    for col in ("backend", "lock", "acquisitions/s", "handoff p50", "handoff p99",
                "to another holder", "overlaps"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("backend", "lock") else "right")
    for res in results:
        for i, row in enumerate(res.contended):
            name = f"[bold]{res.backend}[/]" if i == 0 else ""
            last = i == len(res.contended) - 1
            hand = row.handoffs_ms()
            if row.error or len(row.events) < 2 or not hand:
                why = row.error or f"{len(row.events)} acquisitions"
                table.add_row(name, row.label, "error", "", "", "", f"[red]{why}[/]",
                              end_section=last)  # fmt: skip
                continue
            overlaps = row.overlaps()
            table.add_row(name, row.label, f"{row.per_second:,.0f}", _ms(quantile(hand, 0.5)),
                          _ms(quantile(hand, 0.99)), f"{row.other_share():.0%}",
                          f"[red]{overlaps}[/]" if overlaps else "0", end_section=last)  # fmt: skip
    return table


def _failover_table(config: LocksBench, results: list[BackendResults]) -> Table:
    table = Table(title=f"election failover: {config.candidates} candidates, leader SIGKILLed"
                        f" {config.kills} times, ttl={config.failover_ttl:g} s")  # fmt: skip
    for col in ("backend", "kills", "p50", "max", "bound ttl + ttl/3", "terms increase"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for res in results:
        fo = res.failover
        if fo is None:
            continue
        if fo.error or not fo.seconds:
            table.add_row(res.backend, "error", "", "", "", f"[red]{fo.error or 'no kill'}[/]")
            continue
        worst = max(fo.seconds)
        met = "[green]met[/]" if worst <= fo.bound else "[red]MISSED[/]"
        rising = all(a < b for a, b in itertools.pairwise(fo.terms))
        table.add_row(res.backend, str(len(fo.seconds)), f"{statistics.median(fo.seconds):.3f} s",
                      f"{worst:.3f} s", f"{fo.bound:.3f} s {met}",
                      "yes" if rising else "[red]NO[/]")  # fmt: skip
    return table


def report(config: LocksBench, results: list[BackendResults], console: Console) -> bool:
    """Print the tables; True if nothing failed and no overlap was seen."""
    console.print(_latency_table(config, results))
    console.print(_contended_table(config, results))
    if any(r.failover is not None for r in results):
        console.print(_failover_table(config, results))
    details = "; ".join(f"{r.backend}: {r.detail}" for r in results)
    console.print(
        "store calls: taskspace's leases/kv method calls per pair; round trips: redis-py"
        " send_packed_command calls per pair (a command, a script call or a pipeline).",
        "handoff: from just before release() to the next holder's acquire() having returned"
        " (time.monotonic, shared by every process), over handoffs to another holder.",
        f"stores: {details}.",
        f"host: {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {platform.platform(terse=True)}; 1-min load average {os.getloadavg()[0]:.2f}",
        sep="\n",
        highlight=False,
    )
    overlaps = sum(row.overlaps() for r in results for row in r.contended)
    return not any(r.errors() for r in results) and overlaps == 0


if __name__ == "__main__":
    print(json.dumps(uncontended_child(json.loads(sys.argv[1]))))
