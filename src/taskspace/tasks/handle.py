"""Handle: a reference to one submitted task, usable from any process.

Every call that finds no such task first checks the space
(``store.check_space()``): a task missing because the space was wiped or
replaced raises :class:`~taskspace.errors.SpaceLost`, never TaskNotFound, so
a caller cannot mistake a lost space for a task that was deleted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import FINAL_STATES, RETRYABLE_STATES, TaskRecord, TaskState
from taskspace.codec import decoder_for
from taskspace.errors import (
    BackendError,
    ConfigError,
    ResultTimeout,
    SpaceLost,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)

if TYPE_CHECKING:
    from taskspace.space import Space

WAIT_SLICE_S = 1.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


class Handle:
    """A submitted task. Cheap to create; every call reads the store afresh."""

    __slots__ = ("id", "space")

    def __init__(self, space: Space, task_id: str) -> None:
        self.space = space
        self.id = task_id

    def __repr__(self) -> str:
        return f"<Handle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Handle) and other.id == self.id and other.space is self.space

    def __hash__(self) -> int:
        return hash(self.id)

    def _not_found(self) -> TaskNotFound:
        """The error for a task the store does not hold; raises SpaceLost instead
        if the space was wiped or replaced (BackendError if that cannot be read)."""
        self.space.store.check_space()
        return TaskNotFound(self.id)

    def info(self) -> TaskRecord:
        """The task's full record; raises TaskNotFound if the store holds no such
        task (SpaceLost if the space itself was wiped or replaced)."""
        record = self.space.store.queue.get(self.id)
        if record is None:
            raise self._not_found()
        return record

    def status(self) -> TaskState:
        """queued | running | succeeded | failed | dead | cancelled; reads only the
        state. TaskNotFound (or SpaceLost) as :meth:`info`."""
        state = self.space.store.queue.state(self.id)
        if state is None:
            raise self._not_found()
        return state

    def progress(self) -> tuple[float, float] | None:
        """(done, total) as last reported by the task, or None."""
        return self.info().progress

    def cancel(self, terminate: bool = False) -> TaskState:
        """Cancel: a queued task never runs. A running one is asked to stop:
        a thread task sees ``current_task().cancelled`` (Python cannot stop a
        thread), an async task is cancelled on its event loop, a process task
        gets SIGTERM, or SIGKILL with ``terminate=True``. Returns the state
        after the request."""
        if not isinstance(terminate, bool):
            raise ConfigError(f"terminate must be True or False, got {terminate!r}")
        before = self.space.store.queue.get(self.id)
        state = self.space.store.queue.cancel(self.id, terminate=terminate)
        if state is None:
            raise self._not_found()
        self.space.events.by_hand("cancelled", before, state)
        return state

    def retry(self) -> TaskState:
        """Requeue a ``failed`` or ``dead`` task with fresh attempts; its last
        error is kept until it runs. Raises ConfigError for any other state."""
        before = self.info()
        if before.state not in RETRYABLE_STATES:
            raise ConfigError(
                f"task {self.id} is {before.state}; only failed or dead tasks can be retried"
            )
        state = self.space.store.queue.retry(self.id)
        if state is None:
            raise self._not_found()
        self.space.events.by_hand("requeued", before, state)
        return state

    def done(self) -> bool:
        """True once the task is in a final state."""
        return self.status() in FINAL_STATES

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value.

        Raises TaskFailed (remote type, message, traceback) if it failed or
        died, TaskCancelled if cancelled, ResultTimeout (a TimeoutError) if
        it has not ended within ``timeout`` seconds, TaskNotFound if the task
        is gone (deleted, or reaped past its ``result_ttl``) and SpaceLost,
        at once, if the space was wiped or replaced. The timeout is kept
        through backend outages: it raises ResultTimeout (chained to the
        BackendError) rather than wait past it.
        """
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            raise ConfigError(f"timeout must be a number >= 0 or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining: float = WAIT_SLICE_S if timeout is None else timeout
        delay = BACKOFF_START_S
        while True:
            try:
                # Waiting first saves a round trip: it returns at once if the task ended.
                self.space.store.queue.wait_for_finish([self.id], min(remaining, WAIT_SLICE_S))
                record = self.info()
            except SpaceLost:
                raise  # never retried: the task will not come back
            except BackendError as exc:
                # The backend is away (restart, failover): keep waiting until the deadline.
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise ResultTimeout(
                        f"task {self.id}: no result within {timeout} s; the backend is"
                        f" unreachable ({exc})"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_START_S
            if record.state in FINAL_STATES:
                return self._value(record)
            remaining = WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(
                    f"task {self.id} still {record.state} after waiting {timeout} s"
                )

    def _value(self, record: TaskRecord) -> Any:
        if record.state == "succeeded":
            if record.result is None:
                return None
            codec = decoder_for(record.codec, allow_pickle=self.space.allow_pickle)
            return codec.decode(record.result)
        error = record.error or {}
        cls = TaskCancelled if record.state == "cancelled" else TaskFailed
        raise cls(
            self.id,
            record.state,
            str(error.get("type", "Cancelled" if record.state == "cancelled" else "Error")),
            str(error.get("message", record.state)),
            str(error.get("traceback", "")),
        )
