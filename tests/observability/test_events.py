"""Task events on every backend: each transition produces its event (submitted,
started, retried, failed, succeeded, cancelled, usage; lost and dead from a
SIGKILLed worker process), events are read and followed, bad usage is refused,
and the stream's retention (length and age) holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskspace import Space, Worker, WorkerConfig, current_task
from taskspace.errors import ConfigError
from taskspace.events import EVENTS_STREAM, KINDS, Shipper, TaskEvent, encode_event, event_for
from taskspace.tasks.context import TaskContext
from taskspace.worker import maintainer as maintainer_mod

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def by_task(space: Space) -> dict[str, list[TaskEvent]]:
    """Each task's events in the order of their transitions (``time``): the stream
    holds them in the order their producers appended them, and a Space's
    ``submitted`` may land after the worker's ``started`` (both ship in batches)."""
    space.events.flush()
    out: dict[str, list[TaskEvent]] = {}
    after = 0
    while page := space.events.read(after=after, limit=1000):
        for event in page:
            out.setdefault(event.task_id, []).append(event)
        after = page[-1].id
    return {task: sorted(events, key=lambda e: e.time) for task, events in out.items()}


@pytest.fixture
def worker(space: Space) -> Iterator[Callable[..., Worker]]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start(**options: Any) -> Worker:
        config = WorkerConfig(concurrency=4, maintenance_interval=0.1, idle_wait=0.05,
                              install_signal_handlers=False, **options)  # fmt: skip
        w = Worker(space, config)
        thread = threading.Thread(target=w.run)
        thread.start()
        started.append((w, thread))
        return w

    yield start
    for w, thread in started:
        w.stop(grace=0.0)
        thread.join(10)


def test_every_transition_has_its_event(space: Space, worker: Callable[..., Worker]) -> None:
    running = threading.Event()

    @space.task
    def ok(x: int) -> int:
        current_task().record(tokens_in=12, tokens_out=3, cost_usd=0.002, model="m-1")
        current_task().record(tokens_in=1)
        return x * 2

    @space.task(max_attempts=2, retry_backoff=0.01, retry_jitter=False)
    def flaky() -> None:
        raise ValueError("always")

    @space.task(lease=5.0)
    def long() -> str:
        running.set()
        while not current_task().cancelled:
            time.sleep(0.01)
        current_task().check_cancelled()
        return "not cancelled"

    h_ok, h_flaky, h_long = ok.submit(21), flaky.submit(), long.submit()
    w = worker()
    assert h_ok.result(timeout=10) == 42
    assert running.wait(10)
    h_long.cancel()
    wait_until(lambda: h_long.status() == "cancelled", 10, "the cancel")
    wait_until(lambda: h_flaky.status() == "failed", 10, "flaky to fail")
    w.events.flush(5)
    events = by_task(space)

    ok_events = events[h_ok.id]
    assert [e.kind for e in ok_events if e.kind != "usage"] == ["submitted", "started",
                                                                 "succeeded"]  # fmt: skip
    usage = [e.usage for e in ok_events if e.kind == "usage"]
    assert usage == [{"tokens_in": 12, "tokens_out": 3, "cost_usd": 0.002, "model": "m-1"},
                     {"tokens_in": 1}]  # fmt: skip
    done = ok_events[-1]
    assert done.worker == w.name and done.attempt == 1 and done.name == ok.name
    assert done.queue == "default" and done.duration is not None and done.duration >= 0
    assert ok_events[0].worker is None and ok_events[0].attempt == 0

    flaky_events = [(e.kind, e.attempt, e.error) for e in events[h_flaky.id]]
    assert flaky_events == [
        ("submitted", 0, None),
        ("started", 1, None),
        ("retried", 1, "ValueError"),
        ("started", 2, None),
        ("failed", 2, "ValueError"),
    ]
    long_kinds = [e.kind for e in events[h_long.id]]
    assert long_kinds == ["submitted", "started", "cancelled"]
    assert events[h_long.id][-1].error == "TaskCancelled"

    # ids are stream ids (a stored batch shares one) and to_json carries every field
    ids = [e.id for e in space.events.read(limit=1000)]
    assert ids == sorted(ids) and all(i > 0 for i in ids) and len(ids) == 13
    assert set(done.to_json()) == {f for f in TaskEvent.__slots__}


