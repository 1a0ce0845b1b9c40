"""The ``taskspace`` command line: worker, submit, status, tasks, queues, demo.

APP arguments name a Space as ``module:attribute`` (``attribute`` defaults to
``space``); the attribute may also be a function returning a Space (a
factory). ``--url`` points the app's tasks at another backend, and then every
action of the command happens there only. Heavy modules (rich, the worker,
the demo) are imported by the commands that use them, so ``--help`` is quick.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from taskspace import __version__
from taskspace.cli import db, logs, manage, periodic, serve, services
from taskspace.cli.common import guard, load_space
from taskspace.errors import ConfigError, TaskFailed

__all__ = ["load_space", "main"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _setup_logging(level: str, fmt: str) -> None:
    from taskspace.worker.logfmt import setup_logging

    setup_logging(level, "json" if fmt == "json" else "text")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="taskspace")
def main() -> None:
    """taskspace: durable tasks and workers for AI work, on SQLite or Redis."""


manage.register(main)
periodic.register(main)
services.register(main)
db.register(main)
logs.register(main)
serve.register(main)


@main.command()
@click.argument("app")
@click.option(
    "--processes",
    "-p",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes; more than 1 starts a supervisor that restarts dead ones.",
)
@click.option(
    "--concurrency",
    "-c",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tasks run at once per process.",
)
@click.option(
    "--queues",
    "-Q",
    default="default",
    show_default=True,
    help="Comma-separated queues, highest priority first.",
)
@click.option("--burst", is_flag=True, help="Exit once the queues are empty.")
@click.option("--url", default=None, help="Backend URL, overriding the app's.")
@click.option(
    "--shutdown-grace",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds running tasks get after SIGTERM.",
)
@click.option(
    "--maintainer-ttl",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds the elected maintainer's term lives without renewal (at least 1).",
)
@click.option(
    "--maintainer-retry",
    default=2.0,
    show_default=True,
    type=float,
    help="Seconds between campaigns for maintainer (at least 1); failover <= ttl + retry.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(LOG_FORMATS),
    help="json: one JSON object per line, for log shippers.",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(min=0, max=65535),
    help="Serve this worker's Prometheus /metrics on 127.0.0.1:PORT (--processes 1 only).",
)
@guard
def worker(app: str, processes: int, concurrency: int, queues: str, burst: bool,
           url: str | None, shutdown_grace: float, maintainer_ttl: float,
           maintainer_retry: float, log_level: str, log_format: str,
           metrics_port: int | None) -> None:  # fmt: skip
    """Run workers for APP (module:attribute naming a Space).

    \b
    Exit codes: 0 stopped (or drained, with --burst); 2 a usage or startup
    error; 3 every slot held a task stuck past its timeout (restart it);
    4 the space was wiped or replaced (FLUSHALL, a Redis restarted without
    persistence, a deleted SQLite file): its tasks are gone, and the worker
    stops rather than serve a new, empty space. Not restarted by --processes.

    \b
    One worker at a time is elected maintainer: it requeues expired leases,
    promotes due tasks, fires periodic schedules, checks the service registry
    and reaps old results. If it dies, another takes over within
    --maintainer-ttl + --maintainer-retry seconds.
    """
    if metrics_port is not None and processes != 1:
        raise ConfigError("--metrics-port serves one process: use it with --processes 1")
    _setup_logging(log_level, log_format)
    space = load_space(app, url)
    options: dict[str, Any] = {
        "queues": queues, "concurrency": concurrency, "burst": burst,
        "shutdown_grace": shutdown_grace, "maintainer_ttl": maintainer_ttl,
        "maintainer_retry": maintainer_retry,
    }  # fmt: skip
    if metrics_port is not None:
        options["metrics_port"] = metrics_port
    if processes == 1:
        from taskspace.worker.config import EXIT_SPACE_LOST, EXIT_WEDGED

        report = space.run_worker(**options)
        if report.space_lost:
            sys.exit(EXIT_SPACE_LOST)
        if report.wedged:
            sys.exit(EXIT_WEDGED)  # a supervisor restarts us; stuck task threads die with us
        return
    from taskspace.worker.config import WorkerConfig
    from taskspace.worker.supervisor import Supervisor

    WorkerConfig.build(**options)  # validate once, before starting anything
    command = [sys.executable, "-m", "taskspace", "worker", app, "--processes", "1",
               "--concurrency", str(concurrency), "--queues", queues, "--url", space.url,
               "--shutdown-grace", str(shutdown_grace), "--maintainer-ttl", str(maintainer_ttl),
               "--maintainer-retry", str(maintainer_retry), "--log-level", log_level,
               "--log-format", log_format]  # fmt: skip
    if burst:
        command.append("--burst")
    sys.exit(Supervisor(command, processes, burst).run())


def _json_option(value: str, what: str) -> Any:
    import orjson

    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc}): {value!r}") from None


@main.command()
@click.argument("app")
@click.argument("task_name")
@click.option(
    "--args",
    "args_json",
    default="[]",
    show_default=True,
    help="JSON array of positional arguments.",
)
@click.option(
    "--kwargs",
    "kwargs_json",
    default="{}",
    show_default=True,
    help="JSON object of keyword arguments.",
)
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", default=None, type=float, help="Seconds to wait with --wait.")
@click.option("--countdown", default=None, type=float, help="Run no sooner than this many seconds.")
@click.option("--priority", default=None, type=int, help="Higher runs first.")
@click.option("--queue", default=None, help="Queue, overriding the task's.")
@click.option("--dedup-key", default=None, help="Return the live task with this key instead.")
@click.option("--url", default=None, help="Backend URL, overriding the app's.")
@guard
def submit(app: str, task_name: str, args_json: str, kwargs_json: str, wait: bool,
           timeout: float | None, countdown: float | None, priority: int | None,
           queue: str | None, dedup_key: str | None, url: str | None) -> None:  # fmt: skip
    """Submit TASK_NAME of APP (its full or short name); prints the task id
    (and the result with --wait)."""
    if timeout is not None and timeout < 0:
        raise ConfigError(f"--timeout must be >= 0 seconds, got {timeout}")
    if timeout is not None and not wait:
        raise ConfigError("--timeout applies to --wait; add --wait or drop --timeout")
    args = _json_option(args_json, "--args")
    kwargs = _json_option(kwargs_json, "--kwargs")
    if not isinstance(args, list):
        raise ConfigError(f"--args must be a JSON array of positional arguments, got {args_json!r}")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs must be a JSON object, got {kwargs_json!r}")
    space = load_space(app, url)
    overrides = {k: v for k, v in {"countdown": countdown, "priority": priority, "queue": queue,
                                   "dedup_key": dedup_key}.items() if v is not None}  # fmt: skip
    task = space.get_task(task_name)
    handle = (task.options(**overrides) if overrides else task).submit(*args, **kwargs)
    click.echo(handle.id)
    if wait:
        try:
            value = handle.result(timeout=timeout)
        except TaskFailed as exc:
            click.secho(
                f"{exc.status}: {exc.remote_type}: {exc.remote_message}", fg="red", err=True
            )
            if exc.remote_traceback:
                click.echo(exc.remote_traceback, err=True)
            sys.exit(1)
        import orjson

        click.echo(orjson.dumps(value).decode())


@main.command()
@click.option(
    "--trials",
    default=60,
    show_default=True,
    type=click.IntRange(min=48),
    help="Hyperparameter trials to run (one task each).",
)
@click.option(
    "--workers",
    "n_workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=2),
    help="Worker processes to start.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary space directory.")
@click.option(
    "--serve",
    is_flag=True,
    help="Also serve the dashboard (printed URL) and keep serving, with live work, until Ctrl-C.",
)
@click.option(
    "--port",
    default=8750,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Dashboard port with --serve on 127.0.0.1 (busy or 0: any free port).",
)
@guard
def demo(trials: int, n_workers: int, keep: bool, serve: bool, port: int) -> None:
    """A scikit-learn hyperparameter sweep on SQLite; kills a worker midway; loses nothing."""
    from taskspace.demo import run_demo

    sys.exit(run_demo(trials=trials, workers=n_workers, keep=keep, serve=serve, port=port))


if __name__ == "__main__":
    main()
