"""Groups of workers the benchmark starts and stops: OS processes or in-process threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Protocol

from taskspace import Space
from taskspace.worker import Worker, WorkerReport
from taskspace.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
APP = "bench.apps:make_space"
STOP_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    """The benchmark could not produce a valid figure (a worker failed, tasks were lost)."""


class WorkerGroup(Protocol):
    """What a phase needs from its workers, whichever kind they are."""

    kind: str

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...

    def join(self, timeout: float) -> None: ...

    def kill(self) -> None: ...


class ProcessWorkers:
    """``count`` ``python -m taskspace worker`` processes on ``url`` (SIGTERM to stop)."""

    kind = "processes"

    def __init__(
        self, url: str, count: int, concurrency: int, *, burst: bool, log_dir: Path, tag: str
    ) -> None:
        self.url = url
        self.tag = tag
        self.count = count
        self.command = [
            sys.executable, "-m", "taskspace", "worker", APP, "--url", url,
            "--concurrency", str(concurrency), "--log-level", "warning",
        ]  # fmt: skip
        if burst:
            self.command.append("--burst")
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.pop("TASKSPACE_URL", None)
        for i in range(self.count):
            log = (self.log_dir / f"{self.tag}-worker-{i}.log").open("wb")
            self._logs.append(log)
            proc = subprocess.Popen(
                self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            self.procs.append(proc)

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def join(self, timeout: float = STOP_TIMEOUT_S) -> None:
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
                raise BenchError(f"worker pid {proc.pid} did not exit in {timeout} s") from None
        self._close_logs()
        bad = [(p, c) for p, c in zip(self.procs, codes, strict=True) if c != 0]
        if bad:
            proc, code = bad[0]
            raise BenchError(f"worker pid {proc.pid} exited with {code}:\n{self._tail()}")

    def kill(self) -> None:
        """Last-resort cleanup: SIGKILL the processes this group started, by pid."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._close_logs()

    def _close_logs(self) -> None:
        for log in self._logs:
            log.close()
        self._logs = []

    def _tail(self) -> str:
        text = []
        for path in sorted(self.log_dir.glob(f"{self.tag}-worker-*.log")):
            text.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(text)


class ThreadWorkers:
    """``count`` :class:`taskspace.Worker` instances, each on its own thread in this process
    (the memory:// store lives in one process, so its workers must too)."""

    kind = "in-process threads"

    def __init__(self, space: Space, count: int, concurrency: int, *, burst: bool) -> None:
        config = {"concurrency": concurrency, "burst": burst, "install_signal_handlers": False}
        self.workers = [Worker(space, WorkerConfig.build(**config)) for _ in range(count)]
        self.threads: list[threading.Thread] = []
        self.reports: list[WorkerReport] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def _run(self, worker: Worker) -> None:
        try:
            report = worker.run()
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)
            raise
        with self._lock:
            self.reports.append(report)

    def start(self) -> None:
        for i, worker in enumerate(self.workers):
            thread = threading.Thread(target=self._run, args=(worker,), name=f"bench-worker-{i}")
            thread.start()
            self.threads.append(thread)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(grace=0.0)

    def join(self, timeout: float = STOP_TIMEOUT_S) -> None:
        for thread in self.threads:
            thread.join(timeout)
            if thread.is_alive():
                raise BenchError(f"worker thread {thread.name} did not exit in {timeout} s")
        if self.errors:
            raise BenchError(f"a worker thread failed: {self.errors[0]!r}")

    def kill(self) -> None:
        self.stop()
        for thread in self.threads:
            thread.join(STOP_TIMEOUT_S)
