"""State transitions shared by every backend, so their semantics never fork.

Backends apply these decisions inside their own atomic step; this module only
decides, it never touches a store.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from taskspace.backends.base import (
    ERROR_HISTORY_MAX,
    TASK_STATES,
    ErrorInfo,
    Outcome,
    TaskRecord,
    TaskState,
)
from taskspace.errors import ConfigError

"""Events that move a running task: an outcome its worker reports, or ``expired``."""
RunningEvent = Literal["succeeded", "failed", "cancelled", "retry", "release", "expired"]


@dataclass(frozen=True, slots=True)
class Rule:
    """Where a running task goes on one event: ``normal`` when it has attempts
    left and no cancel was requested, ``exhausted`` when its attempts are used
    up (``attempts >= max_attempts``), ``on_cancel`` when a cancel was
    requested (which wins over ``exhausted``)."""

    normal: TaskState
    exhausted: TaskState
    on_cancel: TaskState


# THE task state machine of a running task. Every backend applies it: memory
# and SQLite through running_transition, Redis through the Lua table that
# lua_rules() generates from it at script load time. The conformance suite
# (tests/conformance/test_transitions.py) drives every backend through every
# row and compares.
RUNNING_TRANSITIONS: dict[RunningEvent, Rule] = {
    "succeeded": Rule("succeeded", "succeeded", "succeeded"),
    "failed": Rule("failed", "failed", "failed"),
    "cancelled": Rule("cancelled", "cancelled", "cancelled"),
    # A retry past max_attempts fails; a cancelled task never runs again.
    "retry": Rule("queued", "failed", "cancelled"),
    # A release gives the task back unstarted: its claim is not an attempt.
    "release": Rule("queued", "queued", "cancelled"),
    # The lease expired: the worker died or stalled.
    "expired": Rule("queued", "dead", "cancelled"),
}
# The states ``retry`` requeues, and the ones ``cancel`` ends at once (a
# running task only gets a cancel request; a final one is left alone).
RETRYABLE_STATES: frozenset[TaskState] = frozenset({"failed", "dead"})
CANCEL_AT_ONCE_STATES: frozenset[TaskState] = frozenset({"queued"})


def running_transition(
    event: RunningEvent, cancel_requested: bool, attempts: int, max_attempts: int
) -> TaskState:
    """The state a running task moves to on ``event`` (see RUNNING_TRANSITIONS)."""
    rule = RUNNING_TRANSITIONS[event]
    if cancel_requested:
        return rule.on_cancel
    return rule.normal if attempts < max_attempts else rule.exhausted


def outcome_state(outcome: Outcome, rec: TaskRecord) -> TaskState:
    """The state a running task moves to when its worker reports ``outcome``."""
    return running_transition(outcome.kind, rec.cancel_requested, rec.attempts, rec.max_attempts)


def expired_state(rec: TaskRecord) -> TaskState:
    """The state of a running task whose lease expired (its worker died or stalled)."""
    return running_transition("expired", rec.cancel_requested, rec.attempts, rec.max_attempts)


def lua_rules() -> str:
    """RUNNING_TRANSITIONS, RETRYABLE_STATES and CANCEL_AT_ONCE_STATES as Lua
    source with a ``transition(event, cancel_requested, attempts,
    max_attempts)`` function: the Redis scripts are loaded with it, so they
    never restate the rules."""
    rows = ",\n".join(
        f"  {event} = {{normal = '{r.normal}', exhausted = '{r.exhausted}',"
        f" on_cancel = '{r.on_cancel}'}}"
        for event, r in RUNNING_TRANSITIONS.items()
    )
    retryable = ", ".join(f"{state} = true" for state in sorted(RETRYABLE_STATES))
    at_once = ", ".join(f"{state} = true" for state in sorted(CANCEL_AT_ONCE_STATES))
    return (
        "-- Generated from taskspace.backends.outcomes: do not edit here.\n"
        f"local RUNNING_TRANSITIONS = {{\n{rows}\n}}\n"
        f"local RETRYABLE_STATES = {{{retryable}}}\n"
        f"local CANCEL_AT_ONCE_STATES = {{{at_once}}}\n"
        "local function transition(event, cancel_requested, attempts, max_attempts)\n"
        "  local rule = RUNNING_TRANSITIONS[event]\n"
        "  if cancel_requested then return rule.on_cancel end\n"
        "  if attempts < max_attempts then return rule.normal end\n"
        "  return rule.exhausted\n"
        "end\n"
    )


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
