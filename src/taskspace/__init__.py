"""taskspace: a shared space in which AI workers collaborate on tasks.

from taskspace import Space, current_task

space = Space("sqlite:///.taskspace/space.db")

@space.task(max_attempts=3, lease=30)
def train(params: dict) -> dict: ...

train.submit({"C": 1.0}).result(timeout=60)
"""

from taskspace.backends.base import TaskRecord
from taskspace.backends.memory import ManualClock
from taskspace.errors import (
    BackendError,
    ConfigError,
    InvalidURL,
    MissingDependency,
    NoCurrentTask,
    PayloadTooLarge,
    ProcessDied,
    ResultTimeout,
    Retry,
    SerializationError,
    SpaceNotFound,
    SubscriptionLost,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskspaceError,
    TaskTimeout,
    UnknownTask,
)
from taskspace.space import Space
from taskspace.tasks import Handle, Task, TaskContext, current_task
from taskspace.worker import Worker, WorkerConfig, WorkerReport

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "Handle",
    "InvalidURL",
    "ManualClock",
    "MissingDependency",
    "NoCurrentTask",
    "PayloadTooLarge",
    "ProcessDied",
    "ResultTimeout",
    "Retry",
    "SerializationError",
    "Space",
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
    "Worker",
    "WorkerConfig",
    "WorkerReport",
    "__version__",
    "current_task",
]
