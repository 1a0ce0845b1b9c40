"""Every public entry point refuses bad input with one clear error and writes nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import taskspace
from taskspace import (
    ConfigError,
    InvalidURL,
    MissingDependency,
    NoCurrentTask,
    SerializationError,
    Space,
    TaskFailed,
    TaskNotFound,
    TaskspaceError,
    UnknownTask,
    current_task,
)


def nothing_written(space: Space) -> bool:
    return not space.stats().counts


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "malformed backend URL"),
        ("not a url", "malformed backend URL"),
        ("ftp://host/x", "unsupported backend 'ftp'"),
        ("sqlite://relative.db", "malformed SQLite URL"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///x.db?journal=wal", "unknown SQLite option(s) journal"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous='sometimes'"),
        ("sqlite:///x.db?busy_timeout=-1", "busy_timeout='-1'"),
        ("memory://?x=1", "memory:// takes no options"),
    ],
)
def test_malformed_urls(url: str, fragment: str) -> None:
    with pytest.raises(InvalidURL) as info:
        Space(url)
    assert fragment in str(info.value)
    assert isinstance(info.value, TaskspaceError | ValueError)


def test_valid_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Space("sqlite:///rel/space.db").stats()
    assert (tmp_path / "rel" / "space.db").exists()
    Space(f"sqlite:///{tmp_path}/abs.db?synchronous=full&busy_timeout=5").stats()
    assert (tmp_path / "abs.db").exists()


def test_default_url_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKSPACE_URL", raising=False)
    assert Space().url == "sqlite:///.taskspace/space.db"
    monkeypatch.setenv("TASKSPACE_URL", "memory://")
    assert Space().url == "memory://"


def test_unknown_serializer() -> None:
    with pytest.raises(ConfigError, match="unknown serializer 'yaml'; valid: json, msgpack"):
        Space("memory://", serializer="yaml")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"retries": 3}, "unknown task option(s) retries"),
        ({"timeout": -1}, "timeout=-1: must be a number of seconds from 0.001"),
        ({"timeout": 0}, "timeout=0: must be a number of seconds from 0.001"),
        ({"timeout": math.inf}, "timeout=inf: must be a number of seconds"),
        ({"lease": 0}, "lease=0: must be a number of seconds from 0.001"),
        ({"max_attempts": 0}, "max_attempts must be an integer >= 1"),
        ({"max_attempts": 1.5}, "max_attempts must be an integer >= 1"),
        ({"priority": "high"}, "priority must be an integer"),
        ({"queue": ""}, "queue must be a non-empty name"),
        ({"queue": "a,b"}, "queue must be a non-empty name"),
        ({"isolation": "gpu"}, "isolation must be one of thread, async, process"),
        ({"retry_backoff": -2}, "retry_backoff=-2: must be a number of seconds from 0"),
    ],
)
def test_bad_task_options(options: dict[str, Any], fragment: str) -> None:
    space = Space("memory://")
    with pytest.raises(ConfigError) as info:
        space.task(**options)(lambda: None)
    assert fragment in str(info.value)
    assert space.task_names == []


def test_task_name_clash() -> None:
    space = Space("memory://")
    space.task(name="job")(lambda: 1)
    with pytest.raises(ConfigError, match="already registered as 'job'"):
        space.task(name="job")(lambda: 2)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"countdown": -1}, "countdown=-1: must be a number of seconds from 0"),
        ({"countdown": 1, "eta": 5.0}, "give countdown or eta, not both"),
        ({"eta": "tomorrow"}, "eta must be a datetime or a Unix timestamp"),
        ({"dedup_key": ""}, "dedup_key must be a non-empty string"),
        ({"priority": 1.5}, "priority must be an integer"),
        ({"when": 3}, "unknown submit option(s) when"),
    ],
)
def test_bad_submit_options(options: dict[str, Any], fragment: str) -> None:
    space = Space("memory://")
    task = space.task(lambda: None)
    with pytest.raises(ConfigError) as info:
        task.options(**options).submit()
    assert fragment in str(info.value)
    assert nothing_written(space)


def test_unserialisable_argument_writes_nothing(space: Space) -> None:
    @space.task
    def consume(x: Any) -> None: ...

    with pytest.raises(SerializationError, match="cannot encode") as info:
        consume.submit({1, 2})
    assert isinstance(info.value, TypeError)
    with pytest.raises(SerializationError):
        consume.submit_many([(1,), (2,), (object(),)])
    with pytest.raises(ConfigError, match="submit_many item 1 must be a tuple"):
        consume.submit_many([(1,), 2])  # type: ignore[list-item]
    assert nothing_written(space)


def test_unknown_task_name_refused(space: Space) -> None:
    @space.task(name="known")
    def known() -> None: ...

    with pytest.raises(UnknownTask, match=r"unknown task 'os\.system'; registered: known"):
        space.submit("os.system", "rm -rf /")
    assert nothing_written(space)


def test_unknown_task_id(space: Space) -> None:
    with pytest.raises(TaskNotFound, match="no task with id 'nope'"):
        space.handle("nope")


def test_result_timeout_argument(space: Space) -> None:
    handle = space.task(lambda: None).submit()
    with pytest.raises(ConfigError, match="timeout must be a number >= 0"):
        handle.result(timeout=-1)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"queues": ""}, "queues must be a non-empty list"),
        ({"queues": "a b"}, "queue must be a non-empty name"),
        ({"idle_wait": 0}, "idle_wait must be a positive number"),
        ({"prefetch": 3}, "unknown worker option(s) prefetch"),
    ],
)
def test_bad_worker_options(options: dict[str, Any], fragment: str) -> None:
    space = Space("memory://")
    with pytest.raises(ConfigError) as info:
        space.run_worker(burst=True, **options)
    assert fragment in str(info.value)


def test_current_task_outside_a_task() -> None:
    with pytest.raises(NoCurrentTask, match="outside a task"):
        current_task()


def test_pickle_payload_refused_by_worker_that_did_not_opt_in(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/space.db"
    producer = Space(url, serializer="pickle")

    @producer.task(name="p")
    def p(x: Any) -> Any:
        return x

    handle = producer.submit("p", {1, 2})  # a set: only pickle can carry it
    consumer = Space(url)
    consumer.task(name="p")(p.fn)
    consumer.run_worker(burst=True, install_signal_handlers=False)
    with pytest.raises(TaskFailed, match="refusing a pickle payload"):
        handle.result(timeout=5)


def test_msgpack_serializer_round_trip(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/space.db", serializer="msgpack")

    @space.task
    def blob(data: bytes) -> bytes:
        return data[::-1]

    handle = blob.submit(b"\x00\x01\x02")
    space.run_worker(burst=True, install_signal_handlers=False)
    assert handle.result(timeout=5) == b"\x02\x01\x00"


def test_public_api_is_exactly_this() -> None:
    assert sorted(taskspace.__all__) == sorted(
        [
            "BackendError", "CachedError", "Compacted", "ConfigError", "Handle", "InvalidURL",
            "LeaseLost", "LockTimeout", "ManualClock", "MissingDependency", "NoCurrentTask",
            "NotAnInteger",
            "PayloadTooLarge", "ProcessDied", "RateLimited", "ResultTimeout", "Retry",
            "SerializationError", "Space", "SpaceLost", "SpaceNotFound", "SubscriptionLost",
            "Task", "TaskCancelled", "TaskContext", "TaskFailed", "TaskNotFound", "TaskRecord",
            "TaskTimeout", "TaskspaceError", "UnknownTask", "UpdateTimeout", "VersionConflict",
            "Worker", "WorkerConfig", "WorkerReport", "__version__", "current_task",
        ]
    )  # fmt: skip
    for name in taskspace.__all__:
        assert getattr(taskspace, name) is not None


def test_every_error_is_under_the_root() -> None:
    from taskspace import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__ == errors.__name__
        ):
            assert issubclass(obj, TaskspaceError) or obj is errors.Retry, name


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://127.0.0.1:notaport/0", "malformed port"),
        ("redis://127.0.0.1:6379/zero", "Redis database must be a number"),
        ("redis:///0", "names no host"),
        ("redis://127.0.0.1:6379/0?namespace=a{b}", "namespace must be a non-empty"),
    ],
)
def test_malformed_redis_urls(url: str, fragment: str) -> None:
    with pytest.raises(InvalidURL) as info:
        Space(url).stats()
    assert fragment in str(info.value)


def test_namespace_only_for_redis() -> None:
    with pytest.raises(InvalidURL, match="namespace applies to Redis and PostgreSQL spaces only"):
        Space("memory://", namespace="x").stats()


def test_missing_redis_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # as if redis-py were not installed
    with pytest.raises(MissingDependency, match=r"pip install 'taskspace\[redis\]'"):
        Space("redis://127.0.0.1:6379/0").stats()


def test_backend_errors_never_show_a_password() -> None:
    from taskspace.backends import open_store

    with pytest.raises(taskspace.BackendError) as caught:
        open_store("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(caught.value)
    assert ":***@127.0.0.1:1" in str(caught.value)
