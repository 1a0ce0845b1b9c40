"""Real worker processes for the fault-injection tests, and ways to watch them.

Everything here takes a backend URL, so the same tests run on every backend
in :data:`FAULT_BACKENDS`. Workers are separate interpreters started with the
repository root as cwd and on ``PYTHONPATH``, so they import
``tests.faults.app`` exactly as a user's app would be imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from taskspace import Space
from taskspace.backends.base import TaskRecord
from tests.services import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "tests.faults.app:make_space"

# Backends the fault tests run on (the tests do not change).
FAULT_BACKENDS = ["sqlite", "redis", "postgres"]
PG_IDLE_IN_TRANSACTION_S = 0.25

# Figure lines printed by tests; conftest.py repeats them in the terminal summary.
FIGURES: list[str] = []

T = TypeVar("T")


@contextlib.contextmanager
def fault_backend(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, private URL on ``backend``, valid while inside.

    Redis: a redis-server of the test's own (a few milliseconds to start), so a
    test that stops, kills or stalls things shares nothing with any other test;
    it is killed and its directory removed on the way out. PostgreSQL: a fresh
    schema in the run's test database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/space.db"
    elif backend == "redis":
        server = RedisServer().start()
        try:
            yield server.namespaced_url()
        finally:
            server.close()
    elif backend == "postgres":
        from tests.services import postgres_url

        # A fresh schema; tests that kill the server use PgCluster. A process the
        # nemesis stops inside one of its transactions holds that transaction's
        # row locks until the server ends its session: with the default 3 s the
        # others wait longer than the short TTLs these tests use, so end it fast.
        yield f"{postgres_url()}&idle_in_transaction_timeout={PG_IDLE_IN_TRANSACTION_S}"
    else:
        raise AssertionError(f"no fault-test URL for backend {backend!r}")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, T, Z...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (dead, waiting to be reaped)."""
    return process_state(pid) not in (None, "Z")


def pid_exists(pid: int) -> bool:
    """True while ``pid`` exists at all (a zombie still exists: it is not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- markers left by tests.faults.app -----------------------------------------


@dataclass(frozen=True, slots=True)
class Marker:
    """One event of one attempt: ``<task id>.<token>.<event>`` holding the writer's pid."""

    task_id: str
    token: int
    event: str
    pid: int


def read_markers(marks: Path) -> list[Marker]:
    """Every complete marker in ``marks``."""
    out = []
    for path in marks.iterdir():
        if path.name.endswith(".part"):
            continue
        task_id, token, event = path.name.split(".")
        pid = int(path.read_text().split()[0])
        out.append(Marker(task_id, int(token), event, pid))
    return out


def markers_of(marks: Path, task_id: str, event: str | None = None) -> list[Marker]:
    """Markers of one task (optionally of one event), oldest token first."""
    found = [m for m in read_markers(marks) if m.task_id == task_id]
    return sorted((m for m in found if event is None or m.event == event), key=lambda m: m.token)


def square_violations(
    i: int, record: TaskRecord, value: object, attempts: list[Marker]
) -> list[str]:
    """Everything wrong with task ``i`` of ``faults.square`` (its stored record and
    result, and every marker its attempts left); an empty list when it ended exactly once."""
    found = []
    starts = {m.token: m.pid for m in attempts if m.event == "start"}
    ends = {m.token: m.pid for m in attempts if m.event == "end"}
    if record.state != "succeeded":
        return [f"task {i} ended {record.state}: {record.error}"]
    expected = {"x": i, "square": i * i, "pid": ends.get(record.token), "token": record.token,
                "attempt": record.attempts}  # fmt: skip
    if value != expected:
        found.append(f"task {i}: stored result {value} is not its last attempt's {expected}")
    if record.token not in starts or starts[record.token] != ends.get(record.token):
        found.append(f"task {i}: accepted token {record.token} matches no attempt {starts}")
    if any(token > record.token for token in starts):
        found.append(f"task {i}: an attempt ran after the accepted one: {sorted(starts)}")
    if len(starts) > record.attempts:
        found.append(f"task {i}: {len(starts)} attempts ran but {record.attempts} were claimed")
    if record.attempts != record.lost + 1:
        found.append(f"task {i}: attempts {record.attempts} != lost {record.lost} + 1")
    return found


# -- worker processes -----------------------------------------------------------