def test_read_waits_and_follow_sees_new_events(space: Space) -> None:
    @space.task
    def noop() -> None: ...

    noop.submit()
    space.events.flush()
    first = space.events.read()
    assert [e.kind for e in first] == ["submitted"]
    last = space.events.last_id()
    assert last == first[-1].id
    assert space.events.read(after=last, wait=0.05) == []

    seen: list[TaskEvent] = []

    def follow() -> None:
        for event in space.events.follow():
            seen.append(event)
            return

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.05)  # let the follower take its starting point (only new events)
    handle = noop.submit()
    thread.join(10)
    assert [(e.kind, e.task_id) for e in seen] == [("submitted", handle.id)]


def test_a_batch_is_one_entry_and_never_split(space: Space) -> None:
    @space.task
    def noop(i: int) -> None: ...

    handles = noop.submit_many([(i,) for i in range(30)])
    space.events.flush()
    assert len(space.store.streams.read(EVENTS_STREAM, limit=100)) == 1  # one entry per batch
    events = space.events.read(limit=1)  # a batch is never split
    assert [e.task_id for e in events] == [h.id for h in handles]
    assert len({e.id for e in events}) == 1
    assert space.events.read(after=events[0].id) == []
    assert space.events.last_id() == events[0].id


def test_lost_tracker_names_the_expired_attempts(space: Space) -> None:
    """The maintainer's requeue step: attempts known from their started events."""

    @space.task(lease=0.2, max_attempts=2)
    def fragile() -> None: ...

    @space.task(lease=30.0)
    def healthy() -> None: ...

    h_lost = fragile.submit()
    healthy.submit()
    store = space.store
    claimed = store.queue.claim(["default"], "w-dead", 2)
    assert len(claimed) == 2
    space.events.emit([event_for("started", r, "w-dead") for r in claimed])
    space.events.flush()
    tracker = maintainer_mod.LostTracker()
    got: list[TaskEvent] = []
    expiry = {r.id: r.lease_expires for r in claimed}[h_lost.id]
    assert expiry is not None
    wait_until(lambda: store.clock.now() > expiry, 5, "the lease to expire")
    assert maintainer_mod.requeue_expired(store, got.extend, tracker) == 1
    assert [(e.kind, e.task_id, e.worker, e.attempt, e.error) for e in got] == [
        ("lost", h_lost.id, "w-dead", 1, "LeaseExpired")
    ]  # fmt: skip
    assert maintainer_mod.requeue_expired(store, got.extend, tracker) == 0
    assert len(got) == 1  # once


def test_a_queued_task_cancelled_has_its_event_once(space: Space) -> None:
    @space.task
    def never() -> None: ...

    handle = never.submit()
    assert handle.cancel() == "cancelled"
    assert handle.cancel() == "cancelled"  # a repeated cancel changes nothing: no event
    events = by_task(space)[handle.id]
    assert [(e.kind, e.name, e.error) for e in events] == [
        ("submitted", never.name, None), ("cancelled", never.name, "TaskCancelled")
    ]  # fmt: skip


def test_a_retry_by_hand_has_its_requeued_event_once(space: Space) -> None:
    @space.task(max_attempts=1)
    def boom() -> None:
        raise ValueError("no")

    handle = boom.submit()
    space.run_worker(burst=True)
    assert handle.status() == "failed"
    assert handle.retry() == "queued"
    with pytest.raises(ConfigError, match="only failed or dead"):
        handle.retry()  # queued now: refused, no event
    kinds = [(e.kind, e.attempt, e.worker) for e in by_task(space)[handle.id]]
    assert kinds[-1] == ("requeued", 0, None)
    assert [k for k, _, _ in kinds].count("requeued") == 1


def test_bad_usage_is_refused_and_records_nothing() -> None:
    got: list[dict[str, Any]] = []
    ctx = TaskContext("t", "n", 1, 1, 1, "w", lambda d, t: None, _usage=got.append)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tokens_in": -1}, "tokens_in"),
        ({"tokens_out": 1.5}, "tokens_out"),
        ({"tokens_in": True}, "tokens_in"),
        ({"cost_usd": float("nan")}, "cost_usd"),
        ({"cost_usd": "1"}, "cost_usd"),
        ({"model": ""}, "model"),
        ({}, "at least one"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ConfigError, match=name):
            ctx.record(**kwargs)
    assert got == []
    ctx.record(tokens_out=0, model="x")
    assert got == [{"tokens_out": 0, "model": "x"}]


def test_read_refuses_bad_arguments(space: Space) -> None:
    for kwargs in ({"after": -1}, {"limit": 0}, {"limit": 10_001}, {"wait": -1}, {"after": 1.5}):
        with pytest.raises(ConfigError):
            space.events.read(**kwargs)
    assert KINDS[-1] == "usage" and EVENTS_STREAM == "taskspace/events"


