"""Submitting never changes a value silently, never loses or duplicates a task
under backend errors, and refuses what it cannot store exactly."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from taskspace import (
    BackendError,
    ConfigError,
    PayloadTooLarge,
    ResultTimeout,
    SerializationError,
    Space,
    TaskFailed,
    UnknownTask,
)
from taskspace.backends.base import PRIORITY_MAX, PRIORITY_MIN, PUSH_CHUNK_TASKS, TaskSpec
from tests.services import RedisServer


def drain(space: Space) -> None:
    space.run_worker(burst=True, install_signal_handlers=False, concurrency=4)


# -- values round-trip exactly or are refused ---------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "path", "fix"),
    [
        (({"when": datetime.datetime(2026, 1, 1)},), {}, "args[0]['when']: datetime", "isoformat"),
        ((float("nan"),), {}, "args[0]: float nan", "None"),
        (([1, (2, 3)],), {}, "args[0][1]: tuple", "list"),
        (({1: "a"},), {}, "args[0][1]: non-string key", "string keys"),
        ((), {"x": {1, 2}}, "kwargs['x']: set", "convert"),
        ((float("inf"),), {}, "args[0]: float inf", "None"),
    ],
)
def test_inexact_values_are_refused_with_their_path(
    args: tuple[Any, ...], kwargs: dict[str, Any], path: str, fix: str
) -> None:
    space = Space("memory://")

    @space.task
    def echo(*a: Any, **k: Any) -> None: ...

    with pytest.raises(SerializationError) as err:
        echo.submit(*args, **kwargs)
    assert path in str(err.value) and fix in str(err.value)
    assert space.stats().total("queued") == 0


def test_exact_values_pass_unchanged(space: Space) -> None:
    @space.task
    def echo(value: Any) -> Any:
        return value

    value = {"a": [1, -2.5, None, True, "x", {"b": []}], "big": 2**62, "neg0": -0.0}
    handle = echo.submit(value)
    drain(space)
    assert handle.result(timeout=5) == value


def test_msgpack_keeps_aware_datetimes_and_refuses_naive_ones(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db", serializer="msgpack")

    @space.task
    def echo(value: Any) -> Any:
        return value

    aware = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    handle = echo.submit(aware)
    with pytest.raises(SerializationError, match="timezone-aware"):
        echo.submit(datetime.datetime(2026, 1, 1))
    drain(space)
    assert handle.result(timeout=5) == aware


def test_a_result_that_would_change_fails_the_task_naming_it(space: Space) -> None:
    @space.task(max_attempts=3)
    def when() -> Any:
        return {"at": datetime.datetime(2026, 1, 1)}

    handle = when.submit()
    drain(space)
    with pytest.raises(TaskFailed) as err:
        handle.result(timeout=5)
    assert err.value.remote_type == "SerializationError"
    assert "['at']: datetime" in err.value.remote_message
    assert handle.info().attempts == 1  # refused values are final, not retried


# -- payload limits ----------------------------------------------------------------


def test_arguments_above_max_payload_are_refused(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db", max_payload=1000)

    @space.task
    def take(blob: str) -> None: ...

    with pytest.raises(PayloadTooLarge) as err:
        take.submit("x" * 2000)
    message = str(err.value)
    assert "2,00" in message and "max_payload=1,000" in message
    assert space.stats().total("queued") == 0
    take.submit("x" * 500)


def test_a_result_above_max_payload_fails_the_task(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db", max_payload=1000)

    @space.task
    def big() -> str:
        return "y" * 5000

    handle = big.submit()
    drain(space)
    with pytest.raises(TaskFailed) as err:
        handle.result(timeout=5)
    assert err.value.remote_type == "PayloadTooLarge"


@pytest.mark.parametrize("bad", [0, -1, "16MB", True])
def test_bad_max_payload(bad: Any) -> None:
    with pytest.raises(ConfigError, match="max_payload"):
        Space("memory://", max_payload=bad)


# -- priorities -------------------------------------------------------------------


@pytest.mark.parametrize("priority", [PRIORITY_MAX + 1, PRIORITY_MIN - 1, 2**63, -(2**63)])
def test_priority_out_of_range_is_refused(priority: int) -> None:
    space = Space("memory://")

    @space.task
    def noop() -> None: ...

    with pytest.raises(ConfigError, match="1,000,000"):
        noop.options(priority=priority).submit()
    with pytest.raises(ConfigError, match="priority"):
        space.task(name="other", priority=priority)(lambda: None)


def test_extreme_priorities_keep_fifo(space: Space) -> None:
    @space.task
    def noop(i: int) -> int:
        return i

    order: list[int] = []
    for prio in (PRIORITY_MIN, PRIORITY_MAX):
        for i in range(3):
            order.append(prio)
            noop.options(priority=prio).submit(i)
    claimed = space.store.queue.claim(["default"], "w", 10)
    assert [(r.priority) for r in claimed] == [PRIORITY_MAX] * 3 + [PRIORITY_MIN] * 3
    seqs = [r.payload for r in claimed]
    assert seqs[:3] == sorted(seqs[:3]) and seqs[3:] == sorted(seqs[3:])


# -- submit under faults, batches, dedup ------------------------------------------------


class WrappedStore:
    """A store whose ``queue`` is the wrapper itself; whatever the wrapper does
    not define is the wrapped store's queue's (or, failing that, the store's)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    @property
    def queue(self) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        queue = self._store.queue
        return getattr(queue if hasattr(queue, name) else self._store, name)


class LostReplyStore(WrappedStore):
    """Wraps a store: the first ``failures`` pushes are written, then raise
    BackendError as if the reply had been lost."""

    def __init__(self, store: Any, failures: int) -> None:
        super().__init__(store)
        self.failures = failures
        self.pushes: list[int] = []

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        self.pushes.append(len(specs))
        ids = self._store.queue.push(specs)
        if self.failures:
            self.failures -= 1
            raise BackendError("connection reset (reply lost)")
        return list(ids)


def test_a_submit_whose_reply_was_lost_is_retried_without_a_duplicate(space: Space) -> None:
    @space.task
    def noop() -> None: ...

    wrapped = LostReplyStore(space.store, failures=2)
    space._store = wrapped  # type: ignore[assignment]
    handle = noop.submit()
    assert wrapped.pushes == [1, 1, 1]
    assert space.stats().total("queued") == 1
    assert handle.status() == "queued"


def test_submit_many_is_written_in_chunks(space: Space) -> None:
    @space.task
    def noop(i: int) -> int:
        return i

    wrapped = LostReplyStore(space.store, failures=0)
    space._store = wrapped  # type: ignore[assignment]
    n = PUSH_CHUNK_TASKS * 2 + 5
    handles = noop.submit_many([(i,) for i in range(n)])
    assert wrapped.pushes == [PUSH_CHUNK_TASKS, PUSH_CHUNK_TASKS, 5]
    assert len({h.id for h in handles}) == n
    assert space.stats().total("queued") == n


def test_submit_many_with_a_dedup_key_is_refused(space: Space) -> None:
    @space.task
    def noop(i: int) -> int:
        return i

    with pytest.raises(ConfigError, match="collapse"):
        noop.options(dedup_key="k").submit_many([(1,), (2,)])
    assert space.stats().total("queued") == 0


class StateOnlyStore(WrappedStore):
    """Wraps a store and fails any full read of a task."""

    def get(self, task_id: str) -> Any:
        raise AssertionError("status() must not fetch the whole task")


def test_status_reads_only_the_state(space: Space) -> None:
    @space.task
    def noop(blob: str) -> None: ...

    handle = noop.submit("z" * 100_000)
    space._store = StateOnlyStore(space.store)  # type: ignore[assignment]
    assert handle.status() == "queued"
    assert not handle.done()


def test_result_timeout_is_kept_when_the_backend_is_down() -> None:
    server = RedisServer().start()
    try:
        space = Space(server.namespaced_url())

        @space.task
        def noop() -> None: ...

        handle = noop.submit()
        server.stop()
        begun = time.monotonic()
        with pytest.raises(ResultTimeout):
            handle.result(timeout=1.5)
        assert time.monotonic() - begun < 1.5 + 1.0
    finally:
        server.close()


# -- task names ---------------------------------------------------------------


def test_get_task_accepts_an_unambiguous_short_name() -> None:
    space = Space("memory://")
    space.task(name="app.train")(lambda: None)
    space.task(name="app.evaluate")(lambda: None)
    space.task(name="other.evaluate")(lambda: None)
    assert space.get_task("train").name == "app.train"
    with pytest.raises(UnknownTask, match=r"app\.evaluate"):
        space.get_task("evaluate")
    with pytest.raises(UnknownTask):
        space.get_task("missing")


def test_a_task_in_a_script_is_named_as_the_worker_imports_it(tmp_path: Path) -> None:
    (tmp_path / "trainer.py").write_text(
        textwrap.dedent(
            """
            from taskspace import Space
            space = Space("memory://")

            @space.task
            def train():
                return 1

            if __name__ == "__main__":
                print(train.name)
            """
        )
    )
    as_script = subprocess.run(
        [sys.executable, "trainer.py"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    as_module = subprocess.run(
        [sys.executable, "-c", "import trainer; print(trainer.train.name)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert as_script.stdout.strip() == as_module.stdout.strip() == "trainer.train"


# -- listing and retrying ------------------------------------------------------


def test_tasks_pages_in_submission_order_and_filters(space: Space) -> None:
    @space.task(max_attempts=1)
    def job(i: int) -> int:
        if i % 3 == 0:
            raise ValueError(i)
        return i

    handles = job.submit_many([(i,) for i in range(10)])
    first = space.tasks(limit=4)
    second = space.tasks(limit=4, after=first[-1].id)
    assert [r.id for r in first + second] == [h.id for h in handles[:8]]
    drain(space)
    failed = space.tasks(state="failed")
    assert sorted(r.id for r in failed) == sorted(handles[i].id for i in (0, 3, 6, 9))
    assert all(r.payload == b"" for r in failed)
    assert space.tasks(name="nope") == []
    with pytest.raises(ConfigError, match="state"):
        space.tasks(state="bogus")


def test_handle_retry_requeues_a_failed_task_with_fresh_attempts(space: Space) -> None:
    calls: list[int] = []

    @space.task(max_attempts=1)
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first time")
        return "ok"

    handle = flaky.submit()
    drain(space)
    assert handle.status() == "failed"
    assert handle.retry() == "queued"
    assert handle.info().attempts == 0
    drain(space)
    assert handle.result(timeout=5) == "ok"
    with pytest.raises(ConfigError, match="succeeded"):
        handle.retry()
