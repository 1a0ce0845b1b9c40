"""The worker under injected store faults, on every backend, in this process.

The worker is given a :class:`FaultyStore`: a real store (memory, SQLite or
Redis) behind a wrapper that makes chosen calls raise (``sqlite3`` errors as
they escaped the SQLite backend, a full disk, BackendError) or stall (as a
paused worker or a slow maintenance step would). Everything else is real.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskspace import Handle, Space, Worker, WorkerConfig, current_task
from taskspace.backends.base import Store
from taskspace.errors import BackendError, SpaceLost, TaskNotFound

LOGGER = "taskspace.worker"


PROTOCOLS = ("queue", "leases", "kv", "streams", "pubsub", "clock")


class FaultyStore:
    """A real store whose chosen methods fail, stall or answer otherwise on demand;
    the rest forwards. Methods are named as the worker calls them: queue methods
    by their own name (``claim``, ``finish``), the other protocols' with their
    protocol (``kv.put``, ``kv.reap``), the store's own bare (``check_space``)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self._failures: dict[str, tuple[int, Callable[[], BaseException]]] = {}
        self._stalls: dict[str, float] = {}  # method -> stalled until (monotonic)
        self._overrides: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def fail(self, method: str, times: int, error: Callable[[], BaseException]) -> None:
        """The next ``times`` calls of ``method`` raise ``error()`` (times < 0: forever)."""
        with self._lock:
            self._failures[method] = (times, error)

    def heal(self, method: str) -> None:
        with self._lock:
            self._failures.pop(method, None)
            self._overrides.pop(method, None)

    def override(self, method: str, answer: Callable[..., Any]) -> None:
        """Calls of ``method`` return ``answer(real_method, *args, **kwargs)`` instead."""
        with self._lock:
            self._overrides[method] = answer

    def stall(self, seconds: float, *methods: str) -> None:
        """Calls of ``methods`` made in the next ``seconds`` return only after that."""
        until = time.monotonic() + seconds
        with self._lock:
            for method in methods:
                self._stalls[method] = until

    def _before(self, name: str) -> Callable[..., Any] | None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            left, error = self._failures.get(name, (0, None))
            if left > 0:
                self._failures[name] = (left - 1, error)  # type: ignore[assignment]
            elif left == 0:
                error = None
            until = self._stalls.get(name, 0.0)
            override = self._overrides.get(name)
        if until > time.monotonic():
            time.sleep(until - time.monotonic())
        if error is not None:
            raise error()
        return override

    def wrap(self, name: str, attr: Any) -> Any:
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            override = self._before(name)
            if override is not None:
                return override(attr, *args, **kwargs)
            return attr(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in PROTOCOLS:
            return FaultyProtocol(self, attr, "" if name == "queue" else name + ".")
        return self.wrap(name, attr)


class FaultyProtocol:
    """One protocol object of a FaultyStore."""

    def __init__(self, owner: FaultyStore, inner: Any, prefix: str) -> None:
        self._owner = owner
        self._inner = inner
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return self._owner.wrap(self._prefix + name, getattr(self._inner, name))


class Running:
    """A worker running in a thread of this process on a FaultyStore."""

    def __init__(self, space: Space, store: FaultyStore, **options: Any) -> None:
        options.setdefault("concurrency", 2)
        options.setdefault("maintenance_interval", 0.1)
        options.setdefault("heartbeat_interval", 0.2)
        options.setdefault("idle_wait", 0.05)
        config = WorkerConfig(install_signal_handlers=False, **options)
        self.worker = Worker(space, config, store=store)
        self.thread = threading.Thread(target=self.worker.run, name="test-worker")
        self.thread.start()

    def stop(self, grace: float = 5.0, within: float = 10.0) -> float:
        """Stop the worker; returns how long it took to exit."""
        began = time.monotonic()
        self.worker.stop(grace=grace)
        self.thread.join(within)
        assert not self.thread.is_alive(), f"worker still running {within} s after stop()"
        return time.monotonic() - began


@pytest.fixture
def faulty(space: Space) -> FaultyStore:
    return FaultyStore(space.store)


@pytest.fixture
def running(space: Space, faulty: FaultyStore) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(**options: Any) -> Running:
        run = Running(space, faulty, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.thread.is_alive():
            run.stop(grace=0.0)


def background_threads_alive() -> set[str]:
    wanted = {"taskspace-renewer", "taskspace-ticker", "taskspace-finisher", "taskspace-maintainer"}
    return {t.name for t in threading.enumerate() if t.name in wanted and t.is_alive()}


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str], list[str]]:
    """(warnings "backend unreachable", infos "reconnected after", every ERROR) of the worker."""
    mine = [r for r in caplog.records if r.name == LOGGER]
    return (
        [r.getMessage() for r in mine if "backend unreachable" in r.getMessage()],
        [r.getMessage() for r in mine if r.getMessage().startswith("reconnected after")],
        [r.getMessage() for r in mine if r.levelno >= logging.ERROR],
    )


