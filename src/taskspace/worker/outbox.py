"""Outcomes of finished attempts on their way to the store.

Guarantee: an outcome stays in the outbox until the store accepts it,
refuses it as stale (its lease was no longer the task's), or the worker
learns that its lease was lost (:meth:`Outbox.drop`). A failing ``finish``
(any exception: backend down, disk full, database locked) is retried with
backoff by the finisher thread, for as long as it takes. Only a shutdown
past its grace abandons what is left (:meth:`Outbox.close`): those tasks
run again once their leases expire (at-least-once still holds), and the
worker logs how many there were.

The thread that completes an attempt finishes it itself when no other
flush is running (lowest latency); otherwise the finisher thread batches
whatever has piled up into one ``finish`` call.

An outcome may carry its task event (:mod:`taskspace.events`): the events
of the outcomes a ``finish`` accepted go to ``on_recorded`` together (one
batch per finish), never those of refused ones.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from taskspace.backends.base import Lease, Outcome, Store
from taskspace.worker.health import BackendHealth, Backoff, Failed

if TYPE_CHECKING:
    from taskspace.events import TaskEvent

log = logging.getLogger("taskspace.worker")

FINISH_BATCH_MAX = 1000
IDLE_WAKE_S = 0.5


class Pending(NamedTuple):
    """An outcome waiting to be accepted, with the lease time to renew it by."""

    outcome: Outcome
    lease_s: float
    event: TaskEvent | None = None


Tally = Callable[[list[tuple[Lease, Outcome]], list[bool], list["TaskEvent | None"]], None]
Recorded = Callable[[list["TaskEvent"]], None]


class Outbox:
    """Pending outcomes keyed by lease, and the finisher thread that records them."""

    def __init__(
        self,
        store: Callable[[], Store],
        health: BackendHealth,
        tally: Tally,
        on_recorded: Recorded | None = None,
    ) -> None:
        self._store = store
        self._health = health
        self._tally = tally
        self._on_recorded = on_recorded
        self._items: dict[Lease, Pending] = {}
        self._in_flight: set[Lease] = set()  # in a finish call: its reply decides
        self._cond = threading.Condition()
        self._flushing = threading.Lock()
        self._closing = threading.Event()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskspace-finisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(
        self, lease: Lease, outcome: Outcome, lease_s: float, event: TaskEvent | None = None
    ) -> None:
        """Keep ``outcome`` until it is recorded (call :meth:`send` next);
        ``event`` goes to ``on_recorded`` once the store accepts it."""
        with self._cond:
            self._items[lease] = Pending(outcome, lease_s, event)

    def send(self, inline: bool) -> None:
        """Get pending outcomes recorded: ``inline`` tries one ``finish`` in this
        thread at once (skipped during an outage); otherwise, or if that did not
        record them, the finisher thread takes over."""
        if inline and not self._health.down and self._flush(blocking=False) is True:
            return
        with self._cond:
            self._cond.notify_all()

    def leases(self) -> dict[Lease, float]:
        """The lease of every pending outcome, with its lease time (to keep renewing it)."""
        with self._cond:
            return {lease: p.lease_s for lease, p in self._items.items()}

    def drop(self, lease: Lease) -> bool:
        """Forget the outcome of a lease reported lost; True if one was pending. An
        outcome in a ``finish`` call right now is kept: the renew that reported it
        lost may have run after that finish settled the task."""
        with self._cond:
            if lease in self._in_flight:
                return False
            found = self._items.pop(lease, None) is not None
            self._cond.notify_all()
        return found

    def discard_all(self) -> set[str]:
        """Forget every pending outcome (the space is gone: there is nothing to
        record them in) and stop the finisher; returns their task ids."""
        with self._cond:
            ids = {lease.task_id for lease in self._items}
            self._items.clear()
            self._abandoned.set()
            self._cond.notify_all()
        return ids

    def pending(self, lease: Lease) -> bool:
        """True while an outcome of ``lease`` waits to be recorded."""
        return lease in self._items

    def task_ids(self) -> set[str]:
        """The task id of every pending outcome."""
        with self._cond:
            return {lease.task_id for lease in self._items}

    def __len__(self) -> int:
        return len(self._items)

    def close(self, deadline: float) -> int:
        """Let the finisher record what is pending until ``deadline`` (monotonic);
        then abandon the rest. Returns how many outcomes were abandoned."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
            while self._items and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = len(self._items)
        self._abandoned.set()
        if self._thread.is_alive():
            # Daemon: a finish stuck on a dead connection must not hold the exit.
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return left

    def _flush(self, blocking: bool) -> bool | None:
        """One ``finish`` of up to FINISH_BATCH_MAX pending outcomes. True: recorded;
        False: the store call failed (outcomes kept); None: another flush is running."""
        if not self._flushing.acquire(blocking=blocking):
            return None
        try:
            with self._cond:
                batch = list(itertools.islice(self._items.items(), FINISH_BATCH_MAX))
                self._in_flight.update(lease for lease, _ in batch)
            if not batch:
                return True
            items = [(lease, pending.outcome) for lease, pending in batch]
            events = [pending.event for _, pending in batch]
            accepted = self._health.call("finish", lambda: self._store().queue.finish(items))
            with self._cond:
                self._in_flight.clear()
                if not isinstance(accepted, Failed):
                    for lease, _ in items:
                        self._items.pop(lease, None)
                if self._closing.is_set():
                    self._cond.notify_all()  # close() waits for the outbox to empty
            if isinstance(accepted, Failed):
                return False
        finally:
            self._flushing.release()
        if self._on_recorded is not None:
            self._on_recorded(
                [e for e, ok in zip(events, accepted, strict=False) if ok and e is not None]
            )
        self._tally(items, accepted, events)
        return True

    def _run(self) -> None:
        backoff = Backoff()
        while not self._abandoned.is_set():
            with self._cond:
                while not self._items and not self._abandoned.is_set():
                    if self._closing.is_set():
                        return
                    self._cond.wait(IDLE_WAKE_S)
            try:
                flushed = self._flush(blocking=True)
            except Exception:  # a bug in tallying must not kill the finisher
                log.exception("unexpected error recording outcomes; retrying")
                flushed = False
            if flushed is False:
                self._abandoned.wait(backoff.next())
            else:
                backoff.reset()
