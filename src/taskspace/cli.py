"""The ``taskspace`` command line: worker, status, submit, demo.

APP arguments name a Space as ``module:attribute`` (``attribute`` defaults to
``space``); the attribute may also be a function returning a Space (a
factory). ``--url`` points the app's tasks at another backend.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table

from taskspace.backends.base import TASK_STATES
from taskspace.errors import ConfigError, TaskFailed, TaskspaceError
from taskspace.space import Space

F = TypeVar("F", bound=Callable[..., Any])
LOG_LEVELS = ("debug", "info", "warning", "error")


def load_space(app: str, url: str | None = None) -> Space:
    """Import ``module:attribute`` and return its Space (calling it if it is a factory)."""
    module_name, _, attr = app.partition(":")
    attr = attr or "space"
    if not module_name:
        raise ConfigError(f"APP must look like module:attribute, got {app!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(target, Space) and callable(target):
        target = target()
    if not isinstance(target, Space):
        raise ConfigError(f"{app!r} is a {type(target).__name__}, not a taskspace.Space")
    return target.with_url(url) if url else target


def _guard(fn: F) -> F:
    """Turn taskspace errors into one clear line on stderr and exit code 2."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TaskspaceError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="taskspace")
def main() -> None:
    """taskspace: durable tasks and workers for AI work, on SQLite, Redis or PostgreSQL."""


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
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
@_guard
def worker(app: str, processes: int, concurrency: int, queues: str, burst: bool,
           url: str | None, shutdown_grace: float, log_level: str) -> None:  # fmt: skip
    """Run workers for APP (module:attribute naming a Space)."""
    _setup_logging(log_level)
    space = load_space(app, url)
    options: dict[str, Any] = {
        "queues": queues, "concurrency": concurrency, "burst": burst,
        "shutdown_grace": shutdown_grace,
    }  # fmt: skip
    if processes == 1:
        report = space.run_worker(**options)
        if report.wedged:
            sys.exit(3)  # a supervisor restarts us; stuck task threads die with the process
        return
    from taskspace.worker.config import WorkerConfig
    from taskspace.worker.supervisor import Supervisor

    WorkerConfig.build(**options)  # validate once, before starting anything
    command = [sys.executable, "-m", "taskspace", "worker", app, "--processes", "1",
               "--concurrency", str(concurrency), "--queues", queues, "--url", space.url,
               "--shutdown-grace", str(shutdown_grace), "--log-level", log_level]  # fmt: skip
    if burst:
        command.append("--burst")
    sys.exit(Supervisor(command, processes, burst).run())


def _status_tables(space: Space) -> tuple[Table, Table]:
    stats = space.stats()
    queues = Table(title=f"queues on {space.url}")
    queues.add_column("queue")
    for state in TASK_STATES:
        queues.add_column(state, justify="right")
    for name in sorted(stats.counts):
        queues.add_row(name, *(str(stats.counts[name].get(s, 0)) for s in TASK_STATES))
    workers = Table(title="live workers")
    for column in ("name", "queues", "concurrency", "running", "succeeded", "up"):
        workers.add_column(column)
    for info in sorted(space.workers(), key=lambda w: str(w["name"])):
        up = f"{time.time() - float(info['started']):.0f} s"
        workers.add_row(str(info["name"]), ",".join(info["queues"]), str(info["concurrency"]),
                        str(info["running"]), str(info["succeeded"]), up)  # fmt: skip
    return queues, workers


@main.command()
@click.option(
    "--url", default=None, help="Backend URL (default: $TASKSPACE_URL or the SQLite default)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_guard
def status(url: str | None, as_json: bool) -> None:
    """Print queue depths by state and the live workers."""
    space = Space(url)
    if as_json:
        stats = space.stats()
        doc = {"url": space.url, "queues": stats.counts, "stale_finishes": stats.stale_finishes,
               "workers": space.workers()}  # fmt: skip
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console()
    for table in _status_tables(space):
        console.print(table)
    console.print(f"stale finishes refused: {space.stats().stale_finishes}")


def _json_option(value: str, what: str) -> Any:
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
@_guard
def submit(app: str, task_name: str, args_json: str, kwargs_json: str, wait: bool,
           timeout: float | None, countdown: float | None, priority: int | None,
           queue: str | None, dedup_key: str | None, url: str | None) -> None:  # fmt: skip
    """Submit TASK_NAME of APP; prints the task id (and the result with --wait)."""
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
        click.echo(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode())


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
def demo(trials: int, n_workers: int, keep: bool) -> None:
    """A scikit-learn hyperparameter sweep on SQLite; kills a worker midway; loses nothing."""
    from taskspace.demo import run_demo

    sys.exit(run_demo(trials=trials, workers=n_workers, keep=keep))


if __name__ == "__main__":
    main()
