"""One log line per start and end of an attempt, for a person to read.

Levels: each start and success at DEBUG (a busy worker runs thousands a
second), each failure, retry and cancellation at INFO. Every line names the
task's id, name and attempt, and the end lines its duration; the same values
ride along as record attributes (``task_id``, ``task``, ``attempt``,
``worker``, ``duration``) for :mod:`taskspace.worker.logfmt`'s JSON lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskspace.backends.base import Outcome
from taskspace.worker.execution import Attempt

log = logging.getLogger("taskspace.worker")


def _fields(attempt: Attempt, worker: str, **more: Any) -> dict[str, Any]:
    record = attempt.record
    return {
        "task_id": record.id,
        "task": record.name,
        "attempt": record.attempts,
        "max_attempts": record.max_attempts,
        "worker": worker,
        **more,
    }


def started(attempt: Attempt, worker: str) -> None:
    """Log the start of an attempt (DEBUG)."""
    if log.isEnabledFor(logging.DEBUG):
        r = attempt.record
        log.debug(
            "task %s %s started (attempt %d/%d)",
            r.id, r.name, r.attempts, r.max_attempts,
            extra=_fields(attempt, worker),
        )  # fmt: skip


def ended(attempt: Attempt, outcome: Outcome | None, worker: str) -> None:
    """Log how an attempt ended: success and release at DEBUG, the rest at INFO."""
    kind = "abandoned" if outcome is None else outcome.kind
    level = logging.DEBUG if kind in ("succeeded", "release", "abandoned") else logging.INFO
    if not log.isEnabledFor(level):
        return
    r = attempt.record
    duration = time.monotonic() - attempt.began if attempt.began else 0.0
    what, then = _describe(kind, outcome, r.attempts >= r.max_attempts)
    log.log(
        level,
        "task %s %s %s in %.3f s (attempt %d/%d)%s%s",
        r.id, r.name, what, duration, r.attempts, r.max_attempts, then, _error_text(outcome),
        extra=_fields(attempt, worker, duration=round(duration, 6), outcome=kind),
    )  # fmt: skip


def _describe(kind: str, outcome: Outcome | None, exhausted: bool) -> tuple[str, str]:
    if kind == "retry" and outcome is not None and not exhausted:
        return "failed", f", retrying in {outcome.delay:.1f} s"
    if kind == "release" and outcome is not None and outcome.delay > 0:
        return "was rescheduled (rate limited)", f", again in {outcome.delay:.1f} s"
    what = {
        "succeeded": "succeeded",
        "failed": "failed",
        "cancelled": "was cancelled",
        "release": "was released unfinished",
        "abandoned": "was abandoned (lease lost)",
        "retry": "failed",
    }.get(kind, kind)
    return what, ""


def _error_text(outcome: Outcome | None) -> str:
    if outcome is None or not outcome.error:
        return ""
    return f": {outcome.error.get('type', 'Error')}: {outcome.error.get('message', '')}"
