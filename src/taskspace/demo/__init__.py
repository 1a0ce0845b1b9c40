"""``taskspace demo``: a hyperparameter sweep that survives losing a worker.

On embedded SQLite in a temporary directory: submits one task per trial,
starts worker processes, SIGKILLs one of them while it runs a trial, starts
a replacement, and shows the killed worker's trial coming back after its
lease and finishing elsewhere. Exit code 0 only if no task was lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from taskspace.backends.base import FINAL_STATES, TaskRecord
from taskspace.demo.sweep import grid, make_space
from taskspace.errors import TaskNotFound
from taskspace.space import Space
from taskspace.tasks.handle import Handle

APP = "taskspace.demo.sweep:make_space"
POLL_S = 0.2
DEADLINE_S = 300.0
KILL_AT_FRACTION = 0.3


@dataclass
class _Fleet:
    """The worker processes the demo runs, and the one it killed."""

    url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed_pid: int | None = None
    killed_tasks: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        # A short maintainer term: if the worker killed is the maintainer, the
        # next one requeues the lost trial within 2 + 1 s, not 10 + 2.
        command = [sys.executable, "-m", "taskspace", "worker", APP, "--url", self.url,
                   "--concurrency", "1", "--log-level", "error",
                   "--maintainer-ttl", "2", "--maintainer-retry", "1"]  # fmt: skip
        self.procs.append(subprocess.Popen(command, env=env))

    def kill_one(self, records: list[TaskRecord]) -> bool:
        """SIGKILL a worker that is running a trial right now; True if one was killed."""
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            mine = [
                r.id
                for r in records
                if r.state == "running" and f":{proc.pid}:" in (r.worker or "")
            ]
            if mine:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.killed_pid, self.killed_tasks = proc.pid, mine
                return True
        return False

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _records(space: Space, handles: list[Handle]) -> list[TaskRecord]:
    """Every trial's record, in one round trip; a missing one is a lost space or a bug."""
    records = space.store.queue.get_many([h.id for h in handles])
    missing = [h.id for h, r in zip(handles, records, strict=True) if r is None]
    if missing:
        space.store.check_space()  # SpaceLost if the space was wiped under the demo
        raise TaskNotFound(missing[0])
    return [r for r in records if r is not None]


def _leaderboard(records: list[TaskRecord], space: Space, killed_pid: int | None) -> Table:
    """The ten best trials, plus every trial retried after its worker was
    killed (wherever it ranks), marked with its attempts."""
    table = Table(title="leaderboard (3-fold CV accuracy on digits)")
    for column in ("rank", "model", "parameters", "accuracy", "attempts"):
        table.add_column(column, justify="right" if column in ("rank", "accuracy") else "left")
    results: list[tuple[dict[str, Any], TaskRecord]] = []
    for rec in records:
        if rec.state == "succeeded" and rec.result is not None:
            results.append((space.codec.decode(rec.result), rec))
    results.sort(key=lambda item: -float(item[0]["accuracy"]))
    for rank, (res, rec) in enumerate(results, start=1):
        if rank > 10 and not rec.lost:
            continue
        params = {k: v for k, v in res["params"].items() if k != "model"}
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        attempts = str(rec.attempts)
        if rec.lost:
            attempts = f"[red]{rec.attempts} · retried: worker pid {killed_pid} killed[/red]"
        table.add_row(str(rank), res["params"]["model"], shown, f"{res['accuracy']:.4f}", attempts)
    return table


def _watch(
    space: Space, handles: list[Handle], fleet: _Fleet, console: Console
) -> list[TaskRecord]:
    columns = (TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())  # fmt: skip
    deadline = time.monotonic() + DEADLINE_S
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("sweep", total=len(handles), note="")
        while True:
            records = _records(space, handles)
            done = sum(r.state in FINAL_STATES for r in records)
            running = sum(r.state == "running" for r in records)
            note = f"{running} running"
            midway = done >= KILL_AT_FRACTION * len(handles)
            if fleet.killed_pid is None and midway and fleet.kill_one(records):
                console.print(
                    f"[red]SIGKILLed worker pid {fleet.killed_pid}[/red] while it ran "
                    f"{len(fleet.killed_tasks)} trial(s); starting a replacement"
                )
                fleet.start()
            if fleet.killed_pid is not None:
                note += f" · killed pid {fleet.killed_pid}"
            progress.update(bar, completed=done, note=note)
            if done == len(handles) or time.monotonic() > deadline:
                return records
            time.sleep(POLL_S)


def run_demo(trials: int = 60, workers: int = 2, keep: bool = False) -> int:
    """Run the sweep; return 0 if nothing was lost (and a killed worker's trial was retried)."""
    # Piped output (a log, CI) gets a wide console that never wraps mid-phrase.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    workdir = tempfile.mkdtemp(prefix="taskspace-demo-")
    url = f"sqlite:///{workdir}/space.db"
    space = make_space(url)
    fleet = _Fleet(url)
    started = time.monotonic()
    try:
        console.print(f"[bold]taskspace demo[/bold]: {trials} trials on {url}, {workers} workers")
        handles = space.get_task("demo.train").submit_many([(p,) for p in grid(trials)])
        for _ in range(workers):
            fleet.start()
        records = _watch(space, handles, fleet, console)
    finally:
        fleet.stop()
    console.print(_leaderboard(records, space, fleet.killed_pid))
    succeeded = sum(r.state == "succeeded" for r in records)
    failed = sum(r.state in ("failed", "dead", "cancelled") for r in records)
    retried = sum(r.lost > 0 for r in records)
    lost = len(handles) - succeeded - failed
    console.print(
        f"submitted {len(handles)} · succeeded {succeeded} · failed {failed} · "
        f"retried after worker loss {retried} · [bold]lost {lost}[/bold] · "
        f"{time.monotonic() - started:.1f} s"
    )
    space.close()
    if keep:
        console.print(f"space kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if lost == 0 and failed == 0 and retried > 0 else 1
