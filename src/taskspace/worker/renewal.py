"""Renewal: the worker's own thread that keeps its leases, and what it learns on renew.

Guarantees:

- Every running attempt's lease, and the lease of every outcome still waiting
  in the outbox, is renewed in one store call at a third of the shortest
  lease, on this thread alone (with a Redis client of its own), so no slow
  maintenance step, finish or claim can delay it.
- A task held twice by this worker (re-claimed after a pause) is renewed by
  its newest lease only; older leases of it are stale by fencing and lost.
- ``lost``: first the space is checked (a wiped space reports every lease
  lost: :mod:`taskspace.worker.spaceguard` then stops the worker). On a
  healthy space the attempt is abandoned, never finished ``cancelled``; its flag
  turns on so cooperative code stops; a process attempt is killed, an async
  one cancelled; a pending outcome of that lease is dropped.
- ``cancel_requested``: the cooperative flag; an async attempt is cancelled
  on its event loop; a process attempt gets SIGTERM (once). Thread attempts
  can only see the flag. ``terminate_requested``: also SIGKILL a process.
- Timeouts are enforced here too (the attempt is settled without a store
  call: the finisher records it).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskspace.backends.base import Lease, LeaseStatus
from taskspace.worker import execution as ex
from taskspace.worker.execution import Attempt
from taskspace.worker.health import Failed

if TYPE_CHECKING:
    from taskspace.worker.worker import Worker

log = logging.getLogger("taskspace.worker")

TICK_S = 0.05


def newest_per_task(leases: Sequence[Lease]) -> tuple[list[Lease], list[Lease]]:
    """Split leases into the newest per task and the older ones (stale by fencing)."""
    newest: dict[str, Lease] = {}
    for lease in leases:
        if lease.task_id not in newest or lease.token > newest[lease.task_id].token:
            newest[lease.task_id] = lease
    keep = set(newest.values())
    return list(keep), [lease for lease in leases if lease not in keep]


class Renewer:
    """The renewal step of one worker (run every tick on its renewer thread)."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.next_renew = 0.0

    def step(self, now: float) -> None:
        self._enforce_deadlines(now)
        if now >= self.next_renew:
            self._renew()
            self.next_renew = now + self._renew_interval()

    def _renew_interval(self) -> float:
        leases = [a.record.lease_s for a in self.w._snapshot()]
        leases += self.w._outbox.leases().values()
        return max(TICK_S, min(leases, default=3.0) / 3.0)

    def _renew(self) -> None:
        """Renew every running attempt and every outcome still waiting to be recorded."""
        attempts = {a.lease: a for a in self.w._snapshot()}
        leases, stale = newest_per_task([*attempts, *self.w._outbox.leases()])
        statuses: dict[str, LeaseStatus] = {}
        if leases:
            store = self.w._renew_store or self.w.store
            renewed = self.w.health.call("renew", lambda: store.queue.renew(leases))
            if isinstance(renewed, Failed):
                return
            statuses = renewed
        lost = [lease for lease in leases if statuses.get(lease.task_id) == "lost"]
        if lost and self.w.guard.check("lease lost", [lease.task_id for lease in lost]):
            return  # the space is gone: the guard abandoned everything
        for lease in [*stale, *lost]:
            self._lost(lease, attempts.get(lease))
        for lease in leases:
            status = statuses.get(lease.task_id)
            attempt = attempts.get(lease)
            if attempt is not None and status in ("cancel_requested", "terminate_requested"):
                self._cancel(attempt, terminate=status == "terminate_requested")

    def _lost(self, lease: Lease, attempt: Attempt | None) -> None:
        if self.w._outbox.drop(lease):
            log.warning(
                "lease of task %s lost before its outcome was recorded (worker %s)",
                lease.task_id, self.w.name, extra={"task_id": lease.task_id, "worker": self.w.name},
            )  # fmt: skip
        if attempt is None or attempt.settled or attempt.ctx.lease_lost:
            return
        attempt.ctx.lose_lease()
        self.w.report.leases_lost += 1
        log.warning(
            "lease of task %s lost (worker %s): abandoning the attempt",
            lease.task_id, self.w.name, extra={"task_id": lease.task_id, "worker": self.w.name},
        )  # fmt: skip
        if attempt.process is not None:
            ex.kill_process(attempt)
            self.w._settle(attempt, None, inline=False)
        elif attempt.aio_task is not None and self.w._loop is not None:
            self.w._loop.call_soon_threadsafe(attempt.aio_task.cancel)

    def _cancel(self, attempt: Attempt, terminate: bool) -> None:
        """A cancel request: the flag for every attempt, and for async and process
        ones a real stop (asyncio cancel; SIGTERM, or SIGKILL with ``terminate``)."""
        if attempt.settled:
            return
        attempt.ctx.cancel()
        if attempt.process is not None:
            if terminate:
                ex.kill_process(attempt)
            elif not attempt.cancel_sent:
                attempt.cancel_sent = ex.signal_process(attempt, signal.SIGTERM)
        elif attempt.aio_task is not None and self.w._loop is not None and not attempt.cancel_sent:
            attempt.cancel_sent = True
            self.w._loop.call_soon_threadsafe(attempt.aio_task.cancel)

    def _enforce_deadlines(self, now: float) -> None:
        for attempt in self.w._snapshot():
            if attempt.deadline is None or now < attempt.deadline:
                continue
            attempt.ctx.stop()
            ex.kill_process(attempt)
            if attempt.process is None and attempt.task.isolation == "thread":
                attempt.timed_out = True
                with self.w._cond:
                    self.w._zombies += 1
            if self.w._settle(attempt, ex.timeout_outcome(attempt), inline=False):
                self._check_wedged()
            elif attempt.timed_out:
                with self.w._cond:
                    self.w._zombies -= 1

    def _check_wedged(self) -> None:
        if self.w._zombies >= self.w.config.concurrency:
            # Every slot holds a thread stuck past its timeout: this process can do no
            # more work. Exit (non-zero) so a supervisor starts a fresh one.
            log.error(
                "worker %s: all %d slots hold tasks stuck past their timeout; stopping",
                self.w.name, self.w.config.concurrency, extra={"worker": self.w.name},
            )  # fmt: skip
            self.w.report.wedged = True
            self.w.stop(0.0)
