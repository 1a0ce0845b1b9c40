"""``python -m bench.peers_pg``: taskspace on PostgreSQL next to Procrastinate, PgQueuer
and a raw ``FOR UPDATE SKIP LOCKED`` loop, side by side in one run.

Every system runs against the same PostgreSQL (default the machine's,
127.0.0.1:5432), each in a fresh database of its own (dropped afterwards), with
the same number of worker processes and no-op tasks; the phases are
``bench peers``'s (:mod:`bench.peerapps.common`): single and batched enqueue,
drain of pre-enqueued tasks (first start to last end, counted in each worker
process and published to a private Redis, so recording never touches the
database), and sequential submit + wait-for-result round trips. taskspace runs
``bench queue``'s phases on a fresh schema per phase.

The peers live in their own virtual environments under ``.bench-venv/<peer>/``
(made once and reused, like ``bench peers``'s); none is a project dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import peers
from bench.peers import TASKSPACE, Row, _cell, combine, ensure_venv, installed_versions
from bench.queue import (
    QueueBench,
    Sandbox,
    bench_batched,
    bench_drain,
    bench_roundtrip,
    bench_single,
)
from bench.redis_server import RedisServer
from bench.workers import ROOT, BenchError

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
# Registered with bench.peers's venv helpers (ensure_venv reads these tables).
PG_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "procrastinate": ("procrastinate>=3.10,<3.11", "psycopg[binary]>=3.1", "redis>=5"),
    "pgqueuer": ("pgqueuer>=1.6,<1.7", "asyncpg>=0.29", "psycopg[binary]>=3.2", "redis>=5"),
    "rawpg": ("psycopg[binary]>=3.1", "redis>=5"),
}
PG_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "procrastinate": ("procrastinate", "psycopg"),
    "pgqueuer": ("pgqueuer", "asyncpg", "psycopg"),
    "rawpg": ("psycopg",),
}
peers.REQUIREMENTS.update(PG_REQUIREMENTS)
peers.DISTRIBUTIONS.update(PG_DISTRIBUTIONS)
ROWS = ("procrastinate", "pgqueuer", "rawpg", TASKSPACE)


@dataclass(frozen=True)
class PgPeersBench:
    """Options of one run (the issue's: 20,000 no-op tasks, 2 worker processes)."""

    pg_url: str = DEFAULT_PG
    tasks: int = 20_000
    roundtrips: int = 300
    singles: int = 2_000
    batch: int = 1_000
    workers: int = 2
    concurrency: int = 32
    repeat: int = 1
    only: tuple[str, ...] = ()
    skip_install: bool = False
    venv_root: Path = peers.VENV_ROOT


def _admin(pg_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def _database_url(pg_url: str, database: str) -> str:
    base, _, _ = pg_url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + database


def run_pg_peer(
    peer: str, python: Path, opts: PgPeersBench, redis_url: str, work: Path, console: Console
) -> Row:
    """One peer in its venv, on a fresh database of its own."""
    database = f"bench_{peer}_{uuid.uuid4().hex[:8]}"
    _admin(opts.pg_url, f'CREATE DATABASE "{database}"')
    out = work / f"{peer}.json"
    logs = work / peer
    logs.mkdir(exist_ok=True)
    cmd = [
        str(python), "-m", "bench.peerapps.pgdriver", peer, "default", "--url", redis_url,
        "--pg-url", _database_url(opts.pg_url, database), "--out", str(out),
        "--tasks", str(opts.tasks), "--singles", str(opts.singles), "--batch", str(opts.batch),
        "--roundtrips", str(opts.roundtrips), "--workers", str(opts.workers),
        "--log-dir", str(logs),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(ROOT)
    stderr_path = logs / "driver.stderr"
    try:
        with stderr_path.open("w") as stderr, console.status(f"{peer}: starting") as status:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("@ "):
                    status.update(f"{peer}: {line[2:].strip()}")
            code = proc.wait()
    finally:
        _admin(opts.pg_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if code != 0 or not out.exists():
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        return Row(peer, errors={"driver": f"exit {code}: " + " | ".join(tail)})
    row = peers.row_from_driver(peer, json.loads(out.read_text()))
    row.name = json.loads(out.read_text())["label"]
    return row


def run_taskspace_pg(opts: PgPeersBench, console: Console) -> Row:
    """``bench queue``'s phases on PostgreSQL (a fresh schema per phase)."""
    row = Row(
        TASKSPACE,
        config=f"{opts.workers} processes x concurrency {opts.concurrency}, postgres backend",
        notes=["at-least-once (leases + fencing)", "batched: submit_many (one call per batch)"],
    )
    config = QueueBench(
        backend="postgres", tasks=opts.tasks, workers=opts.workers,
        concurrency=(opts.concurrency,), roundtrips=opts.roundtrips, repeat=1,
        singles=opts.singles, batch=opts.batch, url=opts.pg_url,
    )  # fmt: skip
    sandbox = Sandbox("postgres", keep=False, url=opts.pg_url)
    from rich.progress import Progress

    k = opts.concurrency
    try:
        with Progress(console=console, transient=True) as progress:
            row.single = peers._phase(row, "single", lambda: bench_single(
                sandbox, opts.singles, progress, "taskspace: submit"))  # fmt: skip
            row.batched = peers._phase(row, "batched", lambda: bench_batched(
                sandbox, opts.tasks, opts.batch, progress, "taskspace: submit_many"))  # fmt: skip
            drain = peers._phase(row, "drain", lambda: bench_drain(
                sandbox, config, k, progress, "taskspace: drain"))  # fmt: skip
            rtt = peers._phase(row, "roundtrip", lambda: bench_roundtrip(
                sandbox, config, k, progress, "taskspace: round trip"))  # fmt: skip
    finally:
        sandbox.cleanup()
    row.drain = drain.rate if drain else None
    if rtt:
        row.p50, row.p99 = rtt.quantile(0.5), rtt.quantile(0.99)
    return row


def run(opts: PgPeersBench, console: Console, work: Path) -> list[Row]:
    """Install what is missing, start the recorder's Redis, run every row in rounds."""
    names = [n for n in ROWS if not opts.only or n in opts.only]
    unknown = set(opts.only) - set(ROWS)
    if unknown:
        raise BenchError(f"unknown row(s) {sorted(unknown)}; valid: {', '.join(ROWS)}")
    pythons = {
        p: ensure_venv(p, opts.venv_root, opts.skip_install, console)
        for p in names
        if p != TASKSPACE
    }
    for peer, python in pythons.items():
        listed = ", ".join(f"{d} {v}" for d, v in installed_versions(python, peer).items())
        console.print(f"[dim]{opts.venv_root / peer}:[/] {listed}")
    runs: dict[str, list[Row]] = {name: [] for name in names}
    with RedisServer() as server:
        for r in range(opts.repeat):
            for name in names:
                started = time.monotonic()
                if name == TASKSPACE:
                    row = run_taskspace_pg(opts, console)
                else:
                    row = run_pg_peer(name, pythons[name], opts, server.url, work, console)
                runs[name].append(row)
                console.print(
                    f"[dim]round {r + 1}/{opts.repeat} {row.name}: drain"
                    f" {_cell(row, row.drain, ',.0f', 'drain')}/s"
                    f" ({time.monotonic() - started:.0f} s)"
                )
    return [combine(runs[name]) for name in names]


def report(opts: PgPeersBench, rows: list[Row], console: Console) -> None:
    table = Table(
        title=f"task queues on one PostgreSQL: {opts.workers} worker processes, no-op tasks"
    )
    table.add_column("system / config", max_width=44)
    for title in ("enqueue/s\nsingle", "enqueue/s\nbatched", "drain\ntasks/s"):
        table.add_column(title, justify="right")
    table.add_column("rtt p50\nms", justify="right")
    table.add_column("rtt p99\nms", justify="right")
    table.add_column("notes", max_width=64)
    for row in rows:
        notes = list(row.notes) + [f"[red]{k}: {v}[/]" for k, v in row.errors.items()]
        table.add_row(
            f"[bold]{row.name}[/]\n[dim]{row.config}[/]",
            _cell(row, row.single, ",.0f", "single"),
            _cell(row, row.batched, ",.0f", "batched"),
            _cell(row, row.drain, ",.0f", "drain"),
            _cell(row, row.p50, ".2f", "roundtrip"),
            _cell(row, row.p99, ".2f", "roundtrip"),
            "\n".join(notes),
            style="bold" if row.name == TASKSPACE else "",
            end_section=True,
        )
    console.print(table)
    for line in comparison(rows):
        console.print(line)
    console.print(
        f"same PostgreSQL for every row ({opts.pg_url.partition('?')[0]}), a fresh database"
        f" per peer; {opts.tasks:,} tasks, {opts.workers} worker processes; host"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}, 1-min load"
        f" {os.getloadavg()[0]:.2f}",
        highlight=False,
    )


def comparison(rows: list[Row]) -> list[str]:
    """The issue's targets: drain vs the fastest peer and vs the raw loop, p50, batched."""
    ours = next((r for r in rows if r.name == TASKSPACE), None)
    if ours is None:
        return []
    raw = next((r for r in rows if r.name.startswith("raw")), None)
    others = [r for r in rows if r is not ours and r is not raw]
    lines = []
    fastest = max((r for r in others if r.drain), key=lambda r: r.drain or 0.0, default=None)
    if ours.drain and fastest and fastest.drain:
        lines.append(
            f"drain vs fastest peer ({fastest.name}): {ours.drain / fastest.drain:.2f}x"
            " (target >= 3x)"
        )
    if ours.drain and raw and raw.drain:
        ratio = ours.drain / raw.drain
        lines.append(f"drain vs raw SKIP LOCKED loop: {ratio:.2f}x (target >= 0.5x)")
    best = min((r for r in others if r.p50), key=lambda r: r.p50 or 0.0, default=None)
    if ours.p50 and best and best.p50:
        lines.append(
            f"rtt p50 {ours.p50:.2f} ms vs best peer ({best.name}) {best.p50:.2f} ms"
            " (target <= 5 ms and <= the best peer's)"
        )
    if ours.batched:
        lines.append(f"batched submit {ours.batched:,.0f}/s (target >= 20,000/s)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers_pg", description=__doc__)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", action="append", default=[], choices=ROWS)
    parser.add_argument("--skip-install", action="store_true")
    args = parser.parse_args(argv)
    opts = PgPeersBench(
        pg_url=args.pg_url, tasks=args.tasks, roundtrips=args.roundtrips, singles=args.singles,
        batch=args.batch, workers=args.workers, concurrency=args.concurrency,
        repeat=args.repeat, only=tuple(args.only), skip_install=args.skip_install,
    )  # fmt: skip
    console = Console(width=max(150, Console().width))
    with tempfile.TemporaryDirectory(prefix="bench-peers-pg-") as work:
        rows = run(opts, console, Path(work))
    report(opts, rows, console)


if __name__ == "__main__":
    main()
