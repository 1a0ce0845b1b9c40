"""Commands that inspect and manage a space without an app: ``status``,
``tasks list|show|retry|cancel`` and ``queues purge``. None of them creates
a space: a URL naming none is reported with exit code 2."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from taskspace.backends.base import FINAL_STATES, RETRYABLE_STATES, TASK_STATES, TaskRecord
from taskspace.cli.common import URL_HELP, echo_json, existing_space, guard
from taskspace.cli.services import HEALTH_STYLE
from taskspace.codec import decoder_for
from taskspace.errors import ConfigError, SerializationError, TaskNotFound
from taskspace.space import Space

UNKNOWN_SCAN_LIMIT = 1000
PURGE_STATES = tuple(s for s in TASK_STATES if s != "running")


def _summary(record: TaskRecord, now: float) -> dict[str, Any]:
    """``now``: the store's wall clock (``created``/``started``/``finished`` are on it)."""
    return {
        "id": record.id, "name": record.name, "queue": record.queue, "state": record.state,
        "attempts": record.attempts, "max_attempts": record.max_attempts, "lost": record.lost,
        "priority": record.priority, "worker": record.worker,
        "age_s": round(now - record.created, 3),
        "error": None if record.error is None else record.error.get("type"),
    }  # fmt: skip


def _decoded(space: Space, record: TaskRecord, data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return decoder_for(record.codec, allow_pickle=False).decode(data)
    except SerializationError as exc:
        return f"<{record.codec} value not shown: {exc}>"


def _detail(space: Space, record: TaskRecord) -> dict[str, Any]:
    now = space.store.clock.wall()
    doc = _summary(record, now)
    doc.update(
        arguments=_decoded(space, record, record.payload),
        result=_decoded(space, record, record.result) if record.state == "succeeded" else None,
        error=record.error, progress=record.progress, timeout=record.timeout,
        lease_s=record.lease_s, dedup_key=record.dedup_key,
        started_s_ago=None if record.started is None else round(now - record.started, 3),
        finished_s_ago=None if record.finished is None else round(now - record.finished, 3),
        ran_s=None if record.started is None or record.finished is None
        else round(record.finished - record.started, 3),
    )  # fmt: skip
    return doc


def _unknown_names(space: Space, workers: list[dict[str, Any]]) -> dict[str, int]:
    """Queued task names that no live worker has registered, with counts
    (among the first UNKNOWN_SCAN_LIMIT queued tasks)."""
    known: set[str] = set()
    for info in workers:
        if "tasks" not in info:
            return {}  # a worker that does not say what it runs might run anything
        known.update(info["tasks"])
    counts: dict[str, int] = {}
    for record in space.tasks(state="queued", limit=UNKNOWN_SCAN_LIMIT):
        if record.name not in known:
            counts[record.name] = counts.get(record.name, 0) + 1
    return counts


def _maintainer(space: Space) -> dict[str, Any] | None:
    """The elected maintainer (identity and term), or None while there is none."""
    from taskspace.worker.maintainer import ELECTION

    leader = space.election(ELECTION).leader()
    return None if leader is None else {"identity": leader[0], "term": leader[1]}


def _print_status(space: Space, workers: list[dict[str, Any]], unknown: dict[str, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = space.stats()
    queues = Table(title=f"queues on {space.url}")
    queues.add_column("queue")
    for state in TASK_STATES:
        queues.add_column(state, justify="right")
    for name in sorted(stats.counts):
        queues.add_row(name, *(str(stats.counts[name].get(s, 0)) for s in TASK_STATES))
    table = Table(title="live workers (service taskspace.worker)")
    for column in ("name", "health", "queues", "concurrency", "running", "succeeded", "up"):
        table.add_column(column)
    now = space.store.clock.wall()  # workers stamp ``started`` with it
    for info in sorted(workers, key=lambda w: str(w["name"])):
        up = "?" if info.get("started") is None else f"{now - float(info['started']):.0f} s"
        health = str(info.get("health", "?"))
        style = HEALTH_STYLE.get(health, "")
        table.add_row(str(info["name"]), f"[{style}]{health}[/{style}]" if style else health,
                      ",".join(info["queues"]), str(info["concurrency"]), str(info["running"]),
                      str(info["succeeded"]), up)  # fmt: skip
    console = Console()
    console.print(queues)
    console.print(table)
    console.print(f"stale finishes refused: {stats.stale_finishes}")
    maintainer = _maintainer(space)
    console.print("maintainer: " + ("[yellow]none elected[/yellow]" if maintainer is None
                  else f"{maintainer['identity']} (term {maintainer['term']})"))  # fmt: skip
    for name, n in sorted(unknown.items()):
        console.print(
            f"[yellow]{n} queued task(s) named {name!r}: no live worker runs this task;"
            " they stay queued until one that registers it starts[/yellow]"
        )


def register(main: click.Group) -> None:
    """Add the commands of this module to ``main``."""
    main.add_command(status)
    main.add_command(tasks)
    main.add_command(queues)


@click.command()
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@guard
def status(url: str | None, as_json: bool) -> None:
    """Print queue depths by state, the live workers with their health, the
    elected maintainer, and queued tasks no worker runs.

    Workers register themselves in the service registry as ``taskspace.worker``
    (``taskspace services show taskspace.worker`` shows them in detail); a
    worker's load (``running``) is at most a few seconds old."""
    space = existing_space(url)
    workers = space.workers()
    unknown = _unknown_names(space, workers)
    if as_json:
        stats = space.stats()
        echo_json({"url": space.url, "queues": stats.counts, "workers": workers,
                   "stale_finishes": stats.stale_finishes, "unrunnable": unknown,
                   "maintainer": _maintainer(space)})  # fmt: skip
        return
    _print_status(space, workers, unknown)


@click.group()
def tasks() -> None:
    """List, show, retry and cancel tasks."""


@tasks.command("list")
@click.option("--state", type=click.Choice(TASK_STATES), default=None, help="Only this state.")
@click.option("--queue", default=None, help="Only this queue.")
@click.option("--name", default=None, help="Only tasks with this name.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--after", default=None, help="Continue after this task id (paging).")
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@guard
def list_tasks(state: str | None, queue: str | None, name: str | None, limit: int,
               after: str | None, url: str | None, as_json: bool) -> None:  # fmt: skip
    """List tasks in submission order (oldest first)."""
    space = existing_space(url)
    page = space.tasks(state=state, queue=queue, name=name, limit=limit, after=after)
    now = space.store.clock.wall()
    if as_json:
        import orjson

        for record in page:
            click.echo(orjson.dumps(_summary(record, now)).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("id", "name", "queue", "state", "attempts", "age", "error"):
        table.add_column(column, no_wrap=column == "id")
    for record in page:
        s = _summary(record, now)
        table.add_row(s["id"], s["name"], s["queue"], s["state"],
                      f"{s['attempts']}/{s['max_attempts']}", f"{s['age_s']:.0f} s",
                      s["error"] or "")  # fmt: skip
    Console().print(table)
    if len(page) == limit:
        click.echo(f"more: --after {page[-1].id}")


@tasks.command("show")
@click.argument("task_id")
@click.option("--url", default=None, help=URL_HELP)
@guard
def show_task(task_id: str, url: str | None) -> None:
    """Show one task: arguments, result or error with traceback, attempts, timings."""
    space = existing_space(url)
    doc = _detail(space, space.handle(task_id).info())
    traceback = (doc["error"] or {}).get("traceback")
    echo_json(doc)
    if traceback:
        click.echo(traceback, err=True)


@tasks.command("retry")
@click.argument("task_id", required=False)
@click.option("--state", type=click.Choice(RETRYABLE_STATES), default=None,
              help="Retry every task in this state instead of one id.")  # fmt: skip
@click.option("--queue", default=None, help="With --state: only this queue.")
@click.option("--url", default=None, help=URL_HELP)
@guard
def retry_tasks(task_id: str | None, state: str | None, queue: str | None,
                url: str | None) -> None:  # fmt: skip
    """Requeue a failed or dead task (or all of them, with --state) with fresh attempts."""
    if (task_id is None) == (state is None):
        raise ConfigError("give one TASK_ID or --state failed|dead, not both")
    space = existing_space(url)
    if task_id is not None:
        click.echo(f"{task_id}: {space.handle(task_id).retry()}")
        return
    requeued = 0
    for tid in [r.id for r in space.iter_tasks(state=state, queue=queue)]:
        with contextlib.suppress(ConfigError, TaskNotFound):  # changed or gone meanwhile
            space.handle(tid).retry()
            requeued += 1
    click.echo(f"requeued {requeued} {state} task(s)")


@tasks.command("cancel")
@click.argument("task_id")
@click.option("--terminate", is_flag=True, help="Kill a running process-isolated task.")
@click.option("--url", default=None, help=URL_HELP)
@guard
def cancel_task(task_id: str, terminate: bool, url: str | None) -> None:
    """Cancel a task: a queued one never runs; a running one is asked to stop."""
    space = existing_space(url)
    state = space.handle(task_id).cancel(terminate=terminate)
    note = "" if state in FINAL_STATES or state == "queued" else " (cancel requested)"
    click.echo(f"{task_id}: {state}{note}")


@click.group()
def queues() -> None:
    """Manage queues."""


@queues.command("purge")
@click.argument("queue")
@click.option("--state", "states", multiple=True, type=click.Choice(PURGE_STATES),
              help="States to delete (repeatable; default: queued).")  # fmt: skip
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--url", default=None, help=URL_HELP)
@guard
def purge_queue(queue: str, states: tuple[str, ...], yes: bool, url: str | None) -> None:
    """Delete the tasks of QUEUE in the given states (running tasks are never purged)."""
    space = existing_space(url)
    chosen = list(states or ("queued",))
    count = space.stats().counts.get(queue, {})
    n = sum(count.get(s, 0) for s in chosen)
    if not yes:
        click.confirm(f"delete {n} {'/'.join(chosen)} task(s) of queue {queue!r}?", abort=True)
    deleted = space.store.queue.purge(queue, chosen)
    click.echo(f"deleted {deleted} task(s) from queue {queue!r}")
