"""The maintainer: the space's housekeeping, run by one elected worker at a time.

Every worker campaigns for the election ``maintainer``
(:mod:`taskspace.coordination.election`) without blocking: at start, then
whenever the term's lease is released or expires (``store.leases.wait``
wakes it) and at least every ``maintainer_retry`` seconds. The worker holding
the term runs :func:`maintain` every ``maintenance_interval`` seconds:
expired task leases go back to their queues (or ``dead``), due tasks become
claimable, due periodic ticks fire, the service registry is checked and
expired, and finished tasks and expired KV keys are reaped (bounded batches).
Expired leases get their task events (``lost``, ``dead``, ``cancelled``:
:func:`requeue_expired`), and every TRIM_STREAMS_EVERY_S the task events and
logs streams are trimmed by age and length (:func:`trim_streams`).

Guarantees:

- **One maintainer at a time** on a healthy clock: a worker checks
  ``term.active`` before every step and stops at once when the term is lost
  (its renew deadline, two thirds of ``maintainer_ttl`` after the last
  renewal, comes before the store can elect anyone else).
- **Failover** takes at most ``maintainer_ttl + maintainer_retry`` seconds
  after a maintainer is killed or paused (its term expires within the TTL;
  a candidate is woken by the expiry, or retries within the retry period).
  A worker that exits gracefully resigns: another takes over at once.
- **Faults are contained**: each step is guarded (a failing step is logged
  as an outage by the worker and never stops the others); a backend outage
  loses the term at its renew deadline and the worker campaigns again once
  the backend answers.
- Two maintainers at once (a clock running wild) would still be correct:
  every step is an atomic store operation that is safe to run concurrently,
  and periodic ticks are deduplicated by the tick. The election saves the
  load of every worker doing all of this every second; it is not needed for
  correctness.

**Periodic ticks are fired by every worker that defines them**, not only by the
maintainer: schedules live in code (``@space.periodic``), and the maintainer may
be a worker of another app, or one started without the module that defines a
schedule. A worker that does not lead calls ``fire_due`` itself whenever one of
its own schedules has a tick due (``periodic.due_at``: one pass per tick, not one
per second), while it waits to campaign; ``fire_due`` is correct with any number
of concurrent callers. Ticks are on time for ``maintainer_ttl + maintainer_retry +
2 * maintenance_interval`` (at least ``periodic.ON_TIME_S``), so a failover within
its bound never turns a tick into a "missed" one. The maintainer also warns about
schedule records whose ticks nobody fires (``periodic.warn_unscheduled``).

A burst worker (``burst=True``) campaigns like any other. It also never waits
on someone else to finish: while idle and not drained, and not the
maintainer, it requeues expired task leases itself (at most every
``maintainer_retry``), so the tasks of a killed worker come back to it even
while the maintainer role is in failover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from taskspace.coordination.election import Election, Term
from taskspace.events import EVENTS_STREAM, TaskEvent, decode_entry, first_id_since, trim_events
from taskspace.logs import trim_logs
from taskspace.worker.health import Backoff, Failed

if TYPE_CHECKING:
    from taskspace.backends.base import Store
    from taskspace.space import Space
    from taskspace.worker.config import WorkerConfig
    from taskspace.worker.worker import Worker

log = logging.getLogger("taskspace.worker")
T = TypeVar("T")

ELECTION = "maintainer"
REAP_BATCH = 1000
REAP_BATCHES_PER_PASS = 10
# A candidate waits for a vacancy in slices of at most this long, so that a
# stopping worker's maintainer thread ends promptly.
WAIT_SLICE_S = 0.25
# A wait that returned this much before its timeout was (probably) woken by a
# release or an expiry: campaign at once, but never twice within MIN_CAMPAIGN_GAP_S
# (a wait that keeps returning early must not turn into a busy loop).
WOKEN_MARGIN_S = 0.02
MIN_CAMPAIGN_GAP_S = 0.05

# Lost-lease events (LostTracker): attempts read back after a requeue at most, how
# long a vanished worker's heartbeat is remembered, and how many sent events are.
LOST_SCAN_LIMIT = 10_000
OPEN_MAX = 100_000
LEASE_MEMORY_S = 3600.0
LEASE_HISTORY_S = 600.0
REFRESH_PAGES = 20
SENT_MEMORY = 100_000
# Events that end an attempt (a release has none: its attempt ages out of memory).
ATTEMPT_ENDS = frozenset({"retried", "succeeded", "failed", "cancelled", "lost", "dead"})
# How often the maintainer trims the events and logs streams by age (and length).
TRIM_STREAMS_EVERY_S = 30.0

Guard = Callable[[str, Callable[[], Any]], Any]
Emit = Callable[[list["TaskEvent"]], None]


def _log_failure(step: str, op: Callable[[], T]) -> T | None:
    try:
        return op()
    except Exception as exc:  # noqa: BLE001 - one failing step never stops the others
        log.warning("%s failed: %s: %s", step, type(exc).__name__, exc)
        return None


def _reap_batches(reap: Callable[[int], int]) -> int:
    """Up to REAP_BATCHES_PER_PASS batches of REAP_BATCH; a backlog waits for the next pass."""
    total = 0
    for _ in range(REAP_BATCHES_PER_PASS):
        done = reap(REAP_BATCH)
        total += done
        if done < REAP_BATCH:
            break
    return total


def _fire_due(space: Space, store: Store, on_time: float | None) -> int:
    """The maintainer's periodic step: its own schedules' due ticks, then (at most
    every AUDIT_EVERY_S) a warning about records whose ticks nobody fires."""
    from taskspace.coordination.periodic import fire_due, warn_unscheduled

    pushed = fire_due(space, store=store, on_time=on_time)
    warn_unscheduled(space, store=store, on_time=on_time)
    return pushed


def _maintain_registry(space: Space) -> None:
    from taskspace.coordination.registry import maintain_registry

    maintain_registry(space)


def on_time_for(config: WorkerConfig) -> float:
    """How old a periodic tick may be and still be on time: at least the failover
    bound of the maintainer role (and never below periodic.ON_TIME_S)."""
    from taskspace.coordination.periodic import ON_TIME_S

    bound = config.maintainer_ttl + config.maintainer_retry + 2 * config.maintenance_interval
    return max(ON_TIME_S, bound)


class LostTracker:
    """Which attempts an expired lease ended, for their task events.

    ``requeue_expired`` returns only a count, and listing the running tasks
    costs a scan of every task on some backends (Redis), so the attempts come
    from the events stream instead: :meth:`refresh` (every pass) reads the
    events appended since the last pass (starting LEASE_HISTORY_S back) and
    keeps each attempt that ``started`` and has not finished yet (at most
    OPEN_MAX, for LEASE_MEMORY_S). When a requeue handled something, those
    attempts' tasks are read back (one ``get_many``): one that no longer runs
    that attempt and whose error is the store's ``WorkerLost`` lost its lease.
    Gaps: an attempt whose ``started`` event was not stored yet (its worker
    died within ~SHIP_INTERVAL_S of starting it) has no event; a maintainer
    failover may repeat one (each maintainer remembers the ones it sent)."""

    def __init__(self) -> None:
        # (task id, attempt) -> (monotonic time seen, the started event)
        self._open: OrderedDict[tuple[str, int], tuple[float, TaskEvent]] = OrderedDict()
        self._sent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._cursor: int | None = None

    def refresh(self, store: Store) -> None:
        """Read the events appended since the last call: open and close attempts."""
        streams = store.streams
        if self._cursor is None:
            self._cursor = first_id_since(store, EVENTS_STREAM, time.time() - LEASE_HISTORY_S)
        now = time.monotonic()
        for _ in range(REFRESH_PAGES):
            entries = streams.read(EVENTS_STREAM, after=self._cursor, limit=1000)
            for entry in entries:
                self._cursor = entry.id
                for event in decode_entry(entry):
                    key = (event.task_id, event.attempt)
                    if event.kind == "started":
                        self._open[key] = (now, event)
                        if len(self._open) > OPEN_MAX:
                            self._open.popitem(last=False)
                    elif event.kind in ATTEMPT_ENDS:
                        self._open.pop(key, None)
            if len(entries) < 1000:
                break
        while self._open:
            key, (seen, _) = next(iter(self._open.items()))
            if now - seen <= LEASE_MEMORY_S:
                break
            del self._open[key]

    def lost_events(self, store: Store, at: float) -> list[TaskEvent]:
        """The events of open attempts whose lease expired."""
        items = list(self._open.items())[-LOST_SCAN_LIMIT:]
        records = store.queue.get_many([key[0] for key, _ in items])
        events = []
        for (key, (_, started)), rec in zip(items, records, strict=False):
            if rec is None:
                self._open.pop(key, None)
                continue
            if rec.state == "running" and rec.attempts == started.attempt:
                continue  # still that attempt
            self._open.pop(key, None)  # that attempt is over, one way or another
            ended_by_expiry = rec.state in ("queued", "dead", "cancelled", "running")
            if (
                key in self._sent
                or not ended_by_expiry
                or (rec.error or {}).get("type") != "WorkerLost"
            ):
                continue
            kind = {"dead": "dead", "cancelled": "cancelled"}.get(rec.state, "lost")
            events.append(
                TaskEvent(0, at, kind, rec.id, started.name, started.queue, started.worker,
                          started.attempt, None, "LeaseExpired")
            )  # fmt: skip
            self._sent[key] = None
            if len(self._sent) > SENT_MEMORY:
                self._sent.popitem(last=False)
        return events


def requeue_expired(
    store: Store, emit: Emit | None = None, tracker: LostTracker | None = None
) -> int:
    """``store.queue.requeue_expired()``, and with ``emit`` and ``tracker``
    the task events of what it did: ``lost`` (requeued), ``dead`` (no
    attempts left) or ``cancelled`` (a cancel was pending), each naming the
    worker and attempt that lost the lease (see :class:`LostTracker`)."""
    if emit is None or tracker is None:
        return store.queue.requeue_expired()
    tracker.refresh(store)
    at = time.time()  # before the requeue: ahead of the next attempt's "started"
    handled = store.queue.requeue_expired()
    if handled:
        events = tracker.lost_events(store, at)
        emit(events)
        if len(events) < handled:
            log.debug("%d expired lease(s) requeued without a task event (no started event)",
                      handled - len(events))  # fmt: skip
    return handled


def trim_streams(store: Store, events_max_age: float, logs_max_age: float) -> int:
    """Trim the task events and logs streams by age and length; entries dropped."""
    return trim_events(store, events_max_age) + trim_logs(store, logs_max_age)


def steps(
    space: Space,
    store: Store,
    on_time: float | None = None,
    emit: Emit | None = None,
    tracker: LostTracker | None = None,
) -> list[tuple[str, Callable[[], object]]]:
    """The maintenance steps, in the order a pass runs them; ``emit`` receives
    the task events of requeued leases (with ``tracker``)."""
    return [
        ("requeue_expired", lambda: requeue_expired(store, emit, tracker)),
        ("promote_due", store.queue.promote_due),
        ("fire_due", lambda: _fire_due(space, store, on_time)),
        ("maintain_registry", lambda: _maintain_registry(space)),
        ("reap", lambda: _reap_batches(store.queue.reap)),
        ("kv.reap", lambda: _reap_batches(store.kv.reap)),
    ]


def maintain(
    space: Space,
    *,
    store: Store | None = None,
    term: Term | None = None,
    guard: Guard | None = None,
    on_time: float | None = None,
    emit: Emit | None = None,
    tracker: LostTracker | None = None,
) -> int:
    """One maintenance pass; returns how many steps ran.

    Each step runs through ``guard(name, op)`` (default: log a failure as a
    WARNING and carry on), so one failing step never stops the others.
    ``term``: the pass stops before the next step once ``term.active`` is
    False. ``store``: the store for every step but the registry's (default
    ``space.store``; ``maintain_registry`` always uses ``space.store``).
    ``on_time``: how old a periodic tick may be and still be on time (see
    :func:`on_time_for`; default periodic.ON_TIME_S). Retention is bounded per
    pass (REAP_BATCHES_PER_PASS batches of REAP_BATCH for tasks and KV keys).
    ``emit``/``tracker``: where the task events of requeued leases go and how
    they are found (None: none)."""
    run = guard or _log_failure
    ran = 0
    for name, op in steps(space, store or space.store, on_time, emit, tracker):
        if term is not None and not term.active:
            break
        run(f"maintenance {name}", op)
        ran += 1
    return ran


class Maintainer:
    """The maintainer thread of one worker: campaigns, and maintains while it leads."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.election = Election(worker.space, ELECTION)
        self.term: Term | None = None
        self.terms = 0  # terms won
        self.passes = 0  # passes run
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._next_pass = 0.0
        self._next_requeue = 0.0
        self._last_campaign = 0.0
        self._next_trim = 0.0
        self.lost = LostTracker()
        self.on_time = on_time_for(worker.config)

    @property
    def leading(self) -> bool:
        """True while this worker holds an active maintainer term."""
        term = self.term
        return term is not None and term.active

    def run(self) -> None:
        """The thread's body: until :meth:`stop`; never dies of an exception."""
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._step()
                backoff.reset()
            except Exception:
                log.exception("unexpected error in the maintainer; carrying on")
                self._stop.wait(backoff.next())

    def stop(self) -> None:
        """End the thread; :meth:`resign` then gives the term back."""
        self._stop.set()
        self._wake.set()

    def resign(self) -> None:
        """Give up the term, if any, so another worker takes over at once."""
        term, self.term = self.term, None
        if term is None or self.w.report.space_lost:
            return
        if self.w.health.call("resign", term.resign) is True:
            log.info("worker %s resigned as maintainer (term %d)", self.w.name, term.number,
                     extra={"worker": self.w.name})  # fmt: skip

    def _step(self) -> None:
        if self.w.report.space_lost:
            self._stop.wait(self.w.config.maintenance_interval)
            return
        if not self.leading and not self._campaign():
            self._wait_for_vacancy()
            return
        now = time.monotonic()
        if now >= self._next_pass:
            term = self.term
            assert term is not None
            maintain(self.w.space, store=self.w.store, term=term, guard=self._guard,
                     on_time=self.on_time, emit=self.w.emit_events, tracker=self.lost)  # fmt: skip
            self._trim_if_due(term, now)
            self.passes += 1
            self._next_pass = now + self.w.config.maintenance_interval
        self._wake.wait(max(0.0, self._next_pass - time.monotonic()))
        self._wake.clear()

    def _trim_if_due(self, term: Term, now: float) -> None:
        """At most every TRIM_STREAMS_EVERY_S: the events and logs streams' retention."""
        if now < self._next_trim or not term.active:
            return
        self._next_trim = now + TRIM_STREAMS_EVERY_S
        cfg = self.w.config
        self._guard(
            "maintenance trim_streams",
            partial(trim_streams, self.w.store, cfg.events_max_age, cfg.logs_max_age),
        )

    def _guard(self, step: str, op: Callable[[], T]) -> T | Failed | None:
        if self.w.report.space_lost:
            return None
        return self.w.health.call(step, op)

    def _campaign(self) -> bool:
        """Try once for the term; True if this worker now leads."""
        if self.term is not None:  # lost: say so once, then campaign again
            log.warning("worker %s is no longer the maintainer (term %d lost)", self.w.name,
                        self.term.number, extra={"worker": self.w.name})  # fmt: skip
            self.term = None
        cfg = self.w.config
        self._last_campaign = time.monotonic()
        term = self.w.health.call(
            "campaign",
            lambda: self.election.try_campaign(
                identity=self.w.name, ttl=cfg.maintainer_ttl, on_lost=self._lost
            ),
        )
        if term is None or isinstance(term, Failed):
            return False
        self.term = term
        if self._stop.is_set():  # stopped while campaigning: hand it back at once
            self.resign()
            return False
        self.terms += 1
        self._next_pass = 0.0
        log.info("worker %s is the maintainer (term %d)", self.w.name, term.number,
                 extra={"worker": self.w.name})  # fmt: skip
        return True

    def _lost(self, term: Term) -> None:
        self._wake.set()

    def _wait_for_vacancy(self) -> None:
        """Block until the term may be free (a release or an expiry wakes the
        wait) or ``maintainer_retry`` passes, in slices so that a stop ends it."""
        retry_at = time.monotonic() + self.w.config.maintainer_retry
        leases = self.w.space.store.leases
        while not self._stop.is_set():
            self.fire_own()
            left = retry_at - time.monotonic()
            if left <= 0:
                return
            step = min(WAIT_SLICE_S, left)
            began = time.monotonic()
            waited = self.w.health.call(
                "campaign wait", partial(leases.wait, self.election.lease_name, step)
            )
            if isinstance(waited, Failed):
                self._stop.wait(min(left, self.w.config.maintainer_retry))
                return
            if time.monotonic() - began < step - WOKEN_MARGIN_S:  # woken: a release or expiry
                self._stop.wait(
                    max(0.0, self._last_campaign + MIN_CAMPAIGN_GAP_S - time.monotonic())
                )
                return

    def fire_own(self) -> None:
        """Not the maintainer: fire this worker's own schedules when one of their
        ticks is due (see the module docstring); a failure is an outage, logged
        by the worker's health, and the next due check tries again."""
        from taskspace.coordination.periodic import due_at, fire_due

        space = self.w.space
        if not space._schedules or self.leading or self.w.report.space_lost:
            return
        due = due_at(space)
        if due is not None and time.monotonic() < due:
            return
        self.w.health.call(
            "fire_due", partial(fire_due, space, store=self.w.store, on_time=self.on_time)
        )

    def requeue_if_idle(self) -> None:
        """Burst mode, idle and not drained: requeue expired task leases here
        unless this worker leads (at most every ``maintainer_retry``)."""
        now = time.monotonic()
        if self.leading or now < self._next_requeue:
            return
        self._next_requeue = now + self.w.config.maintainer_retry
        self.w.health.call(
            "requeue_expired",
            partial(requeue_expired, self.w.store, self.w.emit_events, self.lost),
        )
