"""``python -m bench.retention``: storage stays bounded once results expire.

Runs rounds of no-op tasks with a short ``result_ttl`` on SQLite and on a
private Redis; after each round it waits past the TTL, lets maintenance reap
(``store.reap``), and prints the footprint: the SQLite file after a WAL
checkpoint, and Redis ``used_memory``. The footprint must stop growing from
one round to the next. Also prints bytes per live (queued) and per finished
task, measured from the growth while they exist.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bench.redis_server import RedisServer, command
from taskspace import Space


def _sqlite_bytes(path: Path) -> Callable[[], int]:
    def measure() -> int:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = path.with_name(path.name + "-wal")
        return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    return measure


def _redis_bytes(url: str) -> Callable[[], int]:
    def measure() -> int:
        info = command(url, "INFO", "memory")
        line = next(x for x in info.splitlines() if x.startswith("used_memory:"))
        return int(line.split(":")[1])

    return measure


def _reap_all(space: Space) -> int:
    total = 0
    while n := space.store.queue.reap(10_000):
        total += n
    return total


def soak(space: Space, measure: Callable[[], int], tasks: int, rounds: int, ttl: float,
         console: Console) -> Table:  # fmt: skip
    """Run ``rounds`` of ``tasks`` tasks; a table of the footprint per round."""
    space.task(name="noop", result_ttl=ttl)(lambda i: i)
    noop = space.get_task("noop")
    table = Table(title=f"{space.url.split('?')[0]}: {rounds} rounds of {tasks:,} tasks, "
                        f"result_ttl={ttl:g} s")  # fmt: skip
    for column in ("round", "empty", "queued", "finished", "after reap", "reaped",
                   "B/live task", "B/finished task"):  # fmt: skip
        table.add_column(column, justify="right")
    for i in range(1, rounds + 1):
        empty = measure()
        noop.submit_many([(j,) for j in range(tasks)])
        queued = measure()
        space.run_worker(burst=True, concurrency=32, install_signal_handlers=False)
        finished = measure()
        time.sleep(ttl + 0.5)
        reaped = _reap_all(space)
        after = measure()
        table.add_row(str(i), f"{empty:,}", f"{queued:,}", f"{finished:,}", f"{after:,}",
                      f"{reaped:,}", f"{(queued - empty) / tasks:.0f}",
                      f"{(finished - empty) / tasks:.0f}")  # fmt: skip
        console.print(f"round {i}: {after:,} bytes after reaping {reaped:,}")
    return table


@click.command()
@click.option("--tasks", default=100_000, show_default=True, help="Tasks per round.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--ttl", default=30.0, show_default=True, help="result_ttl in seconds.")
@click.option("--backend", "backends", multiple=True, default=("sqlite", "redis"),
              type=click.Choice(["sqlite", "redis"]), show_default=True)  # fmt: skip
def main(tasks: int, rounds: int, ttl: float, backends: tuple[str, ...]) -> None:
    """Show that the footprint stops growing once finished tasks expire."""
    console = Console(width=160)
    for backend in backends:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "soak.db"
                space = Space(f"sqlite:///{path}")
                console.print(soak(space, _sqlite_bytes(path), tasks, rounds, ttl, console))
                space.close()
        else:
            with RedisServer() as server:
                space = Space(server.url)
                console.print(soak(space, _redis_bytes(server.url), tasks, rounds, ttl, console))
                space.close()
    console.print(f"pid {os.getpid()}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
