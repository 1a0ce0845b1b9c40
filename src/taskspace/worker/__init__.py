"""Workers: run tasks from a Space's queues (see :mod:`taskspace.worker.worker`)."""

from taskspace.worker.config import WorkerConfig
from taskspace.worker.report import WorkerReport
from taskspace.worker.worker import Worker

__all__ = ["Worker", "WorkerConfig", "WorkerReport"]
