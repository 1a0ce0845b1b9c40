"""The worker: claims tasks in batches, runs them, renews and finishes in batches.

Guarantees (at-least-once):

- A claimed task is leased. A renewer thread of its own (with a Redis
  connection of its own) renews every running lease in one store call at a
  third of the shortest lease, so no slow maintenance step, finish or claim
  can delay it. If the worker dies or is paused past the lease, the store
  requeues the task (the maintainer does it) and a later
  ``finish`` from this worker is refused.
- Attempts are keyed by lease (task id and fencing token): a worker that
  re-claims a task it lost during a pause runs and renews the new attempt,
  and abandons the old one.
- A lost lease is not a cancel: the attempt's flag turns on (cooperative
  tasks stop), the attempt is abandoned and never finished ``cancelled``.
  A cancel request is seen on renew: thread tasks see the flag, async tasks
  are cancelled on their event loop, process tasks get SIGTERM (SIGKILL for
  a cancel with ``terminate``); they end ``cancelled``.
- A finished attempt's outcome is kept in the outbox and retried with backoff
  until the store accepts it or its lease is reported lost (see
  :mod:`taskspace.worker.outbox`). No background thread dies of an
  exception: each logs it, backs off and carries on.
- SIGTERM (or :meth:`Worker.stop`) stops claiming, releases attempts that
  never started at once, waits ``shutdown_grace`` seconds for running ones,
  then releases those too (without spending an attempt). The grace is a
  promise: about a second past it the worker exits even if the backend is
  down, logging how many outcomes it could not record (their tasks run again
  once their leases expire). A second signal cuts the grace.
- A wiped or replaced space (SpaceLost) stops the worker at once, with one
  CRITICAL log line, and nothing written into the new space
  (:mod:`taskspace.worker.spaceguard`); ``WorkerReport.space_lost`` says so
  and ``taskspace worker`` exits with code 4 (EXIT_SPACE_LOST). Every slot
  stuck past its timeout exits with code 3 (EXIT_WEDGED).

Task events and logs (:mod:`taskspace.events`, :mod:`taskspace.logs`): the
worker emits ``started`` when an attempt begins, and the event of every
finish the store accepted (``succeeded``, ``retried``, ``failed``,
``cancelled``; none for a refused finish or a release), plus ``usage`` from
``current_task().record(...)``; the maintainer emits ``lost``/``dead`` for
expired leases. They are shipped in batches by a background thread, never
on the path of a claim or finish. With ``ship_logs`` (default) a
:class:`taskspace.logs.Handler` ships the process's log records (and, with
``capture_print``, what tasks print) while the worker runs; both are flushed
at shutdown (bounded: 0.1 s when the backend is down).

Maintenance runs in one worker at a time, the elected maintainer
(:mod:`taskspace.worker.maintainer`): every worker campaigns, a killed or
paused maintainer is replaced within ``maintainer_ttl + maintainer_retry``
seconds, and a worker that stops resigns so another takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from taskspace import logs
from taskspace.backends import REDIS_SCHEMES, open_store
from taskspace.backends.base import Lease, Outcome, Store, TaskRecord
from taskspace.backends.outcomes import running_transition
from taskspace.errors import MissingDependency, SpaceLost, SpaceNotFound
from taskspace.events import CLOSE_TIMEOUT_S, TaskEvent, event_for, event_shipper
from taskspace.tasks.context import TaskContext
from taskspace.worker import execution as ex
from taskspace.worker import tasklog
from taskspace.worker.config import WorkerConfig
from taskspace.worker.execution import Attempt
from taskspace.worker.health import BackendHealth, Backoff, Failed
from taskspace.worker.maintainer import Maintainer
from taskspace.worker.outbox import Outbox
from taskspace.worker.registry import announce, withdraw
from taskspace.worker.renewal import TICK_S, Renewer
from taskspace.worker.report import WorkerReport
from taskspace.worker.signals import install_signal_handlers
from taskspace.worker.spaceguard import SpaceGuard
from taskspace.worker.threads import DaemonThreadPool

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.worker")

CLAIM_GATHER_S = 0.002
# Connections a worker's own loops may hold at once besides its task slots: the
# claim loop, finisher, renewer, ticker, maintainer, lease keeper, heartbeats.
POOL_CONNECTIONS_OF_LOOPS = 8
# After a short claim: how long at most the claim loop lets the claimed attempts go first.
HANDOFF_S = 0.002
# After the grace, outcomes (the releases above all) get this long to land.
FINAL_FLUSH_S = 1.0
THREAD_JOIN_S = 1.0
# Events and log records get this long to land at exit while the backend is down.
DOWN_FLUSH_S = 0.1


class Worker:
    """Runs tasks of one Space from a set of queues (see the module docstring).

    ``store``: the store to use instead of ``space.store`` (tests inject
    faults through it); renewal and the maintenance steps then use it too (the
    maintainer election itself runs on ``space.store``)."""

    def __init__(
        self, space: Space, config: WorkerConfig | None = None, *, store: Store | None = None
    ) -> None:
        self.space = space
        self.config = config or WorkerConfig()
        self.name = self.config.name
        self._store = store
        self._injected = store is not None
        self.report = WorkerReport(self.name)
        self.guard = SpaceGuard(self)
        self.health = BackendHealth(self.name, self.guard.request, self.guard.on_space_lost)
        self._running: dict[Lease, Attempt] = {}
        self._cond = threading.Condition()
        self.events = event_shipper(lambda: self.store, "taskspace-worker-events")
        self._outbox = Outbox(lambda: self.store, self.health, self._tally, self.emit_events)
        self._log_handler: logs.Handler | None = None
        self._metrics: Any = None  # taskspace.api.metrics.EventMetrics with metrics_port
        self._stopping = threading.Event()
        self._threads_stop = threading.Event()
        self._grace = self.config.shutdown_grace
        self._pool = DaemonThreadPool("taskspace-task")
        # Threads still running an attempt the worker gave up on (timeout): they
        # hold real resources, so they count against concurrency until they return.
        self._zombies = 0
        self._batch_min = max(1, self.config.concurrency // 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._started_wall: float | None = None  # the store's wall clock, at the first beat
        self._names: list[str] = []
        self._renew_store: Store | None = None
        self._next_beat = 0.0
        self.maintainer = Maintainer(self)

    @property
    def store(self) -> Store:
        """The store the worker uses (``space.store`` unless one was given)."""
        if self._store is None:
            self._store = self.space.store
        return self._store

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> WorkerReport:
        """Work until stopped (or drained, in burst mode); return what was done."""
        uninstall = self._start_observability()
        restore = install_signal_handlers(self)
        try:
            if self._open_stores():
                self._work()
        finally:
            restore()
            log.info("worker %s stopped: %s", self.name, self.report, extra={"worker": self.name})
            self._stop_observability(uninstall)
        return self.report

    def emit_events(self, events: list[TaskEvent]) -> None:
        """Ship ``events`` (batched in the background; see :mod:`taskspace.events`)."""
        if events:
            self.events.put_many(events)

    def _start_observability(self) -> Callable[[], None] | None:
        """The metrics endpoint (``metrics_port``) and the log handler (``ship_logs``)."""
        cfg = self.config
        if cfg.metrics_port is not None:
            try:
                from taskspace.api.metrics import serve_worker_metrics
            except ImportError as exc:
                raise MissingDependency(
                    f"metrics_port needs taskspace.api.metrics and prometheus-client"
                    f" (pip install 'taskspace[api]'): {exc}"
                ) from exc
            self._metrics = serve_worker_metrics(cfg.metrics_port)
            self.events.observers.append(self._metrics.observe)
        if not cfg.ship_logs:
            return None
        self._log_handler = logs.Handler(self.space, worker=self.name, store=lambda: self.store)
        return logs.install(self._log_handler, capture_print=cfg.capture_print)

    def _stop_observability(self, uninstall: Callable[[], None] | None) -> None:
        """Flush the events and log records (bounded), then stop shipping."""
        timeout = DOWN_FLUSH_S if self.health.down or self.report.space_lost else CLOSE_TIMEOUT_S
        self.events.close(timeout)
        if uninstall is not None:
            uninstall()
        if self._log_handler is not None:
            self._log_handler.close(timeout)
        if self._metrics is not None:
            self._metrics.close()

    def _work(self) -> None:
        self.health.call("heartbeat", self._heartbeat)
        self._next_beat = time.monotonic() + self.config.heartbeat_interval
        self._outbox.start()
        threads = [
            self._background("taskspace-renewer", Renewer(self).step),
            self._background("taskspace-ticker", self._tick),
        ]
        maintainer = threading.Thread(
            target=self.maintainer.run, name="taskspace-maintainer", daemon=True
        )
        maintainer.start()
        threads.append(maintainer)
        log.info(
            "worker %s started on queues %s with tasks %s",
            self.name, ",".join(self.config.queues), ",".join(self._names),
            extra={"worker": self.name},
        )  # fmt: skip
        try:
            self._claim_loop()
        finally:
            self._shutdown(threads)

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; running tasks get ``grace`` seconds (default: the config's)."""
        if grace is not None:
            self._grace = grace
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _open_stores(self) -> bool:
        """Open the store, retrying through an outage (a full disk can stop SQLite
        from opening at all) until it opens or the worker is stopped."""
        self._names = self.space.task_names
        backoff = Backoff()
        while isinstance(self.health.call("open", self._open_both), Failed):
            if self._stopping.wait(backoff.next()):
                return False
        return True

    def _open_both(self) -> None:
        """The store, then (Redis) the renewer's client of its own; a store
        with a connection pool (PostgreSQL) is sized for every slot."""
        store = self.store
        fit_pool = getattr(store, "fit_pool", None)
        if fit_pool is not None:
            fit_pool(self.config.concurrency + POOL_CONNECTIONS_OF_LOOPS)
        if self._renew_store is None:
            self._renew_store = self._open_renew_store(store)

    def _open_renew_store(self, main: Store) -> Store:
        """Redis: a client of its own, so that no call of another thread (a blocking
        wait, a stalled socket) can hold up renewal. SQLite already gives each
        thread its own connection; memory has no connection."""
        if self._injected or self.space.scheme not in REDIS_SCHEMES:
            return main
        try:  # never creates a space: the one the worker opened is gone if there is none
            store = open_store(self.space.url, namespace=self.space.namespace, create=False)
        except SpaceNotFound as exc:
            raise SpaceLost(f"the space at {self.space.url} vanished: {exc}") from exc
        if store.space_id != main.space_id:
            store.close()
            raise SpaceLost(f"the space at {self.space.url} was replaced since it was opened")
        return store

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        self._stopping.set()
        # A lost space takes no releases: there is nothing to give tasks back to.
        release = None if self.report.space_lost else Outcome("release")
        for attempt in self._snapshot():
            if not attempt.started:
                self._settle(attempt, release, inline=False)
        begun = time.monotonic()
        with self._cond:
            # Re-read the grace on every pass: a second signal cuts it to zero.
            while self._running and time.monotonic() < begun + self._grace:
                self._cond.wait(min(0.1, max(0.0, begun + self._grace - time.monotonic())))
        lost = self.report.space_lost
        for attempt in self._snapshot():
            attempt.ctx.stop()
            ex.kill_process(attempt)
            self._settle(attempt, None if lost else Outcome("release"), inline=False)
        if lost:
            self._outbox.discard_all()
        deadline = max(begun + self._grace, time.monotonic() + FINAL_FLUSH_S)
        self._abandon(self._outbox.close(deadline))
        self._threads_stop.set()
        self.maintainer.stop()
        for thread in threads:
            thread.join(timeout=THREAD_JOIN_S)
        if not self.health.down and not self.report.space_lost:
            _bounded(self._leave, THREAD_JOIN_S)
        self._close_runtime()

    def _leave(self) -> None:
        """Resign as maintainer (another takes over at once; a term left behind
        expires within its TTL), then withdraw from the registry."""
        self.maintainer.resign()
        self.health.call("withdraw", self._withdraw)

    def _abandon(self, count: int) -> None:
        if count:
            self.report.abandoned += count
            log.warning(
                "worker %s: %d outcome(s) not recorded within the shutdown grace (backend "
                "unreachable); their tasks run again once their leases expire",
                self.name, count, extra={"worker": self.name},
            )  # fmt: skip

    def _withdraw(self) -> None:
        withdraw(self.store, self.name)

    def _close_runtime(self) -> None:
        self._pool.shutdown()
        if self._renew_store is not None and self._renew_store is not self.store:
            self._renew_store.close()
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            if not self._loop.is_running():
                self._loop.close()

    # -- claiming and dispatch ----------------------------------------------

    def _claim_loop(self) -> None:
        backoff = Backoff()
        wait = 0.0  # the next claim's wait: a wake-up carries the claim
        while not self._stopping.is_set():
            free = self._wait_for_slots()
            if free <= 0:
                continue
            records = self._claim(free, backoff, wait)
            wait = 0.0
            attempts = [a for a in map(self._dispatch, records) if a is not None]
            if self._stopping.is_set() or len(records) >= free:
                continue  # a full claim: there may be more to claim at once
            if records:
                # A short claim took every claimable task: the next claim waits for
                # more (it returns at once if more came meanwhile), except in burst
                # mode, where an empty claim leads to the drained check. The
                # attempts start before this thread's next store call, so their
                # finishes go first.
                self._let_go_first(attempts)
                if not self.config.burst:
                    wait = self.config.idle_wait
                continue
            if self.config.burst:
                if self._drained():
                    return
                self.maintainer.requeue_if_idle()  # never wait on a maintainer to drain
            # Nothing came: idle on wait_for_tasks, which writes nothing while
            # it waits (a claim's wait runs the claim script on every step).
            self._idle_wait()

    def _idle_wait(self) -> None:
        """Block until a task may be claimable (or the idle wait ends)."""
        queues, names = self.config.queues, self._names
        waited = self.health.call(
            "wait",
            lambda: self.store.queue.wait_for_tasks(queues, self.config.idle_wait, names=names),
        )
        if isinstance(waited, Failed):
            self._stopping.wait(self.config.idle_wait)

    def _let_go_first(self, attempts: list[Attempt]) -> None:
        """Let ``attempts`` go first, for at most HANDOFF_S: until each is running,
        or has ended and its outcome was recorded. This thread's next store call
        (the idle wait) would otherwise take the GIL and the backend ahead of
        them; a task still running when this thread looks does not hold it up."""
        if not attempts:
            return

        def ahead() -> bool:
            return all(
                (a.started and not a.settled) or (a.settled and not self._outbox.pending(a.lease))
                for a in attempts
            )

        with self._cond:
            self._cond.wait_for(ahead, HANDOFF_S)

    def _wait_for_slots(self) -> int:
        free = self._free_slots()
        if free <= 0:
            with self._cond:
                if self._free_slots() <= 0:
                    self._cond.wait(self.config.idle_wait)
            return 0
        if self._running and free < self._batch_min:
            # A claim costs a round trip whatever its size: give other running
            # tasks a moment to finish so that one claim fetches several.
            with self._cond:
                self._cond.wait_for(lambda: self._free_slots() >= self._batch_min, CLAIM_GATHER_S)
            free = self._free_slots()
        return free

    def _claim(self, n: int, backoff: Backoff, wait: float = 0.0) -> list[TaskRecord]:
        """Claim up to ``n`` tasks of the registered names, waiting up to ``wait``
        for one when none is claimable (the idle wait: a wake-up carries the
        claim), retrying through an outage with the same request id (a lost
        reply then returns what it leased)."""
        request = os.urandom(8).hex()
        claim = partial(
            self.store.queue.claim, self.config.queues, self.name, n, request,
            names=self._names, wait=wait,
        )  # fmt: skip
        while not self._stopping.is_set():
            records = self.health.call("claim", claim)
            if not isinstance(records, Failed):
                backoff.reset()
                return records
            self._stopping.wait(backoff.next())
        return []

    def _free_slots(self) -> int:
        return self.config.concurrency - len(self._running) - self._zombies

    def _drained(self) -> bool:
        """Burst mode: nothing left that this worker could run (tasks of names it
        does not know belong to other apps' workers, and do not hold it up)."""
        if self._running or len(self._outbox):
            return False
        stats = self.health.call("stats", self.store.queue.stats)
        if isinstance(stats, Failed):
            return False
        live = ("queued", "running")
        if not any(stats.total(s, self.config.queues) for s in live):
            return True
        mine = self.health.call("list", lambda: self._any_task_of_mine(live))
        return mine is False

    def _any_task_of_mine(self, states: Sequence[str]) -> bool:
        return any(
            self.store.queue.list(state=state, queue=queue, name=name, limit=1)
            for state in states
            for queue in self.config.queues
            for name in self._names
        )

    def _dispatch(self, record: TaskRecord) -> Attempt | None:
        """Start running ``record``'s attempt; the attempt, or None if it never runs."""
        if self.report.space_lost:
            return None  # claimed as the space was lost: gone with it, never run
        task = self.space._tasks.get(record.name)
        prepared = ex.prepare(record, task, self.space.allow_pickle)
        if isinstance(prepared, Outcome) or task is None:
            assert isinstance(prepared, Outcome)
            error = (prepared.error or {}).get("type")
            event = event_for("failed", record, self.name, error=error)
            self._outbox.add(record.lease, prepared, record.lease_s, event)
            self._outbox.send(inline=True)
            return None
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
            _usage=lambda usage: self.events.put(
                event_for("usage", record, self.name, usage=usage)
            ),
        )
        attempt = Attempt(record, task, ctx, deadline=None)
        with self._cond:
            self._running[lease] = attempt
        isolation = task.isolation
        if isolation == "async":
            asyncio.run_coroutine_threadsafe(
                self._run_async(attempt, args, kwargs), self._event_loop()
            )
        elif isolation == "process":
            self._pool.submit(self._run_process, attempt, args, kwargs)
        else:
            self._pool.submit(self._run_thread, attempt, args, kwargs)
        return attempt

    def _start(self, attempt: Attempt) -> bool:
        """Mark the attempt started; its timeout starts later, once its rate
        limit admits it (execution.begin), so a wait in the gate never counts."""
        with attempt.lock:
            if attempt.settled:
                return False
            attempt.started = True
            attempt.began = time.monotonic()
        with self._cond:
            self._cond.notify_all()  # the claim loop may wait for this start (_let_go_first)
        tasklog.started(attempt, self.name)
        self.events.put(event_for("started", attempt.record, self.name))
        return True

    def _run_thread(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if not self._start(attempt):
            return
        outcome = ex.run_inline(attempt, args, kwargs, self.space.codec)
        if not self._settle(attempt, outcome) and attempt.timed_out:
            with self._cond:
                self._zombies -= 1
                self._cond.notify_all()

    def _run_process(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if not self._start(attempt):
            return
        outcome = ex.run_in_process(attempt, args, kwargs, self.space.codec, attempt.ctx._report)
        if outcome is not None:
            self._settle(attempt, ex.after_cancel(attempt, outcome))

    async def _run_async(self, attempt: Attempt, args: list[Any], kwargs: dict[str, Any]) -> None:
        if self._start(attempt):
            attempt.aio_task = asyncio.current_task()
            self._settle(attempt, await ex.run_coroutine(attempt, args, kwargs, self.space.codec))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            # Async tasks' blocking helpers (a rate-limit gate waiting for a slot,
            # the release of a permit) run in the loop's default executor: size it
            # for every slot at once, or admits that wait would queue the releases
            # that end their wait behind them (min(32, cpus + 4) threads otherwise).
            loop.set_default_executor(
                ThreadPoolExecutor(self.config.concurrency * 2 + 4, "taskspace-async-io")
            )
            thread = threading.Thread(target=loop.run_forever, name="taskspace-async", daemon=True)
            thread.start()
            self._loop, self._loop_thread = loop, thread
        return self._loop

    def _settle(self, attempt: Attempt, outcome: Outcome | None, inline: bool = True) -> bool:
        """Record the end of an attempt once; None frees the slot without a finish.
        ``inline``: this thread may call the store (never the renewer's)."""
        with attempt.lock:
            if attempt.settled:
                return False
            attempt.settled = True
        if outcome is not None and outcome.kind == "cancelled" and attempt.ctx.lease_lost:
            outcome = None  # the lease is gone: abandoned, never "cancelled"
        tasklog.ended(attempt, outcome, self.name)
        logs.end_task_output(attempt.ctx)
        if outcome is not None:
            # In the outbox before it leaves _running: shutdown waits for one, then the other.
            event = self._finish_event(attempt, outcome)
            self._outbox.add(attempt.lease, outcome, attempt.record.lease_s, event)
        with self._cond:
            self._running.pop(attempt.lease, None)
            self._cond.notify_all()
        if outcome is not None:
            self._outbox.send(inline)
        return True

    def _finish_event(self, attempt: Attempt, outcome: Outcome) -> TaskEvent | None:
        """The event of ``outcome`` once accepted: the state the store moves the
        task to (as the worker knows its cancel request), None for a release."""
        r = attempt.record
        state = running_transition(
            outcome.kind, attempt.ctx.cancel_requested, r.attempts, r.max_attempts
        )
        if outcome.kind == "release" and state != "cancelled":
            return None
        kind = "retried" if state == "queued" else state
        duration = time.monotonic() - attempt.began if attempt.began else None
        error = outcome.error.get("type") if outcome.error else None
        return event_for(kind, r, self.name, duration=duration, error=error)

    def _snapshot(self) -> list[Attempt]:
        with self._cond:
            return list(self._running.values())

    def _report_progress(self, lease: Lease, done: float, total: float) -> None:
        # Runs in the task's own code: a store failure must never reach it.
        held = self.health.call("progress", lambda: self.store.queue.progress(lease, done, total))
        if held is False:  # refused: the lease is stale, or the space is gone
            self.guard.check("progress refused", [lease.task_id])

    def _tally(
        self,
        items: list[tuple[Lease, Outcome]],
        accepted: list[bool],
        events: list[TaskEvent | None],
    ) -> None:
        with self._cond:
            self._cond.notify_all()  # outcomes recorded: the claim loop may wait for them
        for (_, outcome), ok, event in zip(items, accepted, events, strict=False):
            # The event names the state the store moved the task to (a retry
            # with no attempts left ends failed), the outcome what was asked.
            self.report.count(outcome, ok, None if event is None else event.kind)
        refused = [lease for (lease, _), ok in zip(items, accepted, strict=False) if not ok]
        if not refused or self.guard.check("finish refused", [r.task_id for r in refused]):
            return
        for lease in refused:
            log.warning(
                "finish of task %s refused: lease %d is stale", *lease,
                extra={"task_id": lease.task_id, "worker": self.name},
            )  # fmt: skip

    # -- background threads: renewal (with deadlines), space checks, heartbeat --

    def _background(self, name: str, step: Callable[[float], None]) -> threading.Thread:
        thread = threading.Thread(target=self._loop_forever, args=(step,), name=name, daemon=True)
        thread.start()
        return thread

    def _loop_forever(self, step: Callable[[float], None]) -> None:
        """Run ``step(now)`` every tick until shutdown; an error is logged and backed
        off, never the end of the thread."""
        backoff = Backoff()
        while not self._threads_stop.wait(TICK_S):
            try:
                step(time.monotonic())
                backoff.reset()
            except Exception:
                log.exception(
                    "unexpected error in %s; carrying on", threading.current_thread().name
                )
                self._threads_stop.wait(backoff.next())

    def _tick(self, now: float) -> None:
        if self.report.space_lost:
            return
        self.guard.run_if_due()
        if now >= self._next_beat:
            self.health.call("heartbeat", self._heartbeat)
            self._next_beat = now + self.config.heartbeat_interval

    def _heartbeat(self) -> None:
        # Never announce this worker into a space that replaced the one it opened.
        self.store.check_space()
        if self._started_wall is None:
            self._started_wall = self.store.clock.wall()
        info = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": list(self.config.queues),
            "tasks": self._names,
            "concurrency": self.config.concurrency,
            "running": len(self._running),
            "started": self._started_wall,
            "succeeded": self.report.succeeded,
            "failed": self.report.failed,
        }
        announce(self.store, self.name, info, ttl=self.config.heartbeat_interval * 3)


def _bounded(op: Callable[[], object], timeout: float) -> None:
    """Run ``op`` on a daemon thread and wait at most ``timeout`` for it: a call on a
    stalled connection must not hold up an exit that was promised."""
    thread = threading.Thread(target=op, name="taskspace-exit-call", daemon=True)
    thread.start()
    thread.join(timeout)