def test_retention_by_length_and_age(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("taskspace.events.TRIM_EVERY_S", 0.0)
    store = space.store
    shipper: Shipper[TaskEvent] = Shipper(lambda: store, EVENTS_STREAM, encode_event, maxlen=50,
                                          batch_max=20)  # fmt: skip
    event = TaskEvent(0, time.time(), "submitted", "t", "n", "q", None, 0)
    for _ in range(10):
        shipper.put_many([event] * 20)
        assert shipper.flush(5)
    shipper.close()
    kept = store.streams.read(EVENTS_STREAM, limit=1000)
    assert len(kept) == 50  # trimmed on every append here (TRIM_EVERY_S = 0)

    # by age: what the maintainer's trim step drops
    old_time = kept[-1].time
    wait_until(lambda: store.clock.wall() >= old_time + 1.0, 5, "the entries to age")
    fresh = store.streams.append(EVENTS_STREAM, encode_event(event))
    dropped = maintainer_mod.trim_streams(store, events_max_age=0.5, logs_max_age=0.5)
    assert dropped == 50
    assert [e.id for e in store.streams.read(EVENTS_STREAM)] == [fresh]


def test_a_full_buffer_drops_the_oldest_and_counts() -> None:
    """A shipper whose backend fails keeps at most ``capacity`` items."""

    def broken() -> Any:
        raise OSError("backend unreachable")

    shipper: Shipper[int] = Shipper(broken, "x", lambda i: b"%d" % i, maxlen=None, capacity=10,
                                    interval=0.01)  # fmt: skip
    shipper.put_many(range(25))
    assert shipper.pending() <= 10
    assert shipper.dropped == 15
    assert shipper.close(0.05) <= 10


# -- lost and dead: a worker process SIGKILLed while it runs tasks ---------------------------


def make_app() -> Space:
    """The app of the killed worker process (``tests.observability.test_events:make_app``)."""
    space = Space(os.environ["OBS_URL"])
    marker = Path(os.environ["OBS_DIR"])

    @space.task(name="obs.hang_once", lease=2.0, max_attempts=2)
    def hang_once() -> str:
        if current_task().attempt == 1:
            (marker / "hang_once").touch()
            time.sleep(60)
        return "second attempt"

    @space.task(name="obs.hang_dead", lease=2.0, max_attempts=1)
    def hang_dead() -> str:
        (marker / "hang_dead").touch()
        time.sleep(60)
        return "never"

    return space


@pytest.mark.fault
def test_a_killed_worker_leaves_lost_and_dead_events(
    backend: str, space: Space, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "memory":
        pytest.skip("memory:// is one process")
    monkeypatch.setenv("OBS_URL", space.url)
    monkeypatch.setenv("OBS_DIR", str(tmp_path))
    app = make_app()
    h_once = app.submit("obs.hang_once")
    h_dead = app.submit("obs.hang_dead")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    errors = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskspace", "worker", "tests.observability.test_events:make_app",
         "--concurrency", "2", "--maintainer-ttl", "1", "--maintainer-retry", "1",
         "--log-level", "warning"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors,
    )  # fmt: skip
    errors.close()
    try:
        wait_until(lambda: (tmp_path / "hang_once").exists() and (tmp_path / "hang_dead").exists(),
                   20, "both tasks to start in the worker process")  # fmt: skip
        # The "started" events (the maintainer's source for lost events) are stored.
        wait_until(lambda: sum(e.kind == "started" for e in space.events.read()) == 2,
                   10, "the started events")  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        report = app.run_worker(burst=True, concurrency=2, maintainer_ttl=1, maintainer_retry=1,
                                maintenance_interval=0.1, idle_wait=0.05,
                                install_signal_handlers=False)  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        app.close()
    events = by_task(space)
    states = [space.handle(h.id).status() for h in (h_once, h_dead)]
    assert report.succeeded == 1, (report, states, events)
    assert space.handle(h_once.id).result(timeout=5) == "second attempt"
    assert space.handle(h_dead.id).status() == "dead"
    events = by_task(space)
    once = [(e.kind, e.attempt) for e in events[h_once.id]]
    assert once == [("submitted", 0), ("started", 1), ("lost", 1), ("started", 2),
                    ("succeeded", 2)]  # fmt: skip
    lost = events[h_once.id][2]
    assert lost.worker == events[h_once.id][1].worker != report.name
    assert lost.error == "LeaseExpired"
    assert [(e.kind, e.attempt) for e in events[h_dead.id]] == [
        ("submitted", 0), ("started", 1), ("dead", 1)
    ]  # fmt: skip