FINISH_ERRORS: dict[str, Callable[[], BaseException]] = {
    "locked": lambda: sqlite3.OperationalError("database is locked"),
    "disk-full": lambda: sqlite3.OperationalError("database or disk is full"),
    "backend": lambda: BackendError("connection refused"),
}


# -- item 3: outcomes are never lost, threads never die ------------------------------


@pytest.mark.parametrize("error", sorted(FINISH_ERRORS))
def test_finish_errors_are_retried_until_the_outcome_is_recorded(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
    error: str,
) -> None:
    """Fails on the old worker: it caught only BackendError, so one
    ``sqlite3.OperationalError`` from ``finish`` lost the outcome (the task stayed
    running until its lease expired) and killed the finisher thread."""
    caplog.set_level(logging.INFO, LOGGER)

    @space.task(lease=5.0)
    def add(a: int, b: int) -> int:
        return a + b

    faulty.fail("finish", 5, FINISH_ERRORS[error])
    run = running()
    handle = add.submit(2, 3)
    assert handle.result(timeout=10) == 5
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0)
    assert faulty.calls["finish"] >= 6
    # The finisher is still there, and the next outcome lands at once.
    assert add.submit(1, 1).result(timeout=5) == 2
    assert background_threads_alive() == {
        "taskspace-renewer",
        "taskspace-ticker",
        "taskspace-finisher",
        "taskspace-maintainer",
    }
    run.stop()
    assert run.worker.report.succeeded == 2
    warnings, recoveries, errors = outage_lines(caplog)
    assert len(warnings) == 1, warnings  # once per outage, not once per retry
    assert len(recoveries) == 1 and recoveries[0].endswith(" s"), recoveries
    assert errors == []


