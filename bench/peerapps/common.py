"""What the peer drivers share: the execution recorder, worker processes, the measured phases.

Runs in the peers' virtual environment only (stdlib and redis-py).

Drain timing keeps Redis out of the task: each worker process counts its own executions
of the no-op task and keeps the wall-clock time of the first and the last one; a daemon
thread publishes those three numbers to a Redis hash every ``PUBLISH_S``. The driver sums
the hashes until the count reaches the number of tasks enqueued, then takes min(first) and
max(last). Where every task runs in a process of its own (RQ's default forking worker) no
thread outlives the task, so the task pushes its timestamp to a Redis list instead
(``direct`` mode), one extra Redis call per task.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

ENV_URL = "BENCH_REDIS_URL"
ENV_VARIANT = "BENCH_VARIANT"
ENV_RECORD = "BENCH_RECORD_KEY"
ENV_RECORD_MODE = "BENCH_RECORD_MODE"
PUBLISH_S = 0.02
POLL_S = 0.05
STALL_TIMEOUT_S = 60.0  # a drain with no progress for this long has failed
SETTLE_S = 0.5  # after the last task: time for a duplicate delivery to show up
FIRST_RESULT_TIMEOUT_S = 90.0  # the first round trip waits for the workers to start
WORKER_GRACE_S = 2.0  # after the first round trip: the other worker process comes up
WARMUP_ROUNDTRIPS = 20
RESULT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class PeerError(RuntimeError):
    """A phase could not produce a valid figure."""


def redis_url() -> str:
    try:
        return os.environ[ENV_URL]
    except KeyError:
        raise PeerError(f"{ENV_URL} is not set; run this through python -m bench peers") from None


def variant() -> str:
    return os.environ.get(ENV_VARIANT, "default")


def connect(url: str) -> Any:
    """A redis-py client (imported here so the project's type checker never needs redis-py)."""
    redis = importlib.import_module("redis")
    return redis.Redis.from_url(url)


def progress(line: str) -> None:
    """A line for the orchestrator's status display."""
    print(f"@ {line}", flush=True)


class Recorder:
    """Counts this process's executions of the no-op task; see the module docstring."""

    def __init__(self) -> None:
        self.key = os.environ.get(ENV_RECORD, "")
        self.direct = os.environ.get(ENV_RECORD_MODE) == "direct"
        self._lock = threading.Lock()
        self._pid = 0
        self._count = 0
        self._first = 0.0
        self._last = 0.0
        self._conn: Any = None

    def mark(self, conn: Any = None) -> None:
        """Count one execution; ``conn``: a client to use in direct mode (the peer's own)."""
        if not self.key:
            return
        now = time.time()
        if self.direct and conn is not None:
            conn.rpush(f"{self.key}:direct", repr(now))
            return
        if self._pid != os.getpid():
            self._attach()
        if self.direct:
            self._conn.rpush(f"{self.key}:direct", repr(now))
            return
        with self._lock:
            if self._count == 0:
                self._first = now
            self._count += 1
            self._last = now

    def _attach(self) -> None:
        """First mark in this process (after a fork the parent's counts are not ours)."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._count = 0
            self._conn = connect(redis_url())
            if not self.direct:
                threading.Thread(target=self._publish, args=(os.getpid(),), daemon=True).start()
            self._pid = os.getpid()

    def _publish(self, pid: int) -> None:
        hkey = f"{self.key}:{pid}"
        self._conn.sadd(f"{self.key}:procs", hkey)
        sent = -1
        while True:
            time.sleep(PUBLISH_S)
            with self._lock:
                count, first, last = self._count, self._first, self._last
            if count != sent:
                self._conn.hset(hkey, mapping={"count": count, "first": first, "last": last})
                sent = count


@dataclass(frozen=True)
class Recorded:
    count: int
    first: float
    last: float


def recorded(conn: Any, key: str, *, full: bool) -> Recorded:
    """Sum what every worker process published under ``key`` (``full``: read the direct
    list's timestamps too, not only its length)."""
    count, first, last = 0, float("inf"), float("-inf")
    for hkey in conn.smembers(f"{key}:procs"):
        c, f, la = conn.hmget(hkey, "count", "first", "last")
        if c is not None and int(c) > 0:
            count += int(c)
            first, last = min(first, float(f)), max(last, float(la))
    direct = f"{key}:direct"
    if full:
        stamps = [float(v) for v in conn.lrange(direct, 0, -1)]
        if stamps:
            count += len(stamps)
            first, last = min(first, min(stamps)), max(last, max(stamps))
    else:
        count += int(conn.llen(direct))
    return Recorded(count, first, last)


class Workers:
    """Worker processes, each the leader of a new process group so that stopping them
    also reaches the children they fork (pools, work horses)."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log_dir: Path, tag: str):
        self.commands = commands
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.tag = tag
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(self) -> None:
        for i, cmd in enumerate(self.commands):
            log = (self.log_dir / f"{self.tag}-{i}.log").open("wb")
            self._logs.append(log)
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            self.procs.append(proc)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        """SIGTERM each leader, wait, then SIGKILL whatever is left of each group."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for log in self._logs:
            log.close()
        self._logs = []

    def tail(self) -> str:
        out = []
        for path in sorted(self.log_dir.glob(f"{self.tag}-*.log")):
            out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(out)


class Peer(Protocol):
    """One configuration of one peer, as the driver sees it."""

    label: str  # the row's name
    config: str  # how it is set up, for the table; "{n}" stands for the worker count
    notes: tuple[str, ...]
    batch_api: str  # the bulk API used, "" if the peer has none
    record_mode: str  # "process" or "direct", see Recorder

    def enqueue_each(self, n: int) -> None: ...

    def enqueue_batched(self, n: int, batch: int) -> None: ...

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        """``n`` sequential submit + wait-for-result pairs; milliseconds each."""
        ...

    def worker_commands(self, workers: int) -> list[list[str]]: ...


def time_each(n: int, pair: Callable[[int], object]) -> list[float]:
    """Milliseconds of ``pair(i)`` for i in range(n); each must return i."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        value = pair(i)
        samples.append((time.perf_counter() - start) * 1000.0)
        if value != i:
            raise PeerError(f"round trip {i} returned {value!r}")
    return samples


def chunks(n: int, size: int) -> list[range]:
    return [range(lo, min(n, lo + size)) for lo in range(0, n, size)]


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter (the peers' venv)."""
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class Options:
    url: str
    tasks: int
    singles: int
    batch: int
    roundtrips: int
    workers: int
    log_dir: Path


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phase_single(peer: Peer, opts: Options) -> dict[str, float]:
    peer.enqueue_each(1)  # connect outside the timed loop
    return {"rate": opts.singles / _timed(lambda: peer.enqueue_each(opts.singles))}


def phase_batched(peer: Peer, opts: Options) -> dict[str, float]:
    peer.enqueue_each(1)
    return {"rate": opts.tasks / _timed(lambda: peer.enqueue_batched(opts.tasks, opts.batch))}


def phase_drain(peer: Peer, opts: Options, conn: Any) -> dict[str, float]:
    """Pre-enqueue ``tasks`` no-ops, start the workers, wait for every execution."""
    if peer.batch_api:
        peer.enqueue_batched(opts.tasks, opts.batch)
    else:
        peer.enqueue_each(opts.tasks)
    key = f"bench:rec:{uuid.uuid4().hex}"
    env = {ENV_RECORD: key, ENV_RECORD_MODE: peer.record_mode}
    workers = Workers(peer.worker_commands(opts.workers), env, opts.log_dir, f"{peer.label}-drain")
    launched = time.time()
    workers.start()
    try:
        rec = _wait_drained(workers, conn, key, opts.tasks)
        time.sleep(SETTLE_S)
        rec = recorded(conn, key, full=True)
    finally:
        workers.stop()
    busy = rec.last - rec.first
    return {
        "tasks": opts.tasks, "rate": opts.tasks / busy, "busy_s": busy,
        "startup_s": rec.first - launched, "executions": rec.count,
    }  # fmt: skip


def _wait_drained(workers: Workers, conn: Any, key: str, tasks: int) -> Recorded:
    seen, moved = -1, time.monotonic()
    while True:
        rec = recorded(conn, key, full=False)
        if rec.count >= tasks:
            return rec
        now = time.monotonic()
        if rec.count != seen:
            seen, moved = rec.count, now
            progress(f"drain {rec.count}/{tasks}")
        if not workers.alive():
            raise PeerError(f"a worker exited during the drain:\n{workers.tail()}")
        if now - moved > STALL_TIMEOUT_S:
            raise PeerError(
                f"no progress for {STALL_TIMEOUT_S:.0f} s at {rec.count}/{tasks}:\n{workers.tail()}"
            )
        time.sleep(POLL_S)


def phase_roundtrip(peer: Peer, opts: Options) -> dict[str, list[float]]:
    """Sequential submit→result pairs against idle, warmed-up workers."""
    env = {ENV_RECORD: ""}
    workers = Workers(peer.worker_commands(opts.workers), env, opts.log_dir, f"{peer.label}-rtt")
    workers.start()
    try:
        peer.roundtrips(1, FIRST_RESULT_TIMEOUT_S)
        time.sleep(WORKER_GRACE_S)
        peer.roundtrips(WARMUP_ROUNDTRIPS, RESULT_TIMEOUT_S)
        samples = peer.roundtrips(opts.roundtrips, RESULT_TIMEOUT_S)
        if not workers.alive():
            raise PeerError(f"a worker exited during the round trips:\n{workers.tail()}")
    finally:
        workers.stop()
    return {"samples_ms": samples}


def run_phases(peer: Peer, opts: Options) -> dict[str, Any]:
    """Every phase on a flushed database; a failed phase is reported, the others still run."""
    conn = connect(opts.url)
    out: dict[str, Any] = {
        "label": peer.label, "config": peer.config.format(n=opts.workers),
        "notes": list(peer.notes),
        "batch_api": peer.batch_api, "errors": {},
    }  # fmt: skip
    phases: Sequence[tuple[str, Callable[[], object]]] = (
        ("single", lambda: phase_single(peer, opts)),
        ("batched", lambda: phase_batched(peer, opts) if peer.batch_api else None),
        ("drain", lambda: phase_drain(peer, opts, conn)),
        ("roundtrip", lambda: phase_roundtrip(peer, opts)),
    )
    for name, phase in phases:
        conn.flushdb()
        progress(name)
        try:
            out[name] = phase()
        except Exception as exc:  # noqa: BLE001 - a peer's failure is reported in its row
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
    conn.flushdb()
    return out
