"""The worker: claims tasks in batches, runs them, renews and finishes in batches.

Guarantees (at-least-once):

- A claimed task is leased. A ticker thread renews every running lease in
  one store call at a third of the shortest lease. If the worker dies or is
  paused past the lease, the store requeues the task (any worker's
  maintenance does it) and a later ``finish`` from this worker is refused.
- A finished attempt is reported by a finisher thread that batches every
  outcome available into one ``finish`` call; a backend outage is retried
  with backoff, never dropped (until the process itself dies, in which case
  the lease expires and the task runs again).
- SIGTERM (or :meth:`Worker.stop`) stops claiming, releases attempts that
  never started at once, waits ``shutdown_grace`` seconds for running ones,
  then releases those too. A released task goes back to its queue without
  spending an attempt.

Maintenance (requeue expired leases, promote due tasks) runs in every
worker; each step is one atomic store operation, so concurrent runs are safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from taskspace.backends.base import Lease, Outcome, TaskRecord
from taskspace.errors import BackendError
from taskspace.tasks.context import TaskContext
from taskspace.worker import execution as ex
from taskspace.worker.config import WorkerConfig
from taskspace.worker.execution import Attempt
from taskspace.worker.registry import announce, withdraw
from taskspace.worker.threads import DaemonThreadPool

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.worker")
T = TypeVar("T")

TICK_S = 0.05
FINISH_BATCH_MAX = 1000
CLAIM_GATHER_S = 0.002
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 5.0


@dataclass
class WorkerReport:
    """What one worker did: outcomes accepted by the store, and refusals."""

    name: str
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    released: int = 0
    refused: int = 0
    leases_lost: int = 0
    wedged: bool = False

    def count(self, outcome: Outcome, accepted: bool) -> None:
        """Tally one finish result."""
        if not accepted:
            self.refused += 1
            return
        field = {"retry": "retried", "release": "released"}.get(outcome.kind, outcome.kind)
        setattr(self, field, getattr(self, field) + 1)


class Worker:
    """Runs tasks of one Space from a set of queues (see the module docstring)."""

    def __init__(self, space: Space, config: WorkerConfig | None = None) -> None:
        self.space = space
        self.config = config or WorkerConfig()
        self.name = self.config.name
        self.store = space.store
        self.report = WorkerReport(self.name)
        self._running: dict[str, Attempt] = {}
        self._cond = threading.Condition()
        self._finished: queue.SimpleQueue[tuple[Lease, Outcome] | None] = queue.SimpleQueue()
        self._flushing = threading.Lock()
        self._reporting = 0  # outcomes settled but not yet finished or queued
        self._stopping = threading.Event()
        self._ticker_stop = threading.Event()
        self._grace = self.config.shutdown_grace
        self._pool = DaemonThreadPool("taskspace-task")
        # Threads still running an attempt the worker gave up on (timeout): they
        # hold real resources, so they count against concurrency until they return.
        self._zombies = 0
        self._batch_min = max(1, self.config.concurrency // 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._started_wall = time.time()

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> WorkerReport:
        """Work until stopped (or drained, in burst mode); return what was done."""
        restore = self._install_signal_handlers()
        self._retrying(self._heartbeat, attempts=1)
        finisher = threading.Thread(target=self._finish_loop, name="taskspace-finisher")
        ticker = threading.Thread(target=self._tick_loop, name="taskspace-ticker", daemon=True)
        finisher.start()
        ticker.start()
        log.info("worker %s started on queues %s", self.name, ",".join(self.config.queues))
        try:
            self._claim_loop()
        finally:
            self._shutdown(finisher, ticker)
            restore()
        log.info("worker %s stopped: %s", self.name, self.report)
        return self.report

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; running tasks get ``grace`` seconds (default: the config's)."""
        if grace is not None:
            self._grace = grace
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _install_signal_handlers(self) -> Callable[[], None]:
        if not self.config.install_signal_handlers or (
            threading.current_thread() is not threading.main_thread()
        ):
            return lambda: None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            already = self._stopping.is_set()
            log.warning("worker %s got signal %d: shutting down", self.name, signum)
            self.stop(0.0 if already else None)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _shutdown(self, finisher: threading.Thread, ticker: threading.Thread) -> None:
        self._stopping.set()
        for attempt in self._snapshot():
            if not attempt.started:
                self._settle(attempt, Outcome("release"))
        begun = time.monotonic()
        with self._cond:
            # Re-read the grace on every pass: a second signal cuts it to zero.
            while self._running and time.monotonic() < begun + self._grace:
                self._cond.wait(min(0.1, max(0.0, begun + self._grace - time.monotonic())))
        for attempt in self._snapshot():
            attempt.ctx.cancel()
            ex.kill_process(attempt)
            self._settle(attempt, Outcome("release"))
        with self._cond:
            # An outcome being finished in a task thread must land (or be queued for
            # the finisher) before the finisher is told to stop.
            while self._reporting:
                self._cond.wait(0.1)
        self._finished.put(None)
        finisher.join()
        self._ticker_stop.set()
        ticker.join(timeout=5)
        self._retrying(lambda: withdraw(self.store, self.name), attempts=3)
        self._pool.shutdown()
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            if not self._loop.is_running():
                self._loop.close()

    # -- claiming and dispatch ----------------------------------------------

    def _claim_loop(self) -> None:
        queues = self.config.queues
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                with self._cond:
                    if self._free_slots() <= 0:
                        self._cond.wait(self.config.idle_wait)
                continue
            if self._running and free < self._batch_min:
                # A claim costs a round trip whatever its size: give other running
                # tasks a moment to finish so that one claim fetches several.
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._free_slots() >= self._batch_min, CLAIM_GATHER_S
                    )
                free = self._free_slots()
            request = os.urandom(8).hex()  # the same id on every retry of this claim
            records = self._retrying(partial(self.store.claim, queues, self.name, free, request))
            if records is None:
                continue
            for record in records:
                self._dispatch(record)
            if records:
                continue
            if self.config.burst and self._drained():
                return
            self._retrying(lambda: self.store.wait_for_tasks(queues, self.config.idle_wait))

    def _free_slots(self) -> int:
        return self.config.concurrency - len(self._running) - self._zombies

    def _drained(self) -> bool:
        if self._running or not self._finished.empty():
            return False
        stats = self.store.stats()
        return not any(stats.total(s, self.config.queues) for s in ("queued", "running"))

    def _dispatch(self, record: TaskRecord) -> None:
        task = self.space._tasks.get(record.name)
        prepared = ex.prepare(record, task, self.space.allow_pickle)
        if isinstance(prepared, Outcome) or task is None:
            assert isinstance(prepared, Outcome)
            self._report_outcome((record.lease, prepared))
            return
        args, kwargs = prepared
        lease = record.lease
        ctx = TaskContext(
            id=record.id,
            name=record.name,
            attempt=record.attempts,
            max_attempts=record.max_attempts,
            fencing_token=record.token,
            worker=self.name,
            _report=lambda done, total: self._report_progress(lease, done, total),
        )
        attempt = Attempt(record, task, ctx, deadline=None)
        with self._cond:
            self._running[record.id] = attempt
        isolation = task.isolation
        if isolation == "async":
            asyncio.run_coroutine_threadsafe(
                self._run_async(attempt, args, kwargs), self._event_loop()
            )
        elif isolation == "process":
            self._pool.submit(self._run_process, attempt, args, kwargs)
        else:
            self._pool.submit(self._run_thread, attempt, args, kwargs)

    def _start(self, attempt: Attempt, with_deadline: bool) -> bool:
        with attempt.lock:
            if attempt.settled:
                return False
            attempt.started = True
            timeout = attempt.record.timeout
            if with_deadline and timeout is not None:
                attempt.deadline = time.monotonic() + timeout
            return True

    def _run_thread(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if not self._start(attempt, with_deadline=True):
            return
        outcome = ex.run_inline(attempt, args, kwargs, self.space.codec)
        if not self._settle(attempt, outcome) and attempt.timed_out:
            with self._cond:
                self._zombies -= 1
                self._cond.notify_all()

    def _run_process(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if not self._start(attempt, with_deadline=True):
            return
        outcome = ex.run_in_process(attempt, args, kwargs, self.space.codec, attempt.ctx._report)
        if outcome is not None:
            self._settle(attempt, outcome)

    async def _run_async(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if self._start(attempt, with_deadline=False):
            self._settle(attempt, await ex.run_coroutine(attempt, args, kwargs, self.space.codec))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="taskspace-async", daemon=True)
            thread.start()
            self._loop, self._loop_thread = loop, thread
        return self._loop

    def _settle(self, attempt: Attempt, outcome: Outcome | None) -> bool:
        """Record the end of an attempt once; None frees the slot without a finish."""
        with attempt.lock:
            if attempt.settled:
                return False
            attempt.settled = True
        with self._cond:
            self._running.pop(attempt.record.id, None)
            if outcome is not None:
                self._reporting += 1
            self._cond.notify_all()
        if outcome is not None:
            try:
                self._report_outcome((attempt.record.lease, outcome))
            finally:
                with self._cond:
                    self._reporting -= 1
                    self._cond.notify_all()
        return True

    def _snapshot(self) -> list[Attempt]:
        with self._cond:
            return list(self._running.values())

    def _report_progress(self, lease: Lease, done: float, total: float) -> None:
        try:
            self.store.progress(lease, done, total)
        except BackendError as exc:
            log.warning("progress of task %s not recorded: %s", lease.task_id, exc)

    # -- finishing ----------------------------------------------------------

    def _report_outcome(self, item: tuple[Lease, Outcome]) -> None:
        """Finish right here if no other thread is finishing (no hand-off, lowest
        latency); otherwise queue it for the finisher, which batches under load."""
        if not self._flushing.acquire(blocking=False):
            self._finished.put(item)
            return
        try:
            drained = self._drain(FINISH_BATCH_MAX - 1)
            items = [item, *(x for x in drained if x is not None)]
            if None in drained:
                self._finished.put(None)  # the shutdown sentinel belongs to the finisher
            try:
                accepted = self.store.finish(items)
            except BackendError:
                for queued in items:  # the finisher retries them until they land
                    self._finished.put(queued)
                return
            self._tally(items, accepted)
        finally:
            self._flushing.release()

    def _drain(self, limit: int) -> list[tuple[Lease, Outcome] | None]:
        batch: list[tuple[Lease, Outcome] | None] = []
        while len(batch) < limit:
            try:
                batch.append(self._finished.get_nowait())
            except queue.Empty:
                break
        return batch

    def _finish_loop(self) -> None:
        while True:
            batch = [self._finished.get(), *self._drain(FINISH_BATCH_MAX - 1)]
            items = [item for item in batch if item is not None]
            if items:
                with self._flushing:
                    # A finish must not be dropped on a backend error: retry until it lands.
                    accepted = self._retrying(partial(self.store.finish, items), attempts=None)
                    self._tally(items, accepted or [])
            if None in batch:
                return

    def _tally(self, items: list[tuple[Lease, Outcome]], accepted: list[bool]) -> None:
        for (lease, outcome), ok in zip(items, accepted, strict=False):
            self.report.count(outcome, ok)
            if not ok:
                log.warning("finish of task %s refused: lease %d is stale", *lease)

    # -- ticking: renew, deadlines, maintenance, heartbeat -------------------

    def _tick_loop(self) -> None:
        next_renew = next_maintenance = 0.0
        next_beat = time.monotonic() + self.config.heartbeat_interval
        while not self._ticker_stop.wait(TICK_S):
            now = time.monotonic()
            self._enforce_deadlines(now)
            if now >= next_renew:
                self._renew()
                next_renew = now + self._renew_interval()
            if now >= next_maintenance:
                self._retrying(self._maintain, attempts=1)
                next_maintenance = now + self.config.maintenance_interval
            if now >= next_beat:
                self._retrying(self._heartbeat, attempts=1)
                next_beat = now + self.config.heartbeat_interval

    def _renew_interval(self) -> float:
        leases = [a.record.lease_s for a in self._snapshot()]
        return max(TICK_S, min(leases, default=3.0) / 3.0)

    def _renew(self) -> None:
        attempts = {a.record.id: a for a in self._snapshot()}
        if not attempts:
            return
        statuses = self._retrying(
            lambda: self.store.renew([a.record.lease for a in attempts.values()]), attempts=1
        )
        for task_id, status in (statuses or {}).items():
            attempt = attempts[task_id]
            if status == "held" or attempt.settled:
                continue  # settled: it finished between the snapshot and the renew
            attempt.ctx.cancel()
            if status == "lost" and not attempt.lost:
                attempt.lost = True
                self.report.leases_lost += 1
                log.warning("lease of task %s lost (worker %s)", task_id, self.name)
            if attempt.process is not None:
                ex.kill_process(attempt)
                self._settle(attempt, None if status == "lost" else Outcome("cancelled"))

    def _enforce_deadlines(self, now: float) -> None:
        for attempt in self._snapshot():
            if attempt.deadline is None or now < attempt.deadline:
                continue
            attempt.ctx.cancel()
            ex.kill_process(attempt)
            if attempt.process is None and attempt.task.isolation == "thread":
                attempt.timed_out = True
                with self._cond:
                    self._zombies += 1
            if self._settle(attempt, ex.timeout_outcome(attempt)):
                self._check_wedged()
            elif attempt.timed_out:
                with self._cond:
                    self._zombies -= 1

    def _check_wedged(self) -> None:
        if self._zombies >= self.config.concurrency:
            # Every slot holds a thread stuck past its timeout: this process can do no
            # more work. Exit (non-zero) so a supervisor starts a fresh one.
            log.error(
                "worker %s: all %d slots hold tasks stuck past their timeout; stopping",
                self.name,
                self.config.concurrency,
            )
            self.report.wedged = True
            self.stop(0.0)

    def _maintain(self) -> None:
        self.store.requeue_expired()
        self.store.promote_due()

    def _heartbeat(self) -> None:
        info = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(self.config.queues),
            "concurrency": self.config.concurrency,
            "running": len(self._running),
            "started": self._started_wall,
            "succeeded": self.report.succeeded,
            "failed": self.report.failed,
        }
        announce(self.store, self.name, info, ttl=self.config.heartbeat_interval * 3)

    # -- backend errors -----------------------------------------------------

    def _retrying(self, op: Callable[[], T], attempts: int | None = 20) -> T | None:
        """Run ``op``, retrying BackendError with backoff; None if it kept failing.
        ``attempts=None`` retries until it succeeds."""
        delay = BACKOFF_START_S
        tried = 0
        while True:
            try:
                return op()
            except BackendError as exc:
                tried += 1
                if attempts is not None and tried >= attempts:
                    log.error("backend error, giving up on this step: %s", exc)
                    return None
                log.warning("backend error, retrying in %.2f s: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
