"""Space: the one handle on a backend, and the registry of its tasks.

A Space is created explicitly and passed around; nothing is created at
import time. The store connection opens lazily on first use, so defining a
Space in an app module costs nothing until it is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from taskspace.backends import open_store, validate_url
from taskspace.backends.base import (
    DEFAULT_RESULT_TTL_S,
    MAX_DURATION_S,
    TASK_STATES,
    Clock,
    Closeable,
    QueueStats,
    Store,
    TaskRecord,
    TaskSpec,
    push_chunks,
)
from taskspace.codec import DEFAULT_MAX_PAYLOAD, SERIALIZERS, Codec, get_codec
from taskspace.errors import (
    BackendError,
    ConfigError,
    SpaceLost,
    TaskNotFound,
    TaskspaceError,
    UnknownTask,
)
from taskspace.tasks.handle import Handle
from taskspace.tasks.options import TaskOptions
from taskspace.tasks.task import Task

if TYPE_CHECKING:
    from taskspace.coordination.election import Election
    from taskspace.coordination.lock import Lock, Semaphore
    from taskspace.coordination.periodic import Schedule
    from taskspace.coordination.ratelimit import RateLimiter
    from taskspace.coordination.registry import Registry
    from taskspace.events import Events
    from taskspace.logs import Logs
    from taskspace.messaging.streams import Stream
    from taskspace.messaging.topic import Topic
    from taskspace.state.cache import Cache
    from taskspace.state.kv import KV
    from taskspace.worker.report import WorkerReport

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_URL = "sqlite:///.taskspace/space.db"
URL_ENV = "TASKSPACE_URL"
# A push that fails with BackendError is retried with backoff for this long;
# task ids make a retried push idempotent, so a lost reply never duplicates.
PUSH_RETRY_S = 10.0
PUSH_BACKOFF_START_S = 0.05
PUSH_BACKOFF_MAX_S = 1.0
LIST_LIMIT_MAX = 10_000

log = logging.getLogger("taskspace")


def _check_size(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{name} must be a positive number{' or None' if allow_none else ''},"
                          f" got {value!r}")  # fmt: skip


def module_of(func: Callable[..., Any]) -> str:
    """The module a worker will import ``func`` from: for a script run as
    ``__main__``, its module name (``python -m pkg.app``) or file stem
    (``python app.py`` → ``app``), as ``taskspace worker app:space`` imports it."""
    module = str(func.__module__)
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else module  # interactive: only this process knows it


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
        max_payload: int | None = DEFAULT_MAX_PAYLOAD,
        result_ttl: float | None = DEFAULT_RESULT_TTL_S,
        create: bool = True,
    ) -> None:
        self.url = url if url is not None else os.environ.get(URL_ENV) or DEFAULT_URL
        self.scheme = validate_url(self.url)
        if serializer not in SERIALIZERS:
            raise ConfigError(f"unknown serializer {serializer!r}; valid: {', '.join(SERIALIZERS)}")
        _check_size("max_payload", max_payload, allow_none=True)
        _check_size("result_ttl", result_ttl, allow_none=True)
        if result_ttl is not None and result_ttl > MAX_DURATION_S:
            raise ConfigError(f"result_ttl must be at most ten years (or None), got {result_ttl!r}")
        self.max_payload = max_payload
        self.result_ttl = result_ttl
        self.codec: Codec = get_codec(serializer).limited(max_payload)
        self.allow_pickle = serializer == "pickle"
        self._clock = clock
        self.namespace = namespace
        self.create = create
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._schedules: dict[str, Schedule] = {}
        self._facades: dict[str, Any] = {}
        self._facade_options: dict[str, dict[str, Any]] = {}
        self._facade_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Space {self.url} tasks={len(self._tasks)}>"

    @property
    def store(self) -> Store:
        """The backend store, opened on first use: one object per protocol
        (``store.queue``, ``store.leases``, ``store.kv``, ``store.streams``,
        ``store.pubsub``, ``store.clock``) and ``store.check_space()``."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(
                        self.url, clock=self._clock, namespace=self.namespace, create=self.create
                    )
        return self._store

    def with_url(self, url: str, *, create: bool = True) -> Space:
        """The same tasks and settings on another backend (the CLI's ``--url``).
        Every task is bound to the new Space, so submitting acts on ``url`` only."""
        namespace = self.namespace if validate_url(url) == self.scheme else None
        other = Space(url, serializer=self.codec.name, namespace=namespace,
                      max_payload=self.max_payload, result_ttl=self.result_ttl,
                      create=create)  # fmt: skip
        other._tasks = {name: task.bound_to(other) for name, task in self._tasks.items()}
        other._schedules = {name: s.bound_to(other) for name, s in self._schedules.items()}
        return other

    def close(self) -> None:
        """Stop the Space's helpers that keep state alive in the background (the
        registry's heartbeats, held leases' renewal: each facade's ``close``),
        then close the store connection; the Space reopens it if used again."""
        with self._facade_lock:
            facades = list(self._facades.values())
            self._facades.clear()
            self._facade_options.clear()
        for facade in facades:
            closer = getattr(facade, "close", None)
            if closer is not None:
                try:
                    closer()
                except TaskspaceError as exc:  # closing must not fail on a backend that is down
                    log.warning("closing %s failed: %s", type(facade).__name__, exc)
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
            task_name = name or f"{module_of(func)}.{func.__qualname__}"
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
        """The task registered as ``name``, or the one task whose name ends in
        ``.name`` (``train`` for ``app.train``); raises UnknownTask naming the
        registered ones (also when a short name is ambiguous)."""
        if not isinstance(name, str):
            raise UnknownTask(str(name), list(self._tasks))
        task = self._tasks.get(name)
        if task is not None:
            return task
        matches = [t for full, t in self._tasks.items() if full.endswith("." + name)]
        if len(matches) == 1:
            return matches[0]
        raise UnknownTask(name, [t.name for t in matches] or list(self._tasks))

    @property
    def task_names(self) -> list[str]:
        """Names of every registered task, sorted."""
        return sorted(self._tasks)

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Handle:
        """Submit the task registered as ``name``; unknown names are refused."""
        return self.get_task(name).submit(*args, **kwargs)

    def push(self, specs: Sequence[TaskSpec]) -> list[Handle]:
        """Write encoded specs and return their handles; durable once this returns.

        Written in chunks (PUSH_CHUNK_TASKS tasks or PUSH_CHUNK_BYTES bytes),
        each atomic: if a later chunk fails, earlier ones stay written. A
        BackendError is retried with backoff for PUSH_RETRY_S seconds; a
        retry carries the same task ids, so it never writes a task twice.
        """
        ids: list[str] = []
        for chunk in push_chunks(specs):
            ids += self._push_chunk(chunk)
        return [Handle(self, task_id) for task_id in ids]

    def _push_chunk(self, chunk: Sequence[TaskSpec]) -> list[str]:
        deadline = time.monotonic() + PUSH_RETRY_S
        delay = PUSH_BACKOFF_START_S
        while True:
            try:
                ids = self.store.queue.push(chunk)
            except BackendError as exc:
                if (
                    isinstance(exc, SpaceLost)
                    or time.monotonic() + delay > deadline
                    or self._in_caller_transaction()
                ):
                    raise
                log.warning("submit failed, retrying in %.2f s: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, PUSH_BACKOFF_MAX_S)
                continue
            # The "submitted" events of the chunk, batched in the background (a
            # caller's transaction may still roll back: its tasks get none).
            if not self._in_caller_transaction():
                (self._facades.get("events") or self.events).submitted(chunk, ids)
            return ids

    @contextlib.contextmanager
    def transaction(self, connection: Any) -> Iterator[Any]:
        """Submit inside the caller's own PostgreSQL transaction: every push of
        this thread (or asyncio task) in the block — ``task.submit``,
        ``submit_many``, ``space.push`` — is written on ``connection`` (a
        psycopg 3 connection to the space's database), so the tasks commit with
        the caller's data or not at all, and run only once it commits. The
        caller commits or rolls back; a failed push is not retried (it aborted
        the caller's transaction). Only a PostgreSQL space has this
        (ConfigError otherwise)::

            with psycopg.connect(dsn) as conn, space.transaction(conn):
                conn.execute("INSERT INTO orders ...")
                ship.submit(order_id)
        """
        enter = getattr(self.store, "transaction", None)
        if enter is None:
            raise ConfigError(
                f"space.transaction needs a PostgreSQL space; {self.scheme} has no"
                " transactions a caller can join"
            )
        with enter(connection) as conn:
            yield conn

    def _in_caller_transaction(self) -> bool:
        check = getattr(self.store, "in_caller_transaction", None)
        return bool(check is not None and check())

    def handle(self, task_id: str) -> Handle:
        """Re-attach to a task submitted anywhere; raises TaskNotFound if there is
        none (SpaceLost if the space was wiped or replaced)."""
        if not isinstance(task_id, str):
            raise TaskNotFound(str(task_id))
        if self.store.queue.state(task_id) is None:
            self.store.check_space()
            raise TaskNotFound(task_id)
        return Handle(self, task_id)

    def tasks(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[TaskRecord]:
        """One page of tasks matching every filter given, in submission order;
        pass the last id of a page as ``after`` for the next. Records carry
        no payload or result: ``handle(id).info()`` has them."""
        if state is not None and state not in TASK_STATES:
            raise ConfigError(f"unknown state {state!r}; valid: {', '.join(TASK_STATES)}")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= LIST_LIMIT_MAX
        ):
            raise ConfigError(f"limit must be an integer from 1 to {LIST_LIMIT_MAX}, got {limit!r}")
        for label, value in (("queue", queue), ("name", name), ("after", after)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
        return self.store.queue.list(state=state, queue=queue, name=name, limit=limit, after=after)

    def iter_tasks(self, **filters: Any) -> Iterator[TaskRecord]:
        """Every task matching ``filters`` (as :meth:`tasks`), page by page."""
        after = None
        while page := self.tasks(after=after, **filters):
            yield from page
            after = page[-1].id

    def stats(self) -> QueueStats:
        """Task counts by queue and state."""
        return self.store.queue.stats()

    def workers(self) -> list[dict[str, Any]]:
        """Live workers as they last registered themselves."""
        from taskspace.worker.registry import live_workers

        return live_workers(self.store)

    # -- coordination and shared state ----------------------------------------

    def lock(self, name: str, **options: Any) -> Lock:
        """A fenced distributed lock: ``with space.lock("gpu-0", ttl=10, wait=5) as
        lease``; options and guarantees as :class:`~taskspace.coordination.lock.Lock`."""
        from taskspace.coordination.lock import Lock

        return Lock(self, name, **options)

    def semaphore(self, name: str, limit: int, **options: Any) -> Semaphore:
        """At most ``limit`` holders at once across every process: ``with
        space.semaphore("openai", limit=8, ttl=30)``; see
        :class:`~taskspace.coordination.lock.Semaphore`."""
        from taskspace.coordination.lock import Semaphore

        return Semaphore(self, name, limit, **options)

    def election(self, name: str, **options: Any) -> Election:
        """Leader election with fenced terms and failover; see
        :class:`~taskspace.coordination.election.Election`."""
        from taskspace.coordination.election import Election

        return Election(self, name, **options)

    def rate_limit(self, name: str, rate: str | None = None, **options: Any) -> RateLimiter:
        """A rate limit shared by every process of the space: ``space.rate_limit(
        "openai", rate="500/m", burst=50)``; see
        :class:`~taskspace.coordination.ratelimit.RateLimiter`."""
        from taskspace.coordination.ratelimit import RateLimiter

        return RateLimiter(self, name, rate, **options)

    @overload
    def periodic(self, fn: Callable[P, R], /, **options: Any) -> Task[P, R]: ...

    @overload
    def periodic(
        self, fn: None = None, /, **options: Any
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def periodic(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Register a function as a task fired on a schedule: ``@space.periodic(
        cron="*/5 * * * *", tz="UTC")`` or ``@space.periodic(every=60)``; see
        :mod:`taskspace.coordination.periodic`."""
        from taskspace.coordination.periodic import periodic

        return periodic(self, fn, **options)

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The periodic schedules registered on this Space, by name."""
        return dict(self._schedules)

    @property
    def registry(self) -> Registry:
        """Service discovery: register, discover, watch; see
        :class:`~taskspace.coordination.registry.Registry`."""
        from taskspace.coordination.registry import Registry

        return self._facade("registry", Registry)

    @property
    def kv(self) -> KV:
        """The space's key-value blackboard (JSON values, versions, fenced
        writes); see :class:`~taskspace.state.kv.KV`."""
        from taskspace.state.kv import KV

        return self._facade("kv", KV)

    def cache(self, name: str, **options: Any) -> Cache:
        """A two-level cache (L1 in this process, L2 in the space) invalidated
        across processes: ``space.cache("embeddings", capacity=10_000,
        policy="tinylfu", ttl=3600)``; one per name per Space (asking again
        with other options is a ConfigError); see :class:`~taskspace.state.cache.Cache`."""
        from taskspace.state.cache import Cache

        return self._named_facade("cache", name, options, Cache)

    @overload
    def cached(self, fn: Callable[P, R], /, **options: Any) -> Callable[P, R]: ...

    @overload
    def cached(self, fn: None = None, /, **options: Any) -> Callable[[Callable[P, R]], Any]: ...

    def cached(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Memoize a function (or a task) across every process of the space,
        with single-flight: ``@space.cached(ttl=3600)``; see
        :mod:`taskspace.state.memo`."""
        from taskspace.state.memo import cached

        return cached(self, fn, **options)

    def stream(self, name: str, **options: Any) -> Stream:
        """A durable stream with consumer groups: ``space.stream("events").publish(obj)``,
        ``.group("indexers").consumer("c1")``; see
        :class:`~taskspace.messaging.streams.Stream`."""
        from taskspace.messaging.streams import Stream

        return Stream(self, name, **options)

    def topic(self, name: str) -> Topic:
        """Best-effort live broadcast with gaps reported: ``space.topic("chat")``;
        see :class:`~taskspace.messaging.topic.Topic`."""
        from taskspace.messaging.topic import Topic

        return Topic(self, name)

    @property
    def logs(self) -> Logs:
        """Log records shipped by workers: ``space.logs.query(task=...)``,
        ``follow()``; see :class:`~taskspace.logs.Logs`."""
        from taskspace.logs import Logs

        return self._facade("logs", Logs)

    @property
    def events(self) -> Events:
        """The task events stream (submitted, started, succeeded, ...); see
        :class:`~taskspace.events.Events`."""
        from taskspace.events import Events

        return self._facade("events", Events)

    def _named_facade(
        self, kind: str, name: str, options: dict[str, Any], cls: Callable[..., R]
    ) -> R:
        """One ``cls(self, name, **options)`` per (kind, name): asking again
        with different options is a ConfigError."""
        key = f"{kind}:{name}"
        with self._facade_lock:
            found = self._facades.get(key)
            if found is None:
                found = self._facades[key] = cls(self, name, **options)
                self._facade_options[key] = options
            elif self._facade_options[key] != options:
                raise ConfigError(
                    f"{kind} {name!r} is already open with {self._facade_options[key]!r}, "
                    f"not {options!r}"
                )
            return found

    def _facade(self, key: str, cls: Callable[[Space], R]) -> R:
        with self._facade_lock:
            if key not in self._facades:
                self._facades[key] = cls(self)
            return self._facades[key]  # type: ignore[no-any-return]

    def run_worker(self, **options: Any) -> WorkerReport:
        """Run a worker in this process until stopped (or, with ``burst=True``,
        until its queues are empty). Options as :class:`~taskspace.worker.WorkerConfig`."""
        from taskspace.worker.config import WorkerConfig
        from taskspace.worker.worker import Worker

        return Worker(self, WorkerConfig.build(**options)).run()
