"""Task: a function registered on a Space under a name, submittable from anywhere."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from taskspace.backends.base import TaskSpec
from taskspace.errors import ConfigError
from taskspace.tasks.handle import Handle
from taskspace.tasks.options import SPACE_DEFAULT, Isolation, SubmitOptions, TaskOptions

if TYPE_CHECKING:
    from taskspace.space import Space

P = ParamSpec("P")
R = TypeVar("R")


def new_task_id() -> str:
    """A fresh, globally unique task id: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function here; ``submit`` enqueues it."""

    def __init__(
        self,
        space: Space,
        fn: Callable[P, R],
        name: str,
        options: TaskOptions,
        submit_options: SubmitOptions | None = None,
    ) -> None:
        self.space = space
        self.fn = fn
        self.name = name
        self.opts = options
        self.submit_opts = submit_options or SubmitOptions()
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self.isolation: Isolation = options.isolation or (
            "async" if inspect.iscoroutinefunction(fn) else "thread"
        )

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def queue(self) -> str:
        return self.submit_opts.queue or self.opts.queue

    def options(self, **submit_options: Any) -> Task[P, R]:
        """A variant for submitting with per-call options: ``queue``, ``priority``,
        ``countdown``, ``eta``, ``dedup_key``."""
        merged = {
            k: getattr(self.submit_opts, k)
            for k in ("queue", "priority", "countdown", "eta", "dedup_key")
        }
        merged.update(submit_options)
        return Task(self.space, self.fn, self.name, self.opts, SubmitOptions.build(**merged))

    def bound_to(self, space: Space) -> Task[P, R]:
        """This task, submitting to ``space`` instead."""
        return Task(space, self.fn, self.name, self.opts, self.submit_opts)

    def spec(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TaskSpec:
        """Encode one call into a TaskSpec; raises before anything is written."""
        so = self.submit_opts
        payload = self.space.codec.encode_call(args, kwargs)
        ttl = self.opts.result_ttl
        result_ttl = self.space.result_ttl if ttl == SPACE_DEFAULT else ttl
        return TaskSpec(
            id=new_task_id(),
            name=self.name,
            payload=payload,
            codec=self.space.codec.name,
            queue=self.queue,
            priority=self.opts.priority if so.priority is None else so.priority,
            max_attempts=self.opts.max_attempts,
            lease_s=self.opts.lease,
            timeout=self.opts.timeout,
            dedup_key=so.dedup_key,
            delay=so.delay(),
            result_ttl=result_ttl,
        )

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Handle:
        """Enqueue one call; durable once this returns.

        ``connection=conn`` (a psycopg 3 connection to the space's PostgreSQL
        database; not passed on to a function that has no ``connection``
        parameter) enqueues in the caller's transaction instead: see
        :meth:`submit_in`."""
        if "connection" in kwargs and not self._takes_connection():
            connection = kwargs.pop("connection")
            return self.submit_in(connection, *args, **kwargs)
        return self.space.push([self.spec(args, kwargs)])[0]

    def _takes_connection(self) -> bool:
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False
        return "connection" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def submit_in(self, connection: Any, *args: P.args, **kwargs: P.kwargs) -> Handle:
        """Enqueue one call in the caller's open transaction on ``connection``
        (a psycopg 3 connection to the database of the space's PostgreSQL
        schema): the task exists if, and only if, the caller commits, and idle
        workers are woken at that commit. Never retried (the transaction is
        the caller's); ConfigError on a space that is not on PostgreSQL."""
        push_in = getattr(self.space.store, "push_in", None)
        if push_in is None:
            raise ConfigError(
                f"enqueueing in the caller's transaction needs a PostgreSQL space,"
                f" not {self.space.url!r}"
            )
        task_id = push_in(connection, [self.spec(args, kwargs)])[0]
        return Handle(self.space, task_id)

    def submit_many(self, calls: Iterable[Sequence[Any]]) -> list[Handle]:
        """Enqueue many calls (each a tuple of positional arguments) in one round trip.
        All are encoded before anything is written: one bad argument writes nothing.
        A large batch is written in chunks, each atomic (see :meth:`Space.push`).
        A dedup key names one task, so ``options(dedup_key=…)`` is refused here."""
        if self.submit_opts.dedup_key is not None:
            raise ConfigError(
                "submit_many with a dedup_key would collapse the whole batch into one task;"
                " submit each call with its own options(dedup_key=...) instead"
            )
        specs = []
        for i, call in enumerate(calls):
            if not isinstance(call, tuple | list):
                raise ConfigError(
                    f"submit_many item {i} must be a tuple of arguments, got {type(call).__name__}"
                )
            specs.append(self.spec(call, {}))
        return self.space.push(specs)
