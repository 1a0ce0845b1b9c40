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

from taskspace import Space, Worker, WorkerConfig, current_task
from taskspace.backends.base import Store
from taskspace.errors import BackendError

LOGGER = "taskspace.worker"


class FaultyStore:
    """A real store whose chosen methods fail or stall on demand; the rest forwards."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self._failures: dict[str, tuple[int, Callable[[], BaseException]]] = {}
        self._stalls: dict[str, float] = {}  # method -> stalled until (monotonic)
        self._lock = threading.Lock()

    def fail(self, method: str, times: int, error: Callable[[], BaseException]) -> None:
        """The next ``times`` calls of ``method`` raise ``error()`` (times < 0: forever)."""
        with self._lock:
            self._failures[method] = (times, error)

    def heal(self, method: str) -> None:
        with self._lock:
            self._failures.pop(method, None)

    def stall(self, seconds: float, *methods: str) -> None:
        """Calls of ``methods`` made in the next ``seconds`` return only after that."""
        until = time.monotonic() + seconds
        with self._lock:
            for method in methods:
                self._stalls[method] = until

    def _before(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            left, error = self._failures.get(name, (0, None))
            if left > 0:
                self._failures[name] = (left - 1, error)  # type: ignore[assignment]
            elif left == 0:
                error = None
            until = self._stalls.get(name, 0.0)
        if until > time.monotonic():
            time.sleep(until - time.monotonic())
        if error is not None:
            raise error()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._before(name)
            return attr(*args, **kwargs)

        return call


class Running:
    """A worker running in a thread of this process on a FaultyStore."""

    def __init__(self, space: Space, store: FaultyStore, **options: Any) -> None:
        options.setdefault("concurrency", 2)
        options.setdefault("maintenance_interval", 0.1)
        options.setdefault("heartbeat_interval", 0.2)
        options.setdefault("idle_wait", 0.05)
        config = WorkerConfig(install_signal_handlers=False, **options)
        self.worker = Worker(space, config, store=store)  # type: ignore[arg-type]
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
    wanted = {"taskspace-renewer", "taskspace-ticker", "taskspace-finisher"}
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
               "kv_put", "progress", "finish"]  # fmt: skip
    for i, method in enumerate(methods):
        faulty.fail(method, 3, kinds[i % len(kinds)])
    run = running(concurrency=4)
    handles = step.submit_many([(i,) for i in range(20)])
    assert [h.result(timeout=20) for h in handles] == list(range(20))
    deadline = time.monotonic() + 10
    while not all(faulty.calls.get(m, 0) > 3 for m in methods):  # every fault was hit
        assert time.monotonic() < deadline, faulty.calls
        step.submit(-1).result(timeout=5)
    assert len(background_threads_alive()) == 3
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
    faulty.fail("kv_delete", -1, lambda: BackendError("connection refused"))
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
