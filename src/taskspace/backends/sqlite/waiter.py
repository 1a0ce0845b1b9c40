"""Waiting for commits: backoff polling of ``PRAGMA data_version``, woken at once
by commits made in the same process."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from taskspace.backends.sqlite.base import SQLiteConn


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class Waiter:
    """Backoff polling of ``PRAGMA data_version`` (a read of shared memory that
    changes when another connection commits), capped at ``poll_ms``; a commit in
    this process ends a wait at once."""

    def __init__(self, conn: SQLiteConn) -> None:
        self._c = conn

    def baseline(self) -> None:
        """Note the data version before a caller checks the database, so that a
        commit by another connection after the check ends the next wait."""
        local = self._c.local
        if getattr(local, "data_version", None) is None:
            local.data_version = self._c.reading(_data_version)

    def wait(self, timeout: float) -> None:
        """Return when another connection committed, a local commit happened, or
        ``timeout`` passed; driver errors become BackendError."""
        c = self._c
        deadline = time.monotonic() + timeout
        delay = 0.0002
        seen = getattr(c.local, "data_version", None)
        while True:
            version = c.reading(_data_version)
            if seen is not None and version != seen:
                break
            seen = version
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if c.wait_commit(min(delay, remaining)):
                break
            delay = min(delay * 2, c.settings.poll_ms / 1000.0)
        c.local.data_version = c.reading(_data_version)

    def until(self, ready: Callable[[], float | None], timeout: float) -> None:
        """Block until ``ready()`` returns None (done) or ``timeout`` passes.

        ``ready`` checks the database and returns None when the wait is over, or
        how many more seconds at most to wait (an expiry that ends it); it is
        called again after every commit."""
        if timeout < 0:
            return
        deadline = time.monotonic() + timeout
        while True:
            self.baseline()
            cap = ready()
            if cap is None:
                return
            remaining = min(deadline - time.monotonic(), cap)
            if remaining <= 0:
                return
            self.wait(remaining)
            if time.monotonic() >= deadline:
                return
