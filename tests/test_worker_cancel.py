"""Cancel that stops: what a cancel request does to a running attempt, per isolation.

- thread: Python cannot stop a thread; the task sees ``current_task().cancelled``.
- async: the coroutine is cancelled on the worker's event loop.
- process: the child gets SIGTERM; with ``terminate=True`` it gets SIGKILL.

Each ends ``cancelled``. Cancels are asked through the store (``cancel(task_id,
terminate=)``) as ``Handle.cancel`` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskspace import Space, TaskCancelled, Worker, WorkerConfig, current_task


@pytest.fixture
def worker(space: Space) -> Iterator[Callable[[], Worker]]:
    started: list[tuple[Worker, threading.Thread]] = []

    def start() -> Worker:
        config = WorkerConfig(
            concurrency=2, maintenance_interval=0.1, idle_wait=0.05, install_signal_handlers=False
        )
        w = Worker(space, config)
        thread = threading.Thread(target=w.run)
        thread.start()
        started.append((w, thread))
        return w

    yield start
    for w, thread in started:
        w.stop(grace=0.0)
        thread.join(10)


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.01)
    return path.read_text()


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def assert_cancelled(space: Space, task_id: str, within: float = 5.0) -> None:
    handle = space.handle(task_id)
    with pytest.raises(TaskCancelled):
        handle.result(timeout=within)
    assert handle.status() == "cancelled"


def test_thread_task_sees_only_the_cooperative_flag(
    space: Space, worker: Callable[[], Worker]
) -> None:
    seen = threading.Event()
    started = threading.Event()

    @space.task(lease=0.6)
    def polite() -> str:
        ctx = current_task()
        started.set()
        while not ctx.cancelled:
            time.sleep(0.01)
        assert ctx.cancel_requested and not ctx.lease_lost
        seen.set()
        ctx.check_cancelled()
        return "not reached"

    w = worker()
    handle = polite.submit()
    assert started.wait(10)
    assert space.store.queue.cancel(handle.id) == "running"
    assert seen.wait(5)
    assert_cancelled(space, handle.id)
    deadline = time.monotonic() + 5  # the report counts it once the finish returns
    while w.report.cancelled != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.report.cancelled == 1


def test_async_task_is_cancelled_on_its_event_loop(
    space: Space, worker: Callable[[], Worker]
) -> None:
    """Fails on the old worker: an async task only got the flag; one awaiting I/O
    ran on until its timeout."""
    started = threading.Event()
    cancelled = threading.Event()

    @space.task(lease=0.6)
    async def waits() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "not reached"

    worker()
    handle = waits.submit()
    assert started.wait(10)
    began = time.monotonic()
    assert space.store.queue.cancel(handle.id) == "running"
    assert cancelled.wait(5), "the coroutine was never cancelled"
    assert_cancelled(space, handle.id)
    assert time.monotonic() - began < 5


def test_process_task_gets_sigterm_on_cancel(
    space: Space, worker: Callable[[], Worker], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"

    @space.task(lease=0.6, isolation="process")
    def sleeper(path: str) -> str:
        def on_term(signum: int, frame: object) -> None:
            Path(path + ".term").write_text("1")
            os._exit(1)

        signal.signal(signal.SIGTERM, on_term)
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)
        return "not reached"

    worker()
    handle = sleeper.submit(str(pid_file))
    child = int(wait_for_file(pid_file))
    assert space.store.queue.cancel(handle.id) == "running"
    assert_cancelled(space, handle.id)
    assert Path(str(pid_file) + ".term").exists(), "the child never got SIGTERM"
    assert gone(child)


def test_process_task_ignoring_sigterm_is_killed_by_a_terminate_cancel(
    space: Space, worker: Callable[[], Worker], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"

    @space.task(lease=0.6, isolation="process")
    def stubborn(path: str) -> str:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)
        return "not reached"

    worker()
    handle = stubborn.submit(str(pid_file))
    child = int(wait_for_file(pid_file))
    assert space.store.queue.cancel(handle.id) == "running"
    time.sleep(1.0)  # a few renewals: SIGTERM was sent and ignored
    assert handle.status() == "running"
    assert not gone(child, timeout=0.1)
    assert space.store.queue.cancel(handle.id, terminate=True) == "running"
    assert_cancelled(space, handle.id)
    assert gone(child)
