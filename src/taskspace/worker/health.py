"""How a worker rides out backend outages: one tracker of the backend's
health, shared by every thread of the worker, and a backoff.

Guarantee: an outage is logged once, as a WARNING ("backend unreachable,
retrying") when the first store call fails, and its end once, as an INFO
("reconnected after 5.2 s") when a call succeeds again; the retries in
between log at DEBUG only. Nothing here ever gives up: callers retry with
:class:`Backoff` until they succeed or have a reason of their own to stop
(shutdown, a lost lease).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("taskspace.worker")
T = TypeVar("T")

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


class Failed:
    """The result of a store call that raised (see :meth:`BackendHealth.call`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = Failed()


class BackendHealth:
    """Whether the backend answers, as the worker's store calls last saw it."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        """True between a failed store call and the next successful one."""
        return self._down_since is not None

    def call(self, step: str, op: Callable[[], T]) -> T | Failed:
        """Run one store operation; FAILED (logged as an outage) if it raised anything."""
        try:
            value = op()
        except Exception as exc:  # noqa: BLE001 - any store failure (a driver error that
            # escaped its backend included) is an outage to ride out, never a thread's death
            self.failed(step, exc)
            return FAILED
        self.ok()
        return value

    def failed(self, step: str, exc: BaseException) -> None:
        """Record a failed store call; the first of an outage logs a WARNING."""
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
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

    def ok(self) -> None:
        """Record a successful store call; the first after an outage logs an INFO."""
        if self._down_since is None:  # the hot path: no lock while healthy
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info(
                "reconnected after %.1f s",
                time.monotonic() - since,
                extra={"worker": self.worker},
            )


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