def test_every_background_step_rides_out_errors(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Claim, wait, renew, maintenance, heartbeat, progress and finish each fail a few
    times with errors a driver or a bug could raise: no thread dies, nothing is lost."""
    caplog.set_level(logging.INFO, LOGGER)

    @space.task(lease=1.0)
    def step(i: int) -> int:
        current_task().progress(1, 1)
        time.sleep(0.05)
        return i

    kinds: list[Callable[[], BaseException]] = [
        lambda: sqlite3.OperationalError("database or disk is full"),
        lambda: BackendError("connection reset"),
        lambda: RuntimeError("a bug in a backend"),
    ]
    methods = ["claim", "wait_for_tasks", "renew", "requeue_expired", "promote_due",
               "reap", "kv.reap", "kv.touch", "progress", "finish"]  # fmt: skip
    for i, method in enumerate(methods):
        faulty.fail(method, 3, kinds[i % len(kinds)])
    run = running(concurrency=4)
    handles = step.submit_many([(i,) for i in range(20)])
    assert [h.result(timeout=20) for h in handles] == list(range(20))
    deadline = time.monotonic() + 10
    while not all(faulty.calls.get(m, 0) > 3 for m in methods):  # every fault was hit
        assert time.monotonic() < deadline, faulty.calls
        step.submit(-1).result(timeout=5)
    assert len(background_threads_alive()) == 4
    assert step.submit(99).result(timeout=5) == 99
    run.stop()
    assert run.worker.report.failed == 0
    _, _, errors = outage_lines(caplog)
    assert errors == []


def test_shutdown_past_grace_exits_with_the_backend_down_and_says_what_it_abandoned(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The grace is a promise: a worker whose finishes keep failing still exits
    about a second past its grace, and logs how many outcomes it left to lease expiry.

    Fails on the old worker: its finisher retried forever and shutdown joined it."""
    caplog.set_level(logging.INFO, LOGGER)
    done = threading.Event()

    @space.task(lease=5.0)
    def quick() -> str:
        done.set()
        return "ok"

    faulty.fail("finish", -1, lambda: BackendError("connection refused"))
    faulty.fail("kv.delete", -1, lambda: BackendError("connection refused"))
    run = running()
    handle = quick.submit()
    assert done.wait(10)
    took = run.stop(grace=0.5, within=10.0)
    assert took < 0.5 + 2.0, f"worker took {took:.1f} s to exit with a 0.5 s grace"
    assert run.worker.report.abandoned == 1
    assert handle.status() == "running"  # left to lease expiry: at-least-once holds
    abandoned = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(abandoned) == 1 and "1 outcome(s)" in abandoned[0], abandoned


# -- item 5: renewal has a thread of its own ---------------------------------------------


def test_a_maintenance_step_blocked_for_3x_the_lease_does_not_cost_a_lease(
    space: Space, faulty: FaultyStore, running: Callable[..., Running]
) -> None:
    """Fails on the old worker: renewal shared the ticker thread with maintenance, so
    a slow requeue stopped renewals and another worker requeued the healthy task."""
    lease = 0.5
    started = threading.Event()

    @space.task(lease=lease, max_attempts=3)
    def long_one() -> str:
        started.set()
        time.sleep(4 * lease)
        return "done"

    run = running()
    handle = long_one.submit()
    assert started.wait(10)
    faulty.stall(3 * lease, "requeue_expired", "promote_due")
    # Meanwhile another worker's maintenance (the test's own store) requeues any
    # lease that expires.
    while not handle.done():
        space.store.queue.requeue_expired()
        time.sleep(0.05)
    record = handle.info()
    assert (record.state, record.attempts, record.lost) == ("succeeded", 1, 0), record.error
    assert run.worker.report.leases_lost == 0
    run.stop()


# -- item 6: a lost lease is not a cancel -------------------------------------------------


def test_a_lost_lease_abandons_the_attempt_it_never_ends_cancelled(
    space: Space, faulty: FaultyStore, running: Callable[..., Running]
) -> None:
    """The worker's store calls stall for 3x the lease, as in a SIGSTOP, while the
    task keeps checking its flag. Renewal then reports the lease lost before anyone
    requeued the task: the attempt must be abandoned, not finished ``cancelled``.

    Fails on the old worker: the lost lease set the cancel flag, the task raised
    TaskCancelled, and the worker finished it ``cancelled`` with its still-current
    token."""
    lease = 0.5
    runs: list[int] = []

    @space.task(lease=lease, max_attempts=3, retry_backoff=0.0)
    def spinner() -> int:
        ctx = current_task()
        runs.append(ctx.attempt)
        if len(runs) > 1:
            return ctx.attempt
        while True:  # the first attempt spins until it is told to stop
            ctx.check_cancelled()
            time.sleep(0.005)

    run = running()
    handle = spinner.submit()
    deadline = time.monotonic() + 10
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs, "the task never started"
    # Renewal comes back first, maintenance (which requeues) only later.
    faulty.stall(3 * lease, "renew", "finish", "claim", "wait_for_tasks")
    faulty.stall(3 * lease + 0.5, "requeue_expired", "promote_due")
    value = handle.result(timeout=15)
    record = handle.info()
    assert record.state == "succeeded", f"ended {record.state}: {record.error}"
    assert (value, record.attempts, record.lost) == (2, 2, 1)
    assert run.worker.report.cancelled == 0
    assert run.worker.report.leases_lost == 1
    run.stop()


# -- item 8: attempts are keyed by lease ----------------------------------------------------


def test_a_task_reclaimed_by_the_same_worker_is_renewed_until_it_succeeds(
    space: Space, faulty: FaultyStore, running: Callable[..., Running]
) -> None:
    """One worker stalls past the lease while its attempt of a 3 s task runs, then
    requeues the task and claims it again itself while the old attempt still runs.

    Fails on the old worker: attempts were keyed by task id, so the old attempt's end
    removed the new one, which was never renewed; the task cascaded to ``dead``."""
    lease = 1.0
    started = threading.Event()

    @space.task(lease=lease, max_attempts=3, retry_backoff=0.0)
    def slow() -> int:
        started.set()
        time.sleep(3.0)
        return current_task().attempt

    run = running(concurrency=2)
    handle = slow.submit()
    assert started.wait(10)
    faulty.stall(2.0, "renew", "finish", "claim", "wait_for_tasks", "requeue_expired")
    value = handle.result(timeout=20)
    record = handle.info()
    assert record.state == "succeeded", f"ended {record.state}: {record.error}"
    assert (value, record.attempts, record.lost) == (2, 2, 1)
    run.stop()


# -- a wiped or replaced space (SpaceLost) -----------------------------------------------

WIPED = "wiped or replaced"


def wiped() -> BaseException:
    return SpaceLost("the space's identity record is gone (test)")


def all_lost(renew: Callable[..., Any], leases: Any) -> dict[str, str]:
    """A renew answer as from a wiped space: every lease is gone."""
    return {lease.task_id: "lost" for lease in leases}


def critical_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and WIPED in r.getMessage()]


