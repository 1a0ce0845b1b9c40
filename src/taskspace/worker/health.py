"""How a worker rides out backend outages: one tracker of the backend's
health, shared by every thread of the worker, and a backoff.

Guarantee: an outage is logged once, as a WARNING ("backend unreachable,
retrying") when the first store call fails, and its end once, as an INFO
("reconnected after 5.2 s") when a call succeeds again; the retries in
between log at DEBUG only. Nothing here ever gives up on an outage: callers retry with
:class:`Backoff` until they succeed or have a reason of their own to stop
(shutdown, a lost lease).

Two events are reported to the worker instead: the end of an outage
(``on_reconnect``: the worker then checks that its space is still the one it
opened) and :class:`~taskspace.errors.SpaceLost` raised by any store call
(``on_space_lost``: never an outage to ride out, the worker stops).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from taskspace.errors import SpaceLost

log = logging.getLogger("taskspace.worker")
T = TypeVar("T")

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0
# A kind of call that failed but was not retried for this long counts as recovered.
STALE_S = 5.0


class Failed:
    """The result of a store call that raised (see :meth:`BackendHealth.call`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = Failed()


class BackendHealth:
    """Whether the backend answers, as the worker's store calls last saw it.

    An outage begins when a store call fails while none was failing, and ends
    when every kind of call (``step``) that failed has succeeded since (a step
    not retried for STALE_S counts as recovered), so a backend that fails only
    some calls (a full disk fails writes) is one outage, not one per retry."""

    def __init__(
        self,
        worker: str,
        on_reconnect: Callable[[], None] | None = None,
        on_space_lost: Callable[[SpaceLost], None] | None = None,
    ) -> None:
        self.worker = worker
        self.on_reconnect = on_reconnect
        self.on_space_lost = on_space_lost
        self._failing: dict[str, float] = {}  # step -> monotonic time of its last failure
        self._since = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        """True while some kind of store call fails."""
        return bool(self._failing)

    def call(self, step: str, op: Callable[[], T]) -> T | Failed:
        """Run one store operation; FAILED if it raised: SpaceLost goes to
        ``on_space_lost``, anything else is logged as an outage."""
        try:
            value = op()
        except SpaceLost as exc:
            if self.on_space_lost is None:
                raise
            self.on_space_lost(exc)
            return FAILED
        except Exception as exc:  # noqa: BLE001 - any store failure (a driver error that
            # escaped its backend included) is an outage to ride out, never a thread's death
            self.failed(step, exc)
            return FAILED
        self.ok(step)
        return value

    def failed(self, step: str, exc: BaseException) -> None:
        """Record a failed store call; the first of an outage logs a WARNING."""
        now = time.monotonic()
        with self._lock:
            first = not self._failing
            if first:
                self._since = now
            self._failing[step] = now
        if first:
            log.warning(
                "backend unreachable, retrying (backend error in %s: %s: %s)",
                step,
                type(exc).__name__,
                exc,
                extra={"worker": self.worker},
            )
        else:
            log.debug("backend still unreachable (%s: %s)", step, exc)

    def ok(self, step: str) -> None:
        """Record a successful store call; the one that ends an outage logs an INFO."""
        if not self._failing:  # the hot path: no lock while healthy
            return
        now = time.monotonic()
        with self._lock:
            if not self._failing:
                return
            self._failing.pop(step, None)
            for stale in [s for s, at in self._failing.items() if now - at > STALE_S]:
                del self._failing[stale]
            if self._failing:
                return
        log.info("reconnected after %.1f s", now - self._since, extra={"worker": self.worker})
        if self.on_reconnect is not None:
            self.on_reconnect()


class Backoff:
    """Exponential delays between retries, reset by a success."""

    def __init__(self, start: float = BACKOFF_START_S, cap: float = BACKOFF_MAX_S) -> None:
        self.start = start
        self.cap = cap
        self.delay = start

    def next(self) -> float:
        """The delay to wait now; the following one is twice as long (up to the cap)."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.start
