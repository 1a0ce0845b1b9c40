"""``python -m bench peers``: taskspace next to Celery, RQ, Dramatiq, Huey and arq.

Every system runs against one private ``redis-server`` (loopback, no persistence),
flushed before every phase, with the same number of worker processes and no-op tasks
that return their argument (every system stores each result, as taskspace does):

- **enqueue/s single**: ``singles`` sequential enqueues from one client;
- **enqueue/s batched**: ``tasks`` enqueues through the peer's bulk API, ``batch`` at a
  time (each row's notes say which API, and whether it is really one round trip);
- **drain tasks/s**: ``tasks`` pre-enqueued, then the workers start; tasks over the time
  from the first task's start to the last task's end. Peers: each worker process counts
  its executions in memory and publishes count/first/last to Redis from a side thread,
  so the task makes no extra Redis call (see :mod:`bench.peerapps.common`); taskspace:
  the store's own started/finished records, as in ``bench queue``;
- **round trip**: ``roundtrips`` sequential submit + wait-for-result pairs against idle,
  warmed-up workers, through each peer's result mechanism.

The peers live in their own virtual environments under ``.bench-venv/<peer>/`` (one
per peer: arq needs redis-py < 6, Celery's Redis transport >= 6.4), made once and
reused; none of them is a project dependency. Their code is :mod:`bench.peerapps`,
run only by those interpreters.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench.apps import make_space
from bench.queue import (
    QueueBench,
    RoundTripRun,
    Sandbox,
    bench_batched,
    bench_drain,
    bench_roundtrip,
    bench_single,
)
from bench.redis_server import RedisServer, flushdb
from bench.workers import ROOT, BenchError

VENV_ROOT = ROOT / ".bench-venv"
# Lower bounds only: the newest release the index serves is what gets measured.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "celery": ("celery[redis]>=5.3", "hiredis>=2"),
    "rq": ("rq>=1.16", "hiredis>=2"),
    "dramatiq": ("dramatiq[redis]>=1.16", "hiredis>=2"),
    "huey": ("huey[redis]>=2.5", "hiredis>=2"),
    "arq": ("arq>=0.26",),
}
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "celery": ("celery", "kombu", "redis", "hiredis"),
    "rq": ("rq", "redis", "hiredis"),
    "dramatiq": ("dramatiq", "redis", "hiredis"),
    "huey": ("huey", "redis", "hiredis"),
    "arq": ("arq", "redis", "hiredis"),
}
TASKSPACE = "taskspace"
INSTALL_TIMEOUT_S = 900.0
CONFIG_WIDTH = 44
NOTES_WIDTH = 64


@dataclass(frozen=True)
class PeerConfig:
    """One row: ``peer`` names the venv and the ``bench.peerapps`` module."""

    name: str
    peer: str
    variant: str


CONFIGS = (
    PeerConfig("celery", "celery", "default"),
    PeerConfig("celery-acks-late", "celery", "acks_late"),
    PeerConfig("rq", "rq", "fork"),
    PeerConfig("rq-simple", "rq", "simple"),
    PeerConfig("dramatiq", "dramatiq", "default"),
    PeerConfig("huey", "huey", "default"),
    PeerConfig("huey-notify", "huey", "notify"),
    PeerConfig("arq", "arq", "default"),
)
NAMES = (*(c.name for c in CONFIGS), TASKSPACE)
BY_NAME = {c.name: c for c in CONFIGS}


@dataclass(frozen=True)
class PeersBench:
    """Options of one ``bench peers`` run."""

    tasks: int = 20_000
    roundtrips: int = 300
    singles: int = 2_000
    batch: int = 1_000
    workers: int = 2
    concurrency: int = 32
    repeat: int = 1
    only: tuple[str, ...] = ()
    skip_install: bool = False
    venv_root: Path = VENV_ROOT


@dataclass
class Row:
    """One system's figures; ``None`` where a phase failed or does not apply."""

    name: str
    config: str = ""
    single: float | None = None
    batched: float | None = None
    drain: float | None = None
    p50: float | None = None
    p99: float | None = None
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def select(only: tuple[str, ...]) -> tuple[str, ...]:
    """Row names picked by ``--only``: a name picks itself and its variants
    (``huey`` picks huey and huey-notify)."""
    if not only:
        return NAMES
    unknown = [o for o in only if not any(n == o or n.startswith(o + "-") for n in NAMES)]
    if unknown:
        raise BenchError(f"unknown name(s) {', '.join(unknown)}; valid: {', '.join(NAMES)}")
    return tuple(n for n in NAMES if any(n == o or n.startswith(o + "-") for o in only))