def blocking_task(
    space: Space, n: int = 1, lease: float = 0.6
) -> tuple[Any, threading.Event, list[Any]]:
    """A task that runs until released; ``seen`` collects each attempt's context."""
    release = threading.Event()
    seen: list[Any] = []

    @space.task(name="blocker", lease=lease, max_attempts=3)
    def blocker() -> str:
        seen.append(current_task())
        release.wait(20)
        return "done"

    return blocker, release, seen


@pytest.mark.parametrize("trigger", ["renew lost", "finish refused", "any call raises"])
def test_a_wiped_space_stops_the_worker_once_and_writes_nothing_more(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
    trigger: str,
) -> None:
    """Each reply that says leases are gone (or a SpaceLost from any call) leads to
    one CRITICAL line naming the space and the tasks held, the attempts abandoned
    (never finished, never released), no more claims, and the worker's exit.

    The heartbeat is an hour apart, so only the trigger under test can find it.
    The blockers' lease (2 s) outlives the test: a renewal late under load
    must not let this worker's maintainer requeue them before the loss."""
    caplog.set_level(logging.INFO, LOGGER)
    blocker, release, seen = blocking_task(space, lease=2.0)

    @space.task(name="quick", lease=0.6)
    def quick() -> str:
        return "ok"

    run = running(concurrency=3, heartbeat_interval=3600.0)
    held = [blocker.submit(), blocker.submit()]
    deadline = time.monotonic() + 10
    while len(seen) < 2:
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.01)
    finishes_before = faulty.calls.get("finish", 0)
    faulty.fail("check_space", -1, wiped)
    if trigger == "renew lost":
        faulty.override("renew", all_lost)
    elif trigger == "finish refused":
        faulty.override("finish", lambda finish, items: [False] * len(items))
        quick.submit()  # its finish is refused
        held.append(None)  # ... and it was held too, when the reply came
    else:
        faulty.fail("wait_for_tasks", -1, wiped)
        faulty.fail("claim", -1, wiped)
        faulty.fail("renew", -1, wiped)
    run.thread.join(5.0)
    assert not run.thread.is_alive(), "the worker did not stop after its space was lost"
    report = run.worker.report
    assert report.space_lost and report.abandoned == len(held), report
    lines = critical_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.CRITICAL
    message = lines[0].getMessage()
    assert f"the space at {space.url} was wiped or replaced" in message
    assert f"{len(held)} tasks this worker held are gone" in message
    assert all(ctx.lease_lost and ctx.cancelled for ctx in seen)
    # Nothing was finished or released after the loss, nor the worker withdrawn.
    finishes = faulty.calls.get("finish", 0) - finishes_before
    assert finishes == (1 if trigger == "finish refused" else 0)
    assert report.released == 0 and faulty.calls.get("kv.delete", 0) == 0
    release.set()
    for handle in held[:2]:
        assert handle.status() == "running"  # the real store heard nothing more


