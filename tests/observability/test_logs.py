"""Log aggregation on every backend: records logged and printed inside a task
arrive with task context and are queried by task, worker, level and since;
follow sees a new record; retention by age and length holds; a handler whose
Redis is SIGKILLed buffers at most its capacity and reports what it dropped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskspace import Space, Worker, WorkerConfig, current_task
from taskspace.errors import ConfigError
from taskspace.logs import LOGS_STREAM, Handler, LogRecord, install
from taskspace.tasks.context import TaskContext, bind, unbind
from taskspace.worker import maintainer as maintainer_mod
from tests.services import RedisServer

log = logging.getLogger("obs.tasks")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def debug_level() -> Any:
    old = log.level
    log.setLevel(logging.DEBUG)
    yield
    log.setLevel(old)


def ctx_for(task_id: str, worker: str = "w-test") -> TaskContext:
    return TaskContext(task_id, "obs.fake", 3, 5, 1, worker, lambda d, t: None)


def test_task_logs_and_prints_arrive_with_context(
    space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    @space.task(name="obs.chatty")
    def chatty(n: int) -> int:
        log.info("info from task %d", n)
        log.warning("warning from task %d", n)
        try:
            raise KeyError("missing")
        except KeyError:
            log.exception("failed lookup")
        print(f"printed {n}")
        print("no newline at the end", end="")
        return n

    @space.task(name="obs.quiet")
    def quiet() -> None:
        log.debug("debug from quiet")

    before = time.time()
    h1, h2 = chatty.submit(7), quiet.submit()
    config = WorkerConfig(concurrency=2, idle_wait=0.05, install_signal_handlers=False, burst=True)
    worker = Worker(space, config)
    worker.run()  # burst: returns once drained; flushes the logs on the way out
    assert h1.result(timeout=1) == 7
    assert "printed 7" in capsys.readouterr().out  # the original stream still gets it

    mine = space.logs.query(task_id=h1.id)
    messages = [(r.logger, r.level, r.message) for r in mine]
    assert messages == [
        ("obs.tasks", "INFO", "info from task 7"),
        ("obs.tasks", "WARNING", "warning from task 7"),
        ("obs.tasks", "ERROR", "failed lookup"),
        ("task.stdout", "INFO", "printed 7"),
        ("task.stdout", "INFO", "no newline at the end"),
    ], messages
    for record in mine:
        assert (record.task, record.attempt, record.worker) == ("obs.chatty", 1, worker.name)
        assert record.host and record.time >= before - 1
    assert mine[2].exc is not None and "KeyError: 'missing'" in mine[2].exc
    assert [r.message for r in space.logs.query(task_id=h2.id)] == ["debug from quiet"]

    # filters: level, worker, since, after/limit
    errors = space.logs.query(level="error")
    assert [r.message for r in errors] == ["failed lookup"]
    assert [r.message for r in space.logs.query(task_id=h1.id, level=logging.WARNING)] == [
        "warning from task 7", "failed lookup"
    ]  # fmt: skip
    by_worker = space.logs.query(worker=worker.name)
    assert {r.task_id for r in by_worker} >= {h1.id, h2.id}
    assert space.logs.query(worker="nobody") == []
    assert space.logs.query(since=time.time() + 60) == []
    assert len(space.logs.query(since=before - 1)) == len(space.logs.query())
    page = space.logs.query(task_id=h1.id, limit=2)
    rest = space.logs.query(task_id=h1.id, after=page[-1].id)
    assert [r.id for r in page + rest] == [r.id for r in mine]
    assert set(mine[0].to_json()) == set(LogRecord.__slots__)


def test_query_refuses_bad_arguments(space: Space) -> None:
    for kwargs in ({"level": "loud"}, {"level": -1}, {"task_id": ""}, {"worker": 3},
                   {"since": "yesterday"}, {"limit": 0}, {"after": -1}):  # fmt: skip
        with pytest.raises(ConfigError):
            space.logs.query(**kwargs)
    with pytest.raises(ConfigError):
        space.logs.follow(timeout=-1)


def test_follow_gets_a_new_record(space: Space) -> None:
    handler = Handler(space, worker="w-follow", interval=0.01)
    logger = logging.getLogger("obs.follow")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("old record")
        handler.flush()
        seen: list[LogRecord] = []
        ready = threading.Event()

        def follow() -> None:
            stream = space.logs.follow(level="warning", timeout=10)
            ready.set()
            for record in stream:
                seen.append(record)
                return

        thread = threading.Thread(target=follow)
        thread.start()
        assert ready.wait(5)
        time.sleep(0.05)  # the follower takes its starting point (only new records)
        logger.info("below the level")
        logger.error("new record")
        thread.join(10)
        assert [(r.message, r.worker) for r in seen] == [("new record", "w-follow")]
        # a quiet follow ends after its timeout
        assert list(space.logs.follow(timeout=0.1)) == []
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()


def test_records_outside_tasks_and_prints_outside_tasks(
    space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = Handler(space, worker="w-out", interval=0.01)
    uninstall = install(handler, capture_print=True)
    try:
        print("not in a task")
        token = bind(ctx_for("task-1", "w-out"))
        try:
            print("in a task")
            log.warning("logged in a task")
        finally:
            unbind(token)
        log.warning("logged outside")
    finally:
        uninstall()
        handler.close()
    out = capsys.readouterr().out
    assert "not in a task" in out and "in a task" in out
    records = [(r.message, r.task_id) for r in space.logs.query(worker="w-out")]
    assert ("in a task", "task-1") in records and ("logged in a task", "task-1") in records
    assert ("logged outside", None) in records
    assert all(message != "not in a task" for message, _ in records)


def test_two_workers_in_one_process_ship_an_outside_record_once(space: Space) -> None:
    """Review F20: each worker's handler shipped every record logged outside
    a task, so two workers in one process stored it twice."""
    first = Handler(space, worker="w-one", interval=0.01)
    second = Handler(space, worker="w-two", interval=0.01)
    undo = [install(first, capture_print=False), install(second, capture_print=False)]
    try:
        log.warning("outside, with two workers")
        token = bind(ctx_for("task-2", "w-two"))
        try:
            log.warning("inside w-two's task")
        finally:
            unbind(token)
        undo.pop(0)()  # the first worker stops: the second takes over
        log.warning("outside, after the first stopped")
    finally:
        for u in undo:
            u()
        first.close()
        second.close()
    records = [(r.message, r.worker) for r in space.logs.query(limit=1000)]
    assert records.count(("outside, with two workers", "w-one")) == 1
    assert [m for m, _ in records].count("outside, with two workers") == 1
    assert [m for m, _ in records].count("inside w-two's task") == 1
    assert ("inside w-two's task", "w-two") in records
    assert ("outside, after the first stopped", "w-two") in records


def test_retention_by_length_and_age(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskspace.events.TRIM_EVERY_S", 0.0)
    handler = Handler(space, worker="w-ret", interval=0.01)
    handler.shipper.maxlen = 30
    logger = logging.getLogger("obs.retention")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(100):
            logger.warning("record %d", i)
            if i % 20 == 19:
                handler.flush()
        handler.flush()
        kept = space.logs.query()
        assert len(kept) == 30 and kept[-1].message == "record 99"
        assert kept[0].message == "record 70"
        old = space.store.streams.read(LOGS_STREAM, limit=1000)[-1].time
        wait_until(lambda: space.store.clock.wall() >= old + 1.0, 5, "the records to age")
        handler.shipper.maxlen = None  # (the age trim alone from here)
        logger.warning("fresh")
        handler.flush()
        assert maintainer_mod.trim_streams(space.store, 0.5, 0.5) == 30
        assert [r.message for r in space.logs.query()] == ["fresh"]
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()


def test_a_long_message_is_cut() -> None:
    from taskspace.logs import MAX_MESSAGE_CHARS, _payload

    payload = _payload(30, "WARNING", "x", "y" * (MAX_MESSAGE_CHARS + 10), 0.0, None, None, None)
    assert len(payload["message"]) < MAX_MESSAGE_CHARS + 40
    assert payload["message"].endswith("[10 characters cut]")


@pytest.mark.fault
def test_buffering_while_redis_is_down_drops_at_most_the_bound(tmp_path: Any) -> None:
    server = RedisServer(appendfsync="always", workdir=tmp_path).start()
    space = Space(server.namespaced_url())
    handler = Handler(space, worker="w-down", capacity=500, interval=0.02)
    logger = logging.getLogger("obs.down")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before the outage")
        handler.flush(5)
        server.kill()
        logger.warning("during 0")  # taken in a batch that keeps failing: kept
        wait_until(lambda: handler.shipper.in_flight == 1, 5, "a batch in flight")
        for i in range(1, 2000):
            logger.warning("during %d", i)
        wait_until(lambda: handler.dropped >= 1500, 5, "the buffer to fill")
        assert handler.dropped == 1500  # 2000 logged, at most 500 kept
        server.restart()
        wait_until(lambda: any("dropped" in r.message for r in space.logs.query(worker="w-down")),
                   30, "the drop report")  # fmt: skip
        handler.flush(5)
        records = space.logs.query(worker="w-down", limit=10_000)
        during = [r.message for r in records if r.message.startswith("during")]
        # The batch in flight, then the newest: the oldest waiting were dropped.
        assert during == ["during 0"] + [f"during {i}" for i in range(1501, 2000)]
        assert records[0].message == "before the outage"
        reports = [r for r in records if r.logger == "taskspace.logs"]
        assert [(r.level, r.message) for r in reports] == [
            ("WARNING", "dropped 1500 log records while the backend was unreachable")
        ]
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close(0.5)
        space.close()
        server.close()


def test_current_task_is_bound_for_logs_in_process_tasks(space: Space) -> None:
    if space.scheme == "memory":
        pytest.skip("a process task needs a store another process can reach")

    @space.task(name="obs.later")
    def later() -> None: ...

    @space.task(name="obs.in_process", isolation="process")
    def in_process() -> str:
        log.warning("from the child of %s", current_task().id)
        print("child says hi")
        current_task().record(tokens_in=5)
        return later.submit().id  # its "submitted" event is stored before the child exits

    handle = in_process.submit()
    config = WorkerConfig(concurrency=1, idle_wait=0.05, install_signal_handlers=False, burst=True)
    worker = Worker(space, config)
    worker.run()
    child_submitted = handle.result(timeout=1)
    records = [(r.logger, r.message, r.attempt) for r in space.logs.query(task_id=handle.id)]
    assert records == [
        ("obs.tasks", f"from the child of {handle.id}", 1),
        ("task.stdout", "child says hi", 1),
    ]
    events = space.events.read(limit=100)
    assert [e.usage for e in events if e.kind == "usage"] == [{"tokens_in": 5}]
    assert "submitted" in [e.kind for e in events if e.task_id == child_submitted]
