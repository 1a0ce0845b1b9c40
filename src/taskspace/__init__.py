"""taskspace: a shared space in which AI workers collaborate on tasks.

from taskspace import Space, current_task

space = Space("sqlite:///.taskspace/space.db")

@space.task(max_attempts=3, lease=30)
def train(params: dict) -> dict: ...

train.submit({"C": 1.0}).result(timeout=60)
"""

from typing import TYPE_CHECKING, Any

from taskspace.backends.base import TaskRecord
from taskspace.backends.memory import ManualClock
from taskspace.errors import (
    BackendError,
    CachedError,
    Compacted,
    ConfigError,
    InvalidURL,
    LeaseLost,
    LockTimeout,
    MissingDependency,
    NoCurrentTask,
    NotAnInteger,
    PayloadTooLarge,
    ProcessDied,
    RateLimited,
    ResultTimeout,
    Retry,
    SerializationError,
    SpaceLost,
    SpaceNotFound,
    SubscriptionLost,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskspaceError,
    TaskTimeout,
    UnknownTask,
    UpdateTimeout,
    VersionConflict,
)
from taskspace.space import Space
from taskspace.tasks import Handle, Task, TaskContext, current_task

if TYPE_CHECKING:
    from taskspace.worker import Worker, WorkerConfig, WorkerReport

_LAZY = {"Worker", "WorkerConfig", "WorkerReport"}


def __getattr__(name: str) -> Any:
    # The worker (threads, asyncio, multiprocessing) is imported on first use,
    # so that `import taskspace` and the CLI's --help stay quick.
    if name in _LAZY:
        import taskspace.worker

        return getattr(taskspace.worker, name)
    raise AttributeError(f"module 'taskspace' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CachedError",
    "Compacted",
    "ConfigError",
    "Handle",
    "InvalidURL",
    "LeaseLost",
    "LockTimeout",
    "ManualClock",
    "MissingDependency",
    "NoCurrentTask",
    "NotAnInteger",
    "PayloadTooLarge",
    "ProcessDied",
    "RateLimited",
    "ResultTimeout",
    "Retry",
    "SerializationError",
    "Space",
    "SpaceLost",
    "SpaceNotFound",
    "SubscriptionLost",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskNotFound",
    "TaskRecord",
    "TaskTimeout",
    "TaskspaceError",
    "UnknownTask",
    "UpdateTimeout",
    "VersionConflict",
    "Worker",
    "WorkerConfig",
    "WorkerReport",
    "__version__",
    "current_task",
]
