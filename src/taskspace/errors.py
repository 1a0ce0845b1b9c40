"""Every exception taskspace raises, under one root.

    TaskspaceError
     ├── ConfigError            bad option or argument (also a ValueError)
     │    └── InvalidURL        malformed or unsupported backend URL
     ├── SerializationError     a value the codec cannot encode exactly or decode (also a TypeError)
     │    └── PayloadTooLarge   an argument or result above ``max_payload`` (also a ValueError)
     ├── UnknownTask            a task name not registered in this Space (also a LookupError)
     ├── TaskNotFound           a task id the store does not hold (also a LookupError)
     ├── TaskFailed             the task ended failed or dead: remote type, message, traceback
     │    └── TaskCancelled     the task was cancelled
     ├── ResultTimeout          waited too long for a result (also the builtin TimeoutError)
     ├── NoCurrentTask          current_task() called outside a running task
     ├── TaskTimeout            (recorded) an attempt ran past the task's timeout
     ├── ProcessDied            (recorded) a process-isolated attempt died without reporting
     ├── SpaceNotFound          a read-only command named a space that does not exist
     ├── LeaseLost              a lock, semaphore slot or leader term is no longer held
     ├── LockTimeout            not acquired within ``wait`` (also the builtin TimeoutError)
     ├── VersionConflict        a compare-and-set found another version; ``current`` has it
     ├── RateLimited            a rate limit's budget is spent; ``retry_after`` says for how long
     ├── BackendError           the store is unreachable or refused the operation
     │    └── SubscriptionLost  a subscription's connection dropped: messages may be missed
     └── MissingDependency      an optional extra is not installed (also an ImportError)

Control flow (not errors, not under the root): :class:`Retry` asks the worker
to retry the running task now or after a countdown.

Every message names the bad value and, where there is a short list, what
would be valid.
"""

from __future__ import annotations

from typing import Any


class TaskspaceError(Exception):
    """Root of every taskspace exception."""


class ConfigError(TaskspaceError, ValueError):
    """An option, argument or setting is invalid; nothing was written."""


class InvalidURL(ConfigError):
    """A backend URL is malformed or names an unsupported backend."""


class SerializationError(TaskspaceError, TypeError):
    """A value could not be encoded or decoded by the configured codec."""


class PayloadTooLarge(SerializationError, ValueError):
    """An encoded argument or result is larger than the Space's ``max_payload``."""


class UnknownTask(TaskspaceError, LookupError):
    """A task name is not registered in this Space; it is never imported by name."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        hint = f"; registered: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown task {name!r}{hint}")
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnknownTask, (self.name,))


class TaskNotFound(TaskspaceError, LookupError):
    """No task with this id exists in the store."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}")
        self.task_id = task_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskNotFound, (self.task_id,))


class TaskFailed(TaskspaceError):
    """A task ended without a result; carries the remote error type, message and traceback."""

    def __init__(
        self,
        task_id: str,
        status: str,
        remote_type: str,
        message: str,
        traceback: str = "",
    ) -> None:
        super().__init__(f"task {task_id} {status}: {remote_type}: {message}")
        self.task_id = task_id
        self.status = status
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.task_id, self.status, self.remote_type, self.remote_message)
        return (type(self), (*args, self.remote_traceback))


class TaskCancelled(TaskFailed):
    """The task was cancelled before it produced a result."""


class ResultTimeout(TaskspaceError, TimeoutError):
    """The task did not end within the time the caller was willing to wait."""


class NoCurrentTask(TaskspaceError, RuntimeError):
    """``current_task()`` was called outside a task run by a worker."""


class TaskTimeout(TaskspaceError, TimeoutError):
    """An attempt ran past its task's ``timeout``; recorded, then retried like an error."""


class ProcessDied(TaskspaceError, RuntimeError):
    """A process-isolated attempt exited without reporting an outcome."""


class BackendError(TaskspaceError):
    """The backend is unreachable or failed; the operation may be retried."""


class SpaceNotFound(TaskspaceError, LookupError):
    """There is no space at this URL (read-only commands never create one)."""


class SubscriptionLost(BackendError):
    """A subscription lost its connection; messages may have been missed, so re-sync."""


class SpaceLost(BackendError):
    """The space at this URL was wiped or replaced since this client opened it
    (FLUSHALL, a Redis restart without persistence, a deleted SQLite file):
    what it held is gone. Never retried: a worker stops instead of serving a
    new, empty space as if nothing had happened."""


class Compacted(TaskspaceError, LookupError):
    """A KV change feed was asked for changes it no longer keeps.

    ``revision`` is the space's current revision and ``compacted`` the newest
    revision the feed has dropped: re-list (``scan``), then follow the feed
    from ``revision``."""

    def __init__(self, message: str, revision: int, compacted: int) -> None:
        super().__init__(message)
        self.revision = revision
        self.compacted = compacted


class NotAnInteger(TaskspaceError, ValueError):
    """``incr`` on a KV value that is not a decimal integer; nothing was written."""


class LeaseLost(TaskspaceError):
    """A lock, semaphore slot or leader term is no longer held (it expired, was
    released, or a renewal failed past its deadline): stop acting on it. A
    fenced write made with it was refused and changed nothing."""


class LockTimeout(TaskspaceError, TimeoutError):
    """A lock or semaphore was not acquired within its ``wait``."""


class VersionConflict(TaskspaceError):
    """A compare-and-set found the key at another version than expected;
    nothing was written. ``current`` is the version found (None: absent)."""

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.current))


class UpdateTimeout(VersionConflict, TimeoutError):
    """``space.kv.update`` could not win the race for its key (or reach the
    store) within its timeout; nothing was written by the call. ``current``:
    the version it last saw (None: absent)."""


class CachedError(TaskspaceError):
    """A memoized call (``@space.cached(cache_errors=...)``) raised earlier and
    the error was kept: ``remote_type`` (the exception's type name) and
    ``remote_message``."""

    def __init__(self, name: str, remote_type: str, message: str) -> None:
        super().__init__(f"{name}: cached error {remote_type}: {message}")
        self.name = name
        self.remote_type = remote_type
        self.remote_message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (CachedError, (self.name, self.remote_type, self.remote_message))


class RateLimited(TaskspaceError):
    """A rate limit's budget is spent: try again after ``retry_after`` seconds
    (None: unknown). Raised by ``limiter.acquire`` when ``wait`` runs out; raise
    it inside a task (on an HTTP 429, say) to have the task rescheduled after
    ``retry_after`` without spending an attempt."""

    def __init__(self, message: str = "rate limited", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.retry_after))


class MissingDependency(TaskspaceError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class Retry(Exception):
    """Raise inside a task to retry it after ``countdown`` seconds.

    Counts as an attempt; once ``max_attempts`` is reached the task fails with
    the message given here.
    """

    def __init__(self, countdown: float = 0.0, message: str = "retry requested") -> None:
        super().__init__(message)
        self.countdown = countdown
