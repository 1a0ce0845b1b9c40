"""The ``taskspace logs`` command: the log records workers shipped to a space.

``taskspace logs --task ID --level warning --since 10m`` prints the newest
``--limit`` matching records (oldest first); ``--follow`` then keeps
printing new ones until interrupted; ``--json`` prints one JSON object per
line (the :class:`taskspace.logs.LogRecord` fields plus ``timestamp`` in ISO
8601 UTC), ready for Fluentd, Logstash or Vector.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from taskspace.cli.common import URL_HELP, existing_space, guard
from taskspace.errors import ConfigError

if TYPE_CHECKING:
    from taskspace.logs import LogRecord

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
SCAN_PAGE = 1000


def parse_since(value: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``30s``, ``1d``, ``1w`` (ago), a number of seconds ago,
    or an ISO 8601 time (naive means UTC): unix seconds. ConfigError otherwise."""
    now = time.time() if now is None else now
    text = value.strip()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text)
    if found:
        return now - float(found.group(1)) * UNITS[found.group(2) or "s"]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since must look like 10m, 2h, 30s, 1d or an ISO time, got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(record: LogRecord) -> str:
    """One record as a JSON line (its fields plus ``timestamp``, ISO 8601 UTC)."""
    import orjson

    doc: dict[str, Any] = {"timestamp": _iso(record.time), **record.to_json()}
    return orjson.dumps(doc, default=str).decode()


def text_line(record: LogRecord) -> str:
    """One record for a person: time, level, worker, task, logger, message (and traceback)."""
    task = ""
    if record.task_id is not None:
        task = f" {record.task or '?'}[{record.task_id}]#{record.attempt}"
    line = (
        f"{_iso(record.time)} {record.level:<8} {record.worker or record.host}{task}"
        f" {record.logger}: {record.message}"
    )
    return f"{line}\n{record.exc.rstrip()}" if record.exc else line


def register(main: click.Group) -> None:
    """Add the ``logs`` command to ``main``."""

    @main.command()
    @click.option("--task", "task_id", default=None, help="Only records of this task id.")
    @click.option("--worker", default=None, help="Only records of this worker (its full name).")
    @click.option(
        "--level",
        default=None,
        type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
        help="Only records at this level or above.",
    )
    @click.option("--since", default=None, help="Only records since: 10m, 2h, 1d, or an ISO time.")
    @click.option(
        "--limit",
        default=100,
        show_default=True,
        type=click.IntRange(min=1, max=100_000),
        help="Print at most this many (the newest) matching records.",
    )
    @click.option("--follow", "-f", is_flag=True, help="Then keep printing new records.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    @click.option("--url", default=None, help=URL_HELP)
    @guard
    def logs(task_id: str | None, worker: str | None, level: str | None, since: str | None,
             limit: int, follow: bool, as_json: bool, url: str | None) -> None:  # fmt: skip
        """Print log records that workers shipped (with task context).

        \b
        Examples:
          taskspace logs --task 3f2a... --json
          taskspace logs --level warning --since 10m --follow
        """
        since_t = parse_since(since) if since is not None else None
        space = existing_space(url)
        show = json_line if as_json else text_line
        filters: dict[str, Any] = {"task_id": task_id, "worker": worker, "level": level}
        try:
            newest: deque[LogRecord] = deque(maxlen=limit)
            tail = space.logs.last_id() if follow else 0  # before the scan: nothing is missed
            cursor = 0
            while True:
                page = space.logs.query(since=since_t, after=cursor, limit=SCAN_PAGE, **filters)
                newest.extend(page)
                if len(page) < SCAN_PAGE:
                    break
                cursor = page[-1].id
            for record in newest:
                click.echo(show(record))
            if not follow:
                return
            sys.stdout.flush()
            after = max(tail, newest[-1].id if newest else 0)
            for record in space.logs.follow(after=after, **filters):
                click.echo(show(record))
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
        finally:
            space.close()
