"""What a running task knows about itself: ``current_task()``.

The context is bound by the worker for the duration of one attempt (a
ContextVar, so threads and asyncio tasks each see their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from taskspace.errors import NoCurrentTask, TaskCancelled

PROGRESS_MIN_INTERVAL_S = 0.2

_current: ContextVar[TaskContext | None] = ContextVar("taskspace_current_task", default=None)


@dataclass
class TaskContext:
    """One attempt of one task, as seen from inside it.

    ``fencing_token`` increases with every claim of the task: pass it along
    with writes to other systems so they can refuse a stale attempt.
    ``cancelled`` turns true when a cancel was requested or the lease was
    lost; long tasks should check it (or call :meth:`check_cancelled`).
    """

    id: str
    name: str
    attempt: int
    max_attempts: int
    fencing_token: int
    worker: str
    _report: Callable[[float, float], None]
    _cancelled: bool = False
    _last_report: float = 0.0

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested or the worker lost this attempt's lease."""
        return self._cancelled

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if this attempt should stop."""
        if self._cancelled:
            raise TaskCancelled(self.id, "cancelled", "TaskCancelled", "cancel requested")

    def cancel(self) -> None:
        """Ask this attempt to stop (set by the worker; tasks check ``cancelled``)."""
        self._cancelled = True

    def progress(self, done: float, total: float) -> None:
        """Report progress; throttled to a few writes per second, the last one always kept."""
        now = time.monotonic()
        if done < total and now - self._last_report < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_report = now
        self._report(done, total)


def current_task() -> TaskContext:
    """The context of the task running in this thread or asyncio task."""
    ctx = _current.get()
    if ctx is None:
        raise NoCurrentTask("current_task() called outside a task run by a taskspace worker")
    return ctx


def bind(ctx: TaskContext | None) -> object:
    """Bind ``ctx`` as the current task; returns a token for :func:`unbind`."""
    return _current.set(ctx)


def unbind(token: object) -> None:
    """Restore the binding from before :func:`bind`."""
    _current.reset(token)  # type: ignore[arg-type]