# -- the peers' virtual environments ---------------------------------------------------


def _venv_python(root: Path, peer: str) -> Path:
    return root / peer / "bin" / "python"


def ensure_venv(peer: str, root: Path, skip_install: bool, console: Console) -> Path:
    """The interpreter of ``peer``'s venv, created and installed on first use; a stamp
    file holding the requirements makes later runs reuse it."""
    python = _venv_python(root, peer)
    stamp = root / peer / ".bench-requirements"
    wanted = "\n".join(REQUIREMENTS[peer])
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if skip_install:
        raise BenchError(f"{root / peer} is missing or out of date; run without --skip-install")
    with console.status(f"creating {root / peer} and installing {' '.join(REQUIREMENTS[peer])}"):
        _check([sys.executable, "-m", "venv", "--clear", str(root / peer)], "venv")
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _check([*pip, *REQUIREMENTS[peer]], f"pip install for {peer}")
    stamp.write_text(wanted)
    return python


def _check(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took more than {INSTALL_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        noise = "WARNING: Location"  # the configured local indexes' harmless complaints
        err = "\n".join(x for x in done.stderr.splitlines() if not x.startswith(noise))
        raise BenchError(f"{what} failed ({done.returncode}):\n{err[-3000:]}")


def installed_versions(python: Path, peer: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *DISTRIBUTIONS[peer]], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


# -- running one peer configuration ----------------------------------------------------


def run_peer(
    cfg: PeerConfig, python: Path, url: str, opts: PeersBench, work: Path, console: Console
) -> Row:
    """Run the driver for ``cfg`` in its venv; its progress lines drive a status line."""
    flushdb(url)
    out = work / f"{cfg.name}.json"
    logs = work / cfg.name
    logs.mkdir(exist_ok=True)
    cmd = [
        str(python), "-m", "bench.peerapps.driver", cfg.peer, cfg.variant, "--url", url,
        "--out", str(out), "--tasks", str(opts.tasks), "--singles", str(opts.singles),
        "--batch", str(opts.batch), "--roundtrips", str(opts.roundtrips),
        "--workers", str(opts.workers), "--log-dir", str(logs),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(ROOT)
    stderr_path = logs / "driver.stderr"
    with stderr_path.open("w") as stderr, console.status(f"{cfg.name}: starting") as status:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("@ "):
                status.update(f"{cfg.name}: {line[2:].strip()}")
        code = proc.wait()
    if code != 0 or not out.exists():
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        return Row(cfg.name, errors={"driver": f"exit {code}: " + " | ".join(tail)})
    return row_from_driver(cfg.name, json.loads(out.read_text()))


def row_from_driver(name: str, data: dict[str, Any]) -> Row:
    row = Row(name, config=data["config"], notes=list(data["notes"]), errors=data["errors"])
    if "single" in data:
        row.single = data["single"]["rate"]
    if data["batch_api"]:
        row.notes.insert(0, f"batched: {data['batch_api']}")
        if data.get("batched"):
            row.batched = data["batched"]["rate"]
    if "drain" in data:
        drain = data["drain"]
        row.drain = drain["rate"]
        extra = drain["executions"] - drain["tasks"]
        if extra:
            row.notes.append(f"drain: {extra} duplicate execution(s)")
    if "roundtrip" in data:
        rtt = RoundTripRun(data["roundtrip"]["samples_ms"])
        row.p50, row.p99 = rtt.quantile(0.5), rtt.quantile(0.99)
    return row


# -- taskspace on the same Redis -------------------------------------------------------


def run_taskspace(url: str, opts: PeersBench, console: Console) -> Row:
    """``bench queue``'s phases on ``url``, with the same task count and worker processes."""
    row = Row(
        TASKSPACE,
        config=f"{opts.workers} processes x concurrency {opts.concurrency}, redis backend",
        notes=["at-least-once (leases + fencing)", "batched: submit_many (one call per batch)"],
    )
    try:
        with make_space(url):  # the backend may not exist yet: one line, not a traceback
            pass
        flushdb(url)
    except Exception as exc:  # noqa: BLE001 - reported in the table, not as a traceback
        row.errors["taskspace"] = f"unavailable: {type(exc).__name__}: {exc}"
        return row
    config = QueueBench(
        backend="redis", tasks=opts.tasks, workers=opts.workers, concurrency=(opts.concurrency,),
        roundtrips=opts.roundtrips, repeat=1, singles=opts.singles, batch=opts.batch, url=url,
    )  # fmt: skip
    sandbox = Sandbox(config.backend, keep=False, url=url)
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
    )  # fmt: skip
    k = opts.concurrency
    try:
        with progress:
            row.single = _phase(row, "single", lambda: bench_single(
                sandbox, opts.singles, progress, "taskspace: submit"))  # fmt: skip
            row.batched = _phase(row, "batched", lambda: bench_batched(
                sandbox, opts.tasks, opts.batch, progress, "taskspace: submit_many"))  # fmt: skip
            drain = _phase(row, "drain", lambda: bench_drain(
                sandbox, config, k, progress, "taskspace: drain"))  # fmt: skip
            rtt = _phase(row, "roundtrip", lambda: bench_roundtrip(
                sandbox, config, k, progress, "taskspace: round trip"))  # fmt: skip
    finally:
        sandbox.cleanup()
    row.drain = drain.rate if drain else None
    if rtt:
        row.p50, row.p99 = rtt.quantile(0.5), rtt.quantile(0.99)
    return row


def _phase(row: Row, name: str, fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed phase is reported in its row
        row.errors[name] = f"{type(exc).__name__}: {exc}"
        return None


# -- driver and report -----------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[Row]
    versions: dict[str, dict[str, str]]
    redis_version: str
    load_before: float
    load_after: float


def run(opts: PeersBench, console: Console, work: Path) -> Outcome:
    """Install what is missing, start Redis, run every selected row in order."""
    names = select(opts.only)
    peers = sorted({c.peer for c in CONFIGS if c.name in names})
    pythons = {p: ensure_venv(p, opts.venv_root, opts.skip_install, console) for p in peers}
    versions = {p: installed_versions(pythons[p], p) for p in peers}
    for peer in peers:
        listed = ", ".join(f"{d} {v}" for d, v in versions[peer].items())
        console.print(f"[dim]{opts.venv_root / peer}:[/] {listed}")
    runs: dict[str, list[Row]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    with RedisServer() as server:
        console.print(
            f"[dim]redis-server {server.version} on {server.url} (private, no persistence)"
        )
        # Rounds interleave the systems, so a neighbour's load drifting over the run hits
        # them all alike rather than whichever ran during it.
        for r in range(opts.repeat):
            for name in names:
                started = time.monotonic()
                if name == TASKSPACE:
                    row = run_taskspace(server.url, opts, console)
                else:
                    cfg = BY_NAME[name]
                    row = run_peer(cfg, pythons[cfg.peer], server.url, opts, work, console)
                runs[name].append(row)
                console.print(
                    f"[dim]round {r + 1}/{opts.repeat} {name}: drain"
                    f" {_cell(row, row.drain, ',.0f', 'drain')}/s, p50"
                    f" {_cell(row, row.p50, '.2f', 'roundtrip')} ms"
                    f" ({time.monotonic() - started:.0f} s)"
                )
        redis_version = server.version
    rows = [combine(runs[name]) for name in names]
    return Outcome(rows, versions, redis_version, load_before, os.getloadavg()[0])


def combine(rounds: list[Row]) -> Row:
    """One row from every round's: the median of each figure; each round's drain and p50
    in the notes when there is more than one."""
    first = next((r for r in rounds if r.config), rounds[0])  # a failed driver says nothing
    row = Row(first.name, first.config, notes=list(first.notes))
    for metric in ("single", "batched", "drain", "p50", "p99"):
        values = [v for v in (getattr(r, metric) for r in rounds) if v is not None]
        setattr(row, metric, statistics.median(values) if values else None)
    for i, r in enumerate(rounds):
        prefix = f"round {i + 1}: " if len(rounds) > 1 else ""
        row.errors.update({f"{prefix}{k}": v for k, v in r.errors.items()})
    if len(rounds) > 1:
        row.notes.append(
            "drain runs: " + " · ".join(_cell(r, r.drain, ",.0f", "drain") for r in rounds)
        )
        row.notes.append(
            "p50 runs: " + " · ".join(_cell(r, r.p50, ".2f", "roundtrip") for r in rounds)
        )
    return row


def _cell(row: Row, value: float | None, fmt: str, phase: str) -> str:
    if value is not None:
        return format(value, fmt)
    if any(k.rsplit(" ", 1)[-1] in (phase, "driver", "taskspace") for k in row.errors):
        return "[red]error[/]"
    return "n/a"


def report(opts: PeersBench, outcome: Outcome, console: Console) -> None:
    table = Table(title=f"task queues on one Redis: {opts.workers} worker processes, no-op tasks")
    table.add_column("system / config", max_width=CONFIG_WIDTH)
    for title in ("enqueue/s\nsingle", "enqueue/s\nbatched", "drain\ntasks/s"):
        table.add_column(title, justify="right")
    table.add_column("rtt p50\nms", justify="right")
    table.add_column("rtt p99\nms", justify="right")
    table.add_column("notes", max_width=NOTES_WIDTH)
    for row in outcome.rows:
        notes = list(row.notes) + [f"[red]{k}: {v}[/]" for k, v in row.errors.items()]
        style = "bold" if row.name == TASKSPACE else ""
        table.add_row(
            f"[bold]{row.name}[/]\n[dim]{row.config}[/]",
            _cell(row, row.single, ",.0f", "single"),
            _cell(row, row.batched, ",.0f", "batched"),
            _cell(row, row.drain, ",.0f", "drain"),
            _cell(row, row.p50, ".2f", "roundtrip"),
            _cell(row, row.p99, ".2f", "roundtrip"),
            "\n".join(notes),
            style=style,
            end_section=True,
        )
    console.print(table)
    for line in comparison(outcome.rows):
        console.print(line)
    console.print(method(opts, outcome), highlight=False)


def comparison(rows: list[Row]) -> list[str]:
    """taskspace's drain and p50 against the best peer row of this run."""
    ours = next((r for r in rows if r.name == TASKSPACE), None)
    peers = [r for r in rows if r.name != TASKSPACE]
    if ours is None:
        return []
    lines = []
    drains = [r for r in peers if r.drain is not None]
    if ours.drain is not None and drains:
        best = max(drains, key=lambda r: r.drain or 0.0)
        assert best.drain is not None
        lines.append(
            f"taskspace drain / fastest peer drain ({best.name}, {best.drain:,.0f}/s):"
            f" [bold]{ours.drain / best.drain:.2f}x[/]"
        )
    p50s = [r for r in peers if r.p50 is not None]
    if ours.p50 is not None and p50s:
        best = min(p50s, key=lambda r: r.p50 or 0.0)
        assert best.p50 is not None
        lines.append(
            f"taskspace rtt p50 {ours.p50:.2f} ms vs best peer p50 ({best.name}, {best.p50:.2f}"
            f" ms): [bold]{ours.p50 / best.p50:.2f}x[/] (lower is better)"
        )
    if not lines:
        lines.append("taskspace: no figures to compare (see its row)")
    return lines


def method(opts: PeersBench, outcome: Outcome) -> str:
    versions = "; ".join(
        f"{peer}: " + ", ".join(f"{d} {v}" for d, v in dists.items())
        for peer, dists in outcome.versions.items()
    )
    return "\n".join(
        (
            f"single: {opts.singles:,} sequential enqueues; batched: {opts.tasks:,} in batches of"
            f" {opts.batch:,}; drain: {opts.tasks:,} pre-enqueued, first task start to last"
            " task end (peers: in-process counters published by a side thread; taskspace:"
            f" store records); rtt: {opts.roundtrips} sequential submit+result pairs after 20"
            " warm-up pairs, idle workers.",
            f"every task returns its argument and every system stores the result; database"
            f" flushed before every phase; redis-server {outcome.redis_version} on loopback,"
            " shared with the workers and the client (same host).",
            f"versions: {versions}",
            f"host: {os.cpu_count()} CPUs, Python {platform.python_version()},"
            f" {platform.platform(terse=True)}; 1-min load {outcome.load_before:.2f} before,"
            f" {outcome.load_after:.2f} after",
        )
    )
