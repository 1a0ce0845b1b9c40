"""Tasks: definitions, submission options, handles and the running task's context."""

from taskspace.tasks.context import TaskContext, current_task
from taskspace.tasks.handle import Handle
from taskspace.tasks.options import SubmitOptions, TaskOptions
from taskspace.tasks.task import Task

__all__ = ["Handle", "SubmitOptions", "Task", "TaskContext", "TaskOptions", "current_task"]
