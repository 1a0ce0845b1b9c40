"""``taskspace demo``: a hyperparameter sweep that survives losing a worker.

On embedded SQLite in a temporary directory: submits one task per trial,
starts worker processes, SIGKILLs one of them while it runs a trial, starts
a replacement, and shows the killed worker's trial coming back after its
lease and finishing elsewhere. Exit code 0 only if no task was lost.

With ``serve=True`` (``taskspace demo --serve``) it also serves the API and
the dashboard of the demo's space, prints their URL before the sweep starts,
and after the sweep keeps serving, with the workers running and a new trial
submitted every TRICKLE_S seconds, until Ctrl-C (exit code: the sweep's, or
130 if interrupted before it ended).
"""

from __future__ import annotations

import logging
import os
import random
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
from taskspace.errors import TaskNotFound, TaskspaceError
from taskspace.space import Space
from taskspace.tasks.handle import Handle

APP = "taskspace.demo.sweep:make_space"
POLL_S = 0.2
DEADLINE_S = 300.0
KILL_AT_FRACTION = 0.3
DEFAULT_PORT = 8750
TRICKLE_S = 2.0
EXIT_INTERRUPTED = 130

log = logging.getLogger("taskspace.demo")


@dataclass
class _Fleet:
    """The worker processes the demo runs, and the one it killed."""

    url: str
    log_level: str = "error"
    log_dir: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed_pid: int | None = None
    killed_tasks: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        # A short maintainer term: if the worker killed is the maintainer, the
        # next one requeues the lost trial within 2 + 1 s, not 10 + 2.
        command = [sys.executable, "-m", "taskspace", "worker", APP, "--url", self.url,
                   "--concurrency", "1", "--log-level", self.log_level,
                   "--maintainer-ttl", "2", "--maintainer-retry", "1"]  # fmt: skip
        if self.log_dir is None:
            self.procs.append(subprocess.Popen(command, env=env))
            return
        # Serving: the workers log at info (shipped to the dashboard), to a file, not the console.
        path = os.path.join(self.log_dir, f"worker-{len(self.procs)}.log")
        with open(path, "ab") as out:
            self.procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))

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


def _summary(
    console: Console, space: Space, handles: list[Handle], records: list[TaskRecord],
    fleet: _Fleet, started: float,
) -> int:  # fmt: skip
    """Print the leaderboard and the tally; the sweep's exit code."""
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
    return 0 if lost == 0 and failed == 0 and retried > 0 else 1


def _trickle(space: Space, url: str, console: Console) -> None:
    """Submit a random trial every TRICKLE_S seconds, forever (until Ctrl-C)."""
    console.print(
        f"[bold]serving the dashboard at {url} until Ctrl-C[/bold] · "
        f"a new trial every {TRICKLE_S:.0f} s keeps the workers busy"
    )
    configs = grid(len(grid(48)))
    rng = random.Random()
    train = space.get_task("demo.train")
    while True:
        try:
            train.submit(rng.choice(configs))
        except TaskspaceError as exc:  # the demo's own space: report, carry on
            log.warning("demo: submitting a trial failed: %s", exc)
        time.sleep(TRICKLE_S)


def run_demo(
    trials: int = 60, workers: int = 2, keep: bool = False, serve: bool = False,
    port: int = DEFAULT_PORT,
) -> int:  # fmt: skip
    """Run the sweep; return 0 if nothing was lost (and a killed worker's trial
    was retried). With ``serve``, serve the dashboard on ``port`` (a busy
    one: any free port) until Ctrl-C; see the module docstring."""
    # Piped output (a log, CI) gets a wide console that never wraps mid-phrase.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    workdir = tempfile.mkdtemp(prefix="taskspace-demo-")
    url = f"sqlite:///{workdir}/space.db"
    space = make_space(url)
    fleet = _Fleet(url, "info", workdir) if serve else _Fleet(url)
    server = None
    if serve:
        from taskspace.demo.serve import DashboardServer

        server = DashboardServer(space, port=port)
    started = time.monotonic()
    code = EXIT_INTERRUPTED
    try:
        console.print(f"[bold]taskspace demo[/bold]: {trials} trials on {url}, {workers} workers")
        handles = space.get_task("demo.train").submit_many([(p,) for p in grid(trials)])
        if server is not None:
            dashboard = server.start()
            moved = f" (port {port} was busy)" if server.moved else ""
            console.print(f"[bold]dashboard: {dashboard}[/bold]{moved}")
        for _ in range(workers):
            fleet.start()
        records = _watch(space, handles, fleet, console)
        if server is None:
            fleet.stop()
        code = _summary(console, space, handles, records, fleet, started)
        if server is not None:
            _trickle(space, server.url, console)
    except KeyboardInterrupt:
        console.print("interrupted: stopping the workers and the server")
    finally:
        fleet.stop()
        if server is not None:
            server.stop()
        space.close()
    if keep:
        console.print(f"space kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code
