"""``python -m bench queue --backend sqlite|memory``: see :mod:`bench.queue`."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from bench.queue import BACKENDS, QueueBench, report, run
from bench.workers import BenchError


def _concurrency(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None
    if not levels or any(k < 1 for k in levels):
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return levels


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """taskspace benchmarks."""


@main.command()
@click.option("--backend", type=click.Choice(BACKENDS), default="sqlite", show_default=True)
@click.option("--tasks", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="No-op tasks for the batched submit and each drain.")  # fmt: skip
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (threads for memory://).")  # fmt: skip
@click.option("--concurrency", default="32", show_default=True, callback=_concurrency,
              help="Tasks at once per worker; a comma list (16,32,64) drains at each.")  # fmt: skip
@click.option("--roundtrips", default=500, show_default=True, type=click.IntRange(min=2),
              help="Sequential submit→result pairs per run.")  # fmt: skip
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Runs of every phase; medians are quoted.")  # fmt: skip
@click.option("--singles", default=2_000, show_default=True, type=click.IntRange(min=1),
              help="Sequential single submits.")  # fmt: skip
@click.option("--batch", default=1_000, show_default=True, type=click.IntRange(min=1),
              help="submit_many chunk size.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the temporary directory (SQLite files, logs).")
@click.option("--check", is_flag=True, help="Exit 1 if a SQLite target is missed.")
def queue(backend: str, tasks: int, workers: int, concurrency: tuple[int, ...], roundtrips: int,
          repeat: int, singles: int, batch: int, keep: bool, check: bool) -> None:  # fmt: skip
    """Submit rate, drain throughput and submit→result latency of no-op tasks."""
    config = QueueBench(backend=backend, tasks=tasks, workers=workers, concurrency=concurrency,
                        roundtrips=roundtrips, repeat=repeat, singles=singles, batch=batch,
                        keep=keep)  # fmt: skip
    console = Console()
    try:
        results = run(config, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)
    met = report(config, results, console)
    if check and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
