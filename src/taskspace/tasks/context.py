"""What a running task knows about itself: ``current_task()``.

The context is bound by the worker for the duration of one attempt (a
ContextVar, so threads and asyncio tasks each see their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from taskspace.errors import NoCurrentTask, TaskCancelled

PROGRESS_MIN_INTERVAL_S = 0.2

_current: ContextVar[TaskContext | None] = ContextVar("taskspace_current_task", default=None)


@dataclass
class TaskContext:
    """One attempt of one task, as seen from inside it.

    ``fencing_token`` increases with every claim of the task: pass it along
    with writes to other systems so they can refuse a stale attempt.
    ``cancelled`` turns true when this attempt should stop: a cancel was
    requested (``cancel_requested``), the worker lost the attempt's lease
    (``lease_lost``: the task may already run elsewhere, and whatever this
    attempt returns is discarded), or the worker is shutting down or gave up
    on it at its timeout. Long tasks should check it (or call
    :meth:`check_cancelled`).
    """

    id: str
    name: str
    attempt: int
    max_attempts: int
    fencing_token: int
    worker: str
    _report: Callable[[float, float], None]
    _usage: Callable[[dict[str, Any]], None] | None = None
    _cancelled: bool = False
    _cancel_requested: bool = False
    _lease_lost: bool = False
    _last_report: float = 0.0

    @property
    def cancelled(self) -> bool:
        """True once this attempt should stop (cancel request, lost lease, shutdown, timeout)."""
        return self._cancelled

    @property
    def cancel_requested(self) -> bool:
        """True once a user asked to cancel the task (the attempt then ends ``cancelled``)."""
        return self._cancel_requested

    @property
    def lease_lost(self) -> bool:
        """True once the worker lost this attempt's lease: it is abandoned, never finished."""
        return self._lease_lost

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if this attempt should stop."""
        if self._cancelled:
            reason = "lease lost" if self._lease_lost else "cancel requested"
            raise TaskCancelled(self.id, "cancelled", "TaskCancelled", reason)

    def cancel(self) -> None:
        """Record a cancel request for the task (set by the worker on renew)."""
        self._cancel_requested = True
        self._cancelled = True

    def lose_lease(self) -> None:
        """Record that the attempt's lease was lost (set by the worker on renew)."""
        self._lease_lost = True
        self._cancelled = True

    def stop(self) -> None:
        """Ask the attempt to stop without a cancel request (shutdown, timeout)."""
        self._cancelled = True

    def progress(self, done: float, total: float) -> None:
        """Report progress; throttled to a few writes per second, the last one always kept."""
        now = time.monotonic()
        if done < total and now - self._last_report < PROGRESS_MIN_INTERVAL_S:
            return
        self._last_report = now
        self._report(done, total)

    def record(
        self,
        *,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        cost_usd: float | None = None,
        model: str | None = None,
    ) -> None:
        """Attach usage to this attempt: a ``usage`` task event (see
        :mod:`taskspace.events`) with the values given, shipped in the
        background (never blocks on the backend; a worker that cannot reach
        it buffers a bounded number of events). Call it once per model call,
        or once with totals: readers sum the events. ConfigError naming the
        argument for a negative or non-numeric count or cost, an empty model,
        or no value at all; nothing is recorded then."""
        from taskspace.events import check_usage

        usage = check_usage(tokens_in, tokens_out, cost_usd, model)
        if self._usage is not None:
            self._usage(usage)


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
