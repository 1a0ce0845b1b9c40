"""Log output for people and for machines: ``setup_logging(level, fmt)``.

``text``: one line per record, ``time LEVEL [pid] logger: message``.
``json``: one JSON object per line (``time``, ``level``, ``logger``,
``message``, ``pid``, plus the task and worker fields a record carries:
``task_id``, ``task``, ``attempt``, ``max_attempts``, ``worker``,
``duration``, ``outcome``; and ``exception`` with the traceback, if any).
Guarantee: a line is always valid JSON, whatever the message holds; a
field that JSON cannot hold is written as its ``str``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from taskspace.errors import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error", "critical")
# Record attributes copied into a JSON line when a record has them.
FIELDS = ("task_id", "task", "attempt", "max_attempts", "worker", "duration", "outcome")


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str, fmt: Literal["text", "json"]) -> None:
    """Send taskspace's (and the app's) logs to stderr at ``level``, as ``fmt``;
    replaces whatever handlers the root logger had."""
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ConfigError(f"unknown log level {level!r}; valid: {', '.join(LEVELS)}")
    if fmt not in ("text", "json"):
        raise ConfigError(f"unknown log format {fmt!r}; valid: text, json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
