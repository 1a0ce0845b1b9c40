"""Detecting a wiped or replaced space: the worker stops instead of serving an empty one.

A space can vanish under a running worker: ``FLUSHALL``, a Redis restarted
without persistence, a SQLite file deleted and created anew. Its tasks are
gone, and a worker that carried on would report work into a space that never
heard of it, or quietly run a new, empty one. So the worker calls
``store.check_space()``:

- when a store call succeeds again after an outage (on the next tick),
- whenever a reply says leases it held are gone (renew reports ``lost``, a
  finish or a progress report is refused as stale),
- with every heartbeat (one identity read per heartbeat interval: a replaced
  SQLite file answers every call of a connection opened before, so no reply
  would ever say so).

Guarantees: on :class:`~taskspace.errors.SpaceLost` (from that check or any
other store call) the worker logs one CRITICAL line, ``the space at URL was
wiped or replaced; N tasks this worker held are gone``, stops claiming,
abandons its attempts without a finish (nothing is written into the new
space), and :meth:`Worker.run` returns a report with ``space_lost`` set; the
``taskspace worker`` command then exits with :data:`EXIT_SPACE_LOST`. A check
that finds the space intact changes nothing: a stale finish on a healthy
space is logged as stale, and the worker carries on. A check that cannot
reach the backend is an outage like any other (its end asks for a check).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import TYPE_CHECKING

from taskspace.backends import display_url
from taskspace.errors import SpaceLost
from taskspace.worker import execution as ex
from taskspace.worker.config import EXIT_SPACE_LOST

if TYPE_CHECKING:
    from taskspace.worker.worker import Worker

log = logging.getLogger("taskspace.worker")


class SpaceGuard:
    """The space checks of one worker, and what happens once the space is lost."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.lost: SpaceLost | None = None
        self._due = threading.Event()
        self._lock = threading.Lock()

    def request(self) -> None:
        """Ask for a check on the next tick (the end of an outage calls this)."""
        self._due.set()

    def run_if_due(self) -> None:
        """Run a requested check (from the ticker thread)."""
        if self._due.is_set():
            self._due.clear()
            self.check("reconnect")

    def check(self, why: str, holding: Collection[str] = ()) -> bool:
        """``store.check_space()``; True if the space is lost (the worker is then
        stopping). ``holding``: ids of tasks the reply that prompted the check
        was about, counted as held. A check that fails otherwise is an outage."""
        if self.lost is not None:
            return True
        step = f"check_space ({why})"
        try:
            self.w.store.check_space()
        except SpaceLost as exc:
            self.gone(exc, holding)
            return True
        except Exception as exc:  # noqa: BLE001 - an outage, as in BackendHealth.call
            self.w.health.failed(step, exc)
            return False
        self.w.health.ok(step)
        return False

    def on_space_lost(self, exc: SpaceLost) -> None:
        """A store call raised SpaceLost (``BackendHealth.on_space_lost``)."""
        self.gone(exc)

    def gone(self, exc: SpaceLost, holding: Collection[str] = ()) -> None:
        """Log once, abandon every attempt and pending outcome, and stop the worker."""
        with self._lock:
            first = not self.w.report.space_lost
            self.lost = exc
            self.w.report.space_lost = True
        if not first:
            return
        w = self.w
        attempts = w._snapshot()
        held = {a.record.id for a in attempts} | w._outbox.discard_all() | set(holding)
        w.report.abandoned += len(held)
        log.critical(
            "the space at %s was wiped or replaced; %d tasks this worker held are gone"
            " (%s); stopping with exit code %d",
            display_url(w.space.url), len(held), exc, EXIT_SPACE_LOST,
            extra={"worker": w.name},
        )  # fmt: skip
        for attempt in attempts:
            attempt.ctx.lose_lease()
            ex.kill_process(attempt)
            if attempt.aio_task is not None and w._loop is not None:
                w._loop.call_soon_threadsafe(attempt.aio_task.cancel)
            w._settle(attempt, None, inline=False)
        w.stop(0.0)