@dataclass(eq=False)
class WorkerProc:
    """One worker process; its output goes to ``log_path``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    command: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` if the process has not been reaped yet."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit code."""
        self.send(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (after SIGCONT, in case it is stopped) and wait for the exit code."""
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    """The worker processes of one test; :meth:`close` reaps every one of them."""

    url: str
    workdir: Path
    workers: list[WorkerProc] = field(default_factory=list)

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1",
            "TASKSPACE_URL": self.url,
        }

    def _spawn(self, command: list[str], label: str) -> WorkerProc:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{len(self.workers):03d}-{label}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see close()
        )
        worker = WorkerProc(proc, log_path, log_file, command)
        self.workers.append(worker)
        return worker

    def start(
        self, *, concurrency: int = 1, grace: float = 30.0, slow_finish: float = 0.0
    ) -> WorkerProc:
        """A worker with fault-test timings (fast maintenance), via tests.faults.runner;
        ``slow_finish`` delays each of its finish calls (a slow store)."""
        command = [sys.executable, "-m", "tests.faults.runner", "--url", self.url,
                   "--concurrency", str(concurrency), "--grace", str(grace),
                   "--slow-finish", str(slow_finish)]  # fmt: skip
        return self._spawn(command, "runner")

    def start_cli(self, *extra: str, concurrency: int = 1, grace: float = 30.0) -> WorkerProc:
        """A worker (or, with ``--processes``, a supervisor) through ``python -m taskspace``,
        with the shortest maintainer term (1 s) so that failover fits the tests' timeouts."""
        command = [sys.executable, "-m", "taskspace", "worker", APP, "--url", self.url,
                   "--concurrency", str(concurrency), "--shutdown-grace", str(grace),
                   "--maintainer-ttl", "1", "--maintainer-retry", "1",
                   "--log-level", "warning", *extra]  # fmt: skip
        return self._spawn(command, "cli")

    def wait_ready(self, worker: WorkerProc, space: Space, timeout: float = 20.0) -> None:
        """Wait until ``worker`` has announced itself in the registry (so it is running
        its loop, with its signal handlers installed)."""
        wait_for(
            lambda: any(int(w["pid"]) == worker.pid for w in space.workers()),
            timeout,
            f"worker pid {worker.pid} to register",
        )

    def close(self) -> None:
        """Kill and reap whatever is still running; close every log.

        Each worker leads its own process group, which its descendants (supervised
        children, task processes) share: killing the group leaves no orphan behind,
        even when a test failed half way."""
        for worker in self.workers:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.pid, sig)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=10)
            worker.log_file.close()

    def logs(self, tail: int = 4000) -> str:
        """The end of every worker's log, for failure reports."""
        parts = []
        for worker in self.workers:
            text = worker.log_path.read_text(errors="replace") if worker.log_path.exists() else ""
            parts.append(f"--- pid {worker.pid} {worker.log_path.name} ---\n{text[-tail:]}")
        return "\n".join(parts)


# -- pausing a worker --------------------------------------------------------------


@contextlib.contextmanager
def writes_blocked(url: str) -> Iterator[None]:
    """While inside, no other client is in the middle of a store write.

    A process stopped inside a SQLite write transaction would hold the
    database's write lock for as long as it stays stopped and stall every
    other client (that is SQLite, not a taskspace bug). Holding the write lock
    ourselves while sending SIGSTOP guarantees the stopped worker holds none:
    at worst it is stopped while *waiting* for the lock. Backends whose
    operations are single atomic server-side steps need nothing.
    """
    if not url.startswith("sqlite:///"):
        yield
        return
    path = url[len("sqlite:///") :].partition("?")[0]
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def pause(worker: WorkerProc, url: str) -> None:
    """SIGSTOP ``worker`` at a moment it holds no store lock; returns once it is stopped."""
    with writes_blocked(url):
        worker.send(signal.SIGSTOP)
        wait_for(lambda: process_state(worker.pid) == "T", 5.0, f"pid {worker.pid} to stop")


def resume(worker: WorkerProc) -> None:
    worker.send(signal.SIGCONT)


# -- the network between a client and Redis ------------------------------------------


class ReplyDropper:
    """A TCP proxy in front of a server on loopback that, once armed, swallows the first
    reply containing ``trigger``: it closes that connection (both ways) instead of
    forwarding the reply. The command ran on the server, its answer never arrives, as
    when the network fails after the server acted. Everything else passes through."""

    def __init__(self, upstream_port: int, trigger: bytes) -> None:
        self.upstream_port = upstream_port
        self.trigger = trigger
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (of the upstream server) rewritten to go through the proxy."""
        return url.replace(f":{self.upstream_port}/", f":{self.port}/", 1)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if replies and self.armed.is_set() and self.trigger in data:
                    self.armed.clear()
                    self.dropped.set()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
