"""Space: the one handle on a backend, and the registry of its tasks.

A Space is created explicitly and passed around; nothing is created at
import time. The store connection opens lazily on first use, so defining a
Space in an app module costs nothing until it is used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from taskspace.backends import open_store, validate_url
from taskspace.backends.base import Clock, Closeable, QueueStats, Store, TaskSpec
from taskspace.codec import SERIALIZERS, Codec, get_codec
from taskspace.errors import ConfigError, TaskNotFound, UnknownTask
from taskspace.tasks.handle import Handle
from taskspace.tasks.options import TaskOptions
from taskspace.tasks.task import Task

if TYPE_CHECKING:
    from taskspace.worker.worker import WorkerReport

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "sqlite:///.taskspace/space.db"
URL_ENV = "TASKSPACE_URL"


class Space(Closeable):
    """A handle on one backend, named by URL, and the tasks registered on it.

    ``Space()`` uses ``$TASKSPACE_URL``, else ``sqlite:///.taskspace/space.db``.
    ``namespace`` separates spaces sharing one Redis (default ``default``).
    ``serializer`` is ``json`` (default), ``msgpack`` or ``pickle``; pickle is
    an explicit opt-in, and only a Space that opted in decodes pickle payloads.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        serializer: str = "json",
        clock: Clock | None = None,
        namespace: str | None = None,
    ) -> None:
        self.url = url if url is not None else os.environ.get(URL_ENV) or DEFAULT_URL
        self.scheme = validate_url(self.url)
        if serializer not in SERIALIZERS:
            raise ConfigError(f"unknown serializer {serializer!r}; valid: {', '.join(SERIALIZERS)}")
        self.codec: Codec = get_codec(serializer)
        self.allow_pickle = serializer == "pickle"
        self._clock = clock
        self.namespace = namespace
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._tasks: dict[str, Task[Any, Any]] = {}

    def __repr__(self) -> str:
        return f"<Space {self.url} tasks={len(self._tasks)}>"

    @property
    def store(self) -> Store:
        """The backend store, opened on first use."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(self.url, clock=self._clock, namespace=self.namespace)
        return self._store

    def with_url(self, url: str) -> Space:
        """The same tasks and serializer on another backend (the CLI's ``--url``)."""
        namespace = self.namespace if validate_url(url) == self.scheme else None
        other = Space(url, serializer=self.codec.name, namespace=namespace)
        other._tasks = self._tasks
        return other

    def close(self) -> None:
        """Close the store connection; the Space reopens it if used again."""
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- tasks --------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, fn: None = None, /, *, name: str | None = None, **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, R] | None = None, /, *, name: str | None = None, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task: ``@space.task`` or ``@space.task(max_attempts=3,
        lease=30, timeout=600, queue="default", priority=0, isolation="process")``."""
        opts = TaskOptions.build(**options)

        def register(func: Callable[P, R]) -> Task[P, R]:
            if not callable(func):
                raise ConfigError(f"@space.task needs a function, got {func!r}")
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            if not isinstance(task_name, str) or not task_name:
                raise ConfigError(f"task name must be a non-empty string, got {task_name!r}")
            existing = self._tasks.get(task_name)
            if existing is not None and existing.fn is not func:
                raise ConfigError(f"a different function is already registered as {task_name!r}")
            registered: Task[P, R] = Task(self, func, task_name, opts)
            self._tasks[task_name] = registered
            return registered

        return register(fn) if fn is not None else register

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; raises UnknownTask naming the registered ones."""
        try:
            return self._tasks[name]
        except (KeyError, TypeError):
            raise UnknownTask(str(name), list(self._tasks)) from None

    @property
    def task_names(self) -> list[str]:
        """Names of every registered task, sorted."""
        return sorted(self._tasks)

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Handle:
        """Submit the task registered as ``name``; unknown names are refused."""
        return self.get_task(name).submit(*args, **kwargs)

    def push(self, specs: Sequence[TaskSpec]) -> list[Handle]:
        """Write encoded specs in one atomic step and return their handles."""
        ids = self.store.push(specs)
        return [Handle(self, task_id) for task_id in ids]

    def handle(self, task_id: str) -> Handle:
        """Re-attach to a task submitted anywhere; raises TaskNotFound if there is none."""
        if not isinstance(task_id, str) or self.store.get(task_id) is None:
            raise TaskNotFound(str(task_id))
        return Handle(self, task_id)

    def stats(self) -> QueueStats:
        """Task counts by queue and state."""
        return self.store.stats()

    def workers(self) -> list[dict[str, Any]]:
        """Live workers as they last registered themselves."""
        from taskspace.worker.registry import live_workers

        return live_workers(self.store)

    def run_worker(self, **options: Any) -> WorkerReport:
        """Run a worker in this process until stopped (or, with ``burst=True``,
        until its queues are empty). Options as :class:`~taskspace.worker.WorkerConfig`."""
        from taskspace.worker.config import WorkerConfig
        from taskspace.worker.worker import Worker

        return Worker(self, WorkerConfig.build(**options)).run()
