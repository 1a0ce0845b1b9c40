"""State transitions shared by every backend, so their semantics never fork.

Backends apply these decisions inside their own atomic step; this module only
decides, it never touches a store.
"""

from __future__ import annotations

from collections.abc import Collection

from taskspace.backends.base import (
    ERROR_HISTORY_MAX,
    TASK_STATES,
    ErrorInfo,
    Outcome,
    TaskRecord,
    TaskState,
)
from taskspace.errors import ConfigError


def outcome_state(outcome: Outcome, rec: TaskRecord) -> TaskState:
    """The state a running task moves to when its worker reports ``outcome``.

    A retry past ``max_attempts`` fails; a retry or release of a task whose
    cancel was requested ends ``cancelled`` rather than running again.
    """
    if outcome.kind in ("succeeded", "failed", "cancelled"):
        return outcome.kind
    if rec.cancel_requested:
        return "cancelled"
    if outcome.kind == "release":
        return "queued"
    return "queued" if rec.attempts < rec.max_attempts else "failed"


def expired_state(rec: TaskRecord) -> TaskState:
    """The state of a running task whose lease expired (its worker died or stalled)."""
    if rec.cancel_requested:
        return "cancelled"
    return "queued" if rec.attempts < rec.max_attempts else "dead"


def with_history(error: ErrorInfo, previous: ErrorInfo | None) -> ErrorInfo:
    """``error`` carrying the errors before it, flat and bounded: at most
    ERROR_HISTORY_MAX earlier errors (newest first, without their own
    history), so a task that fails thousands of times stores a bounded error."""
    if not previous:
        return error
    earlier = {k: v for k, v in previous.items() if k != "history"}
    history = [earlier, *previous.get("history", [])][:ERROR_HISTORY_MAX]
    return {**error, "history": history}


def lease_lost_error(rec: TaskRecord) -> ErrorInfo:
    """The error recorded when a lease expires; keeps a bounded history of earlier errors."""
    error: ErrorInfo = {
        "type": "WorkerLost",
        "message": (
            f"lease expired on attempt {rec.attempts} of {rec.max_attempts} "
            f"(worker {rec.worker}); the worker died or stalled"
        ),
        "traceback": "",
    }
    return with_history(error, rec.error)


def check_list_filters(state: str | None, limit: int) -> None:
    """Refuse a ``list`` call that could only be a mistake, before it touches a store."""
    if state is not None and state not in TASK_STATES:
        raise ConfigError(f"unknown task state {state!r}; valid: {', '.join(TASK_STATES)}")
    if limit < 0:
        raise ConfigError(f"limit={limit} must be >= 0")


def unknown_cursor(task_id: str) -> ConfigError:
    """The error of a ``list`` whose ``after`` names no task (deleted, reaped or never there)."""
    return ConfigError(f"after={task_id!r}: no such task (it may have been deleted)")


def check_purge_states(states: Collection[str]) -> frozenset[str]:
    """The states a ``purge`` may delete; refuses unknown states and ``running``
    (a running task belongs to its worker, which would finish a deleted task)."""
    wanted = frozenset(states)
    unknown = sorted(wanted - set(TASK_STATES))
    if unknown:
        raise ConfigError(
            f"unknown task state(s) {', '.join(unknown)}; valid: {', '.join(TASK_STATES)}"
        )
    if "running" in wanted:
        raise ConfigError(
            "purge cannot delete running tasks: they belong to their workers;"
            " cancel them, or purge after they end"
        )
    return wanted
