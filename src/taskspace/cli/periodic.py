"""The ``taskspace periodic`` commands: ``periodic list APP`` shows each schedule of
an app with its next and last run. It reads the space and never creates one."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import click

from taskspace.cli.common import URL_HELP, echo_json, guard, load_space
from taskspace.errors import SpaceNotFound

if TYPE_CHECKING:
    from taskspace.coordination.periodic import Schedule, ScheduleState


def register(main: click.Group) -> None:
    """Add this module's commands to ``main``."""
    main.add_command(periodic)


def _local(tick: float | None, tz: str) -> str | None:
    if tick is None:
        return None
    return datetime.fromtimestamp(tick, ZoneInfo(tz)).isoformat()


def _span(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2 h 5 min``, ``3 d 4 h``."""
    s = int(abs(seconds))
    for size, unit, sub, sub_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min")):
        if s >= size:
            rest = (s % size) // sub
            return f"{s // size} {unit}" + (f" {rest} {sub_unit}" if rest else "")
    return f"{s // 60} min" if s >= 60 else f"{s} s"


def _row(schedule: Schedule, now: float, exists: bool) -> dict[str, Any]:
    """One schedule as ``periodic list --json`` prints it (``exists``: its space does)."""
    state: ScheduleState | None = schedule.state() if exists else None
    next_run = schedule.next_after(now if state is None else max(now, state.last_tick))
    last_state = None
    if state is not None and state.last_task_id is not None:
        last_state = schedule.task.space.store.queue.state(state.last_task_id) or "deleted"
    return {
        "name": schedule.name, "spec": schedule.spec, "cron": schedule.cron,
        "every": schedule.every, "tz": schedule.tz, "catch_up": schedule.catch_up,
        "queue": schedule.task.queue, "next_run": next_run,
        "next_run_local": _local(next_run, schedule.tz),
        "next_in_s": None if next_run is None else round(next_run - now, 3),
        "last_run": None if state is None else state.last_fired,
        "last_run_local": None if state is None else _local(state.last_fired, schedule.tz),
        "last_task_id": None if state is None else state.last_task_id,
        "last_task_state": last_state, "fired_at": None if state is None else state.fired_at,
        "fired": 0 if state is None else state.fired,
        "pending": [] if state is None else list(state.pending),
        "seen": state is not None,
    }  # fmt: skip


def _short(tick: float, tz: str) -> str:
    return datetime.fromtimestamp(tick, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _print_table(title: str, rows: list[dict[str, Any]], now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("schedule", "when", "next run", "last run", "fired"):
        table.add_column(column, justify="right" if column == "fired" else "left")
    for row in rows:
        when = f"{row['spec']}\n{row['tz']}\ncatch_up={row['catch_up']}"
        next_run = "never again" if row["next_run"] is None else (
            f"{_short(row['next_run'], row['tz'])}\nin {_span(row['next_in_s'])}")  # fmt: skip
        if row["last_run"] is None:
            last = "never" if row["seen"] else "never (no maintainer has seen it yet)"
        else:
            last = (f"{_short(row['last_run'], row['tz'])}\n{_span(now - row['last_run'])} ago,"
                    f" {row['last_task_state']}")  # fmt: skip
        if row["pending"]:
            last += f"\n{len(row['pending'])} tick(s) pending"
        table.add_row(row["name"], when, next_run, last, str(row["fired"]))
    Console().print(table)


@click.group()
def periodic() -> None:
    """Periodic tasks: schedules declared with @space.periodic(cron=... or every=...).

    The elected maintainer among the workers fires each tick exactly once.
    """


@periodic.command("list")
@click.argument("app")
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@guard
def list_schedules(app: str, url: str | None, as_json: bool) -> None:
    """List the schedules of APP (module:attribute, as for `taskspace worker`).

    For each: its cron expression or interval, time zone, catch-up policy, the next
    run (in the schedule's zone, on the store's clock) and the last run with its
    task's state, read from the space. A space that does not exist yet is not
    created: the schedules are listed with no last run.

    \b
    Example:
      taskspace periodic list myapp:space --url redis://localhost:6379/0
    """
    loaded = load_space(app, url)
    space = loaded.with_url(loaded.url, create=False)
    schedules = sorted(space.schedules.values(), key=lambda s: s.name)
    exists, now = True, time.time()
    if schedules:
        try:
            now = space.store.clock.wall()
        except SpaceNotFound:
            exists = False
    rows = [_row(s, now, exists) for s in schedules]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no periodic schedules in {app} (declare one with @space.periodic)")
        return
    where = space.url if exists else f"{space.url} (no space there yet)"
    _print_table(f"periodic schedules of {app} on {where}", rows, now)
