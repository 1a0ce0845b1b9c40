"""``python -m bench queue --backend sqlite|memory|redis`` (see :mod:`bench.queue`),
``python -m bench peers`` (see :mod:`bench.peers`) and
``python -m bench contract --backend memory|sqlite|redis|all`` (see :mod:`bench.contract`)
``python -m bench locks`` (see :mod:`bench.locks`), and ``cache``, ``streams``,
``sharding``, ``api`` (each in the module of that name)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from bench import contract as contract_bench
from bench import locks as locks_bench
from bench import peers as peers_bench
from bench.queue import BACKENDS, QueueBench, report, report_delayed, run
from bench.workers import BenchError

WIDE_CONSOLE = 200
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


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
@click.option("--url", default="",
              help="redis: a Redis URL whose database is FLUSHED before every phase"
                   " (default: start a private redis-server); postgres: the database"
                   " (a fresh schema per phase; default 127.0.0.1:5432/postgres).")  # fmt: skip
@click.option("--delayed", default=100_000, show_default=True, type=click.IntRange(min=0),
              help="Delayed tasks queued before the claim-latency phase (0: skip).")  # fmt: skip
@click.option("--claims", default=1_000, show_default=True, type=click.IntRange(min=2),
              help="One-task claims timed in the claim-latency phase.")  # fmt: skip
@click.option("--claims-only", is_flag=True, help="Run only the claim-latency phase.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (SQLite files, logs).")
@click.option("--check", is_flag=True, help="Exit 1 if a SQLite target is missed.")
def queue(backend: str, tasks: int, workers: int, concurrency: tuple[int, ...], roundtrips: int,
          repeat: int, singles: int, batch: int, url: str, delayed: int, claims: int,
          claims_only: bool, keep: bool, check: bool) -> None:  # fmt: skip
    """Submit rate, drain throughput and submit→result latency of no-op tasks."""
    if url and backend not in ("redis", "postgres"):
        raise click.BadParameter(
            "--url applies to --backend redis and postgres only", param_hint="--url"
        )
    config = QueueBench(backend=backend, tasks=tasks, workers=workers, concurrency=concurrency,
                        roundtrips=roundtrips, repeat=repeat, singles=singles, batch=batch,
                        keep=keep, url=url, delayed=delayed, claims=claims,
                        claims_only=claims_only)  # fmt: skip
    console = Console()
    try:
        results = run(config, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)
    met = claims_only or report(config, results, console)
    if results.delayed:
        report_delayed(config, results, console)
    if check and not met:
        sys.exit(1)


def _names(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    try:
        peers_bench.select(names)
    except BenchError as exc:
        raise click.BadParameter(str(exc)) from None
    return names


@main.command()
@click.option("--tasks", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="No-op tasks for the batched enqueue and the drain.")  # fmt: skip
@click.option("--roundtrips", default=300, show_default=True, type=click.IntRange(min=2),
              help="Sequential submit→result pairs.")  # fmt: skip
@click.option("--singles", default=2_000, show_default=True, type=click.IntRange(min=1),
              help="Sequential single enqueues.")  # fmt: skip
@click.option("--batch", default=1_000, show_default=True, type=click.IntRange(min=1),
              help="Tasks per bulk enqueue call.")  # fmt: skip
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Worker processes for every system.")  # fmt: skip
@click.option("--concurrency", default=32, show_default=True, type=click.IntRange(min=1),
              help="taskspace: tasks at once per worker process.")  # fmt: skip
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="Rounds over every system (interleaved); medians are shown.")  # fmt: skip
@click.option("--only", default="", callback=_names,
              help="Comma list of rows: " + ",".join(peers_bench.NAMES)
                   + " (a name includes its variants: huey = huey,huey-notify).")  # fmt: skip
@click.option("--skip-install", is_flag=True,
              help="Use the peers' venvs as they are; fail if one is missing.")  # fmt: skip
@click.option("--venv-root", type=click.Path(path_type=Path), default=peers_bench.VENV_ROOT,
              show_default=True, help="Where the peers' virtual environments live.")  # fmt: skip
@click.option("--postgres", "pg_url", default=None, is_flag=False, flag_value=PG_DEFAULT,
              help="Instead: taskspace on PostgreSQL against Procrastinate, PgQueuer and a raw"
                   " FOR UPDATE SKIP LOCKED loop, on this database"
                   f" (--postgres alone: {PG_DEFAULT}).")  # fmt: skip
def peers(tasks: int, roundtrips: int, singles: int, batch: int, workers: int, concurrency: int,
          repeat: int, only: tuple[str, ...], skip_install: bool,
          venv_root: Path, pg_url: str | None) -> None:  # fmt: skip
    """taskspace against Celery, RQ, Dramatiq, Huey and arq on one private Redis
    (with --postgres: against the PostgreSQL queues, see bench.peers_pg)."""
    if pg_url is not None:
        from bench import peers_pg

        argv = ["--pg-url", pg_url, "--tasks", str(tasks), "--roundtrips", str(roundtrips),
                "--singles", str(min(singles, tasks)), "--batch", str(batch),
                "--workers", str(workers), "--concurrency", str(concurrency),
                "--repeat", str(repeat)]  # fmt: skip
        peers_pg.main(argv + (["--skip-install"] if skip_install else []))
        return
    opts = peers_bench.PeersBench(
        tasks=tasks, roundtrips=roundtrips, singles=min(singles, tasks), batch=batch,
        workers=workers, concurrency=concurrency, repeat=repeat, only=only,
        skip_install=skip_install,
        venv_root=venv_root,
    )  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: keep the wide table readable
        console = Console(width=WIDE_CONSOLE)
    with tempfile.TemporaryDirectory(prefix="taskspace-bench-peers-") as work:
        try:
            outcome = peers_bench.run(opts, console, Path(work))
        except BenchError as exc:
            console.print(f"[red]benchmark failed:[/] {exc}")
            sys.exit(2)
        peers_bench.report(opts, outcome, console)


@main.command()
@click.option("--backend", type=click.Choice((*contract_bench.BACKENDS, "all")), default="all",
              show_default=True)  # fmt: skip
@click.option("--n", "n", default=500, show_default=True, type=click.IntRange(min=1),
              help="Timed samples of every measure per run.")  # fmt: skip
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1),
              help="Runs of every measure; medians of the runs' p50/p99 are quoted.")  # fmt: skip
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0),
              help="Unrecorded samples before each run's timed ones.")  # fmt: skip
@click.option("--check", is_flag=True,
              help="Exit 1 if a release → wait p50 misses its target.")  # fmt: skip
def contract(backend: str, n: int, repeat: int, warmup: int, check: bool) -> None:
    """Latency of the store contract's leases, txn, change feed and wake-ups."""
    backends = contract_bench.BACKENDS if backend == "all" else (backend,)
    config = contract_bench.ContractBench(backends=backends, n=n, repeat=repeat, warmup=warmup)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: keep the wide table readable
        console = Console(width=WIDE_CONSOLE)
    try:
        results = contract_bench.run(config, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)
    ok = contract_bench.report(config, results, console)
    if any(r.errors for r in results):
        sys.exit(2)
    if check and not ok:
        sys.exit(1)