def test_leases_gone_on_a_healthy_space_the_worker_carries_on(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renew that reports a lease lost and a finish refused as stale each lead to a
    space check; the space is intact, so the worker logs them as before and carries on."""
    caplog.set_level(logging.INFO, LOGGER)
    blocker, release, seen = blocking_task(space)

    @space.task(name="quick", lease=0.6)
    def quick(i: int) -> int:
        return i

    run = running(concurrency=2, heartbeat_interval=3600.0)
    handle = blocker.submit()
    deadline = time.monotonic() + 10
    while not seen:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    answered: list[int] = []

    def lost_once(renew: Callable[..., Any], leases: Any) -> Any:
        answered.append(1)
        return all_lost(renew, leases) if len(answered) == 1 else renew(leases)

    faulty.override("renew", lost_once)
    deadline = time.monotonic() + 10
    while not seen[0].lease_lost:
        assert time.monotonic() < deadline, "renew never reported the lease lost"
        time.sleep(0.01)
    checks = faulty.calls.get("check_space", 0)
    assert checks >= 1
    refused: list[Any] = []

    def refuse_once(finish: Callable[..., Any], items: Any) -> list[bool]:
        if not refused:
            refused.append(items)
            return [False] * len(items)
        return list(finish(items))

    faulty.override("finish", refuse_once)
    stale = quick.submit(1)
    deadline = time.monotonic() + 10
    while not refused:
        assert time.monotonic() < deadline, "no finish was refused"
        time.sleep(0.01)
    assert quick.submit(2).result(timeout=10) == 2  # still claiming, still finishing
    assert faulty.calls.get("check_space", 0) > checks
    assert run.thread.is_alive()
    assert critical_lines(caplog) == []
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("refused: lease" in m and stale.id in m for m in messages), messages
    assert any(f"lease of task {handle.id} lost" in m for m in messages), messages
    release.set()
    run.stop()
    assert not run.worker.report.space_lost and run.worker.report.refused == 1


def test_the_end_of_an_outage_checks_the_space(
    space: Space,
    faulty: FaultyStore,
    running: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis restarted without persistence answers again, empty: the first call
    that succeeds after an outage leads to a space check, and the worker stops."""
    caplog.set_level(logging.INFO, LOGGER)
    run = running(heartbeat_interval=3600.0)
    deadline = time.monotonic() + 10
    while faulty.calls.get("wait_for_tasks", 0) < 2:
        assert time.monotonic() < deadline, "the worker never started waiting"
        time.sleep(0.01)
    assert faulty.calls.get("check_space", 0) <= 1  # the first heartbeat's, if any
    faulty.fail("check_space", -1, wiped)
    faulty.fail("claim", 3, lambda: BackendError("connection refused"))
    faulty.fail("wait_for_tasks", 3, lambda: BackendError("connection refused"))
    run.thread.join(10.0)
    assert not run.thread.is_alive(), "the worker did not stop after reconnecting"
    assert run.worker.report.space_lost
    assert len(critical_lines(caplog)) == 1
    assert "0 tasks this worker held are gone" in critical_lines(caplog)[0].getMessage()


def test_a_handle_in_a_wiped_space_raises_space_lost(space: Space, faulty: FaultyStore) -> None:
    """A task the store does not hold is TaskNotFound on an intact space and
    SpaceLost on a wiped one, from every Handle call and from Space.handle."""

    @space.task
    def noop() -> None: ...

    handle = noop.submit()
    with pytest.raises(TaskNotFound):
        space.handle("0" * 32)
    space._store = faulty
    ghost = Handle(space, "0" * 32)
    with pytest.raises(TaskNotFound):
        ghost.status()
    faulty.fail("check_space", -1, wiped)
    assert handle.status() == "queued"  # a task that is there needs no check
    calls: list[Callable[[], Any]] = [ghost.status, ghost.info, ghost.cancel, ghost.progress,
                                      ghost.done, lambda: ghost.result(timeout=5),
                                      lambda: space.handle(ghost.id)]  # fmt: skip
    for call in calls:
        began = time.monotonic()
        with pytest.raises(SpaceLost):
            call()
        assert time.monotonic() - began < 2.0  # never waited out, never retried