@main.command()
@click.option("--backend", type=click.Choice((*locks_bench.BACKENDS, "all")), default="all",
              show_default=True)  # fmt: skip
@click.option("--ops", default=1_000, show_default=True, type=click.IntRange(min=1),
              help="Uncontended acquire+release pairs per contender per run.")  # fmt: skip
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(min=1),
              help="Uncontended runs (interleaved); medians of p50/p99 quoted.")  # fmt: skip
@click.option("--procs", default=8, show_default=True, type=click.IntRange(min=2),
              help="Contending processes on one lock (threads for memory://).")  # fmt: skip
@click.option("--contend", "contend_s", default=2.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds of each contended phase.")  # fmt: skip
@click.option("--kills", default=5, show_default=True, type=click.IntRange(min=0),
              help="Leaders SIGKILLed per backend (0: skip; not on memory://).")  # fmt: skip
@click.option("--skip-install", is_flag=True,
              help="Use python-redis-lock as installed; its row fails if missing.")  # fmt: skip
@click.option("--venv-root", type=click.Path(path_type=Path), default=locks_bench.VENV_ROOT,
              show_default=True, help="Where benchmark-only installs live.")  # fmt: skip
def locks(backend: str, ops: int, repeat: int, procs: int, contend_s: float, kills: int,
          skip_install: bool, venv_root: Path) -> None:  # fmt: skip
    """Locks: uncontended and contended latency, Redis locks beside them, election failover."""
    backends = locks_bench.BACKENDS if backend == "all" else (backend,)
    config = locks_bench.LocksBench(backends=backends, ops=ops, repeat=repeat, procs=procs,
                                    contend_s=contend_s, kills=kills, skip_install=skip_install,
                                    venv_root=venv_root)  # fmt: skip
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: keep the wide table readable
        console = Console(width=WIDE_CONSOLE)
    try:
        results = locks_bench.run(config, console)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        sys.exit(2)
    if not locks_bench.report(config, results, console):
        sys.exit(2)


def _delegate(name: str, module: str, summary: str) -> None:
    """``python -m bench <name> ...`` runs ``<module>.cli`` (a click command)
    with the remaining arguments; the module is imported only when asked for."""

    @main.command(name, help=f"{summary} (see: python -m bench {name} --help)",
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                    "help_option_names": []})  # fmt: skip
    @click.pass_context
    def command(ctx: click.Context) -> None:
        import importlib

        cli = importlib.import_module(module).cli
        cli.main(args=list(ctx.args), prog_name=f"python -m bench {name}")


_delegate("cache", "bench.cache", "Cache hit rates and speed, memoization, against cachetools")
_delegate("streams", "bench.streams", "Streams with consumer groups against raw Redis Streams")
_delegate("sharding", "bench.sharding", "ShardedKV balance and keys moved on a join")
_delegate("api", "bench.api", "HTTP API load: concurrent clients polling task status")


if __name__ == "__main__":
    main()
