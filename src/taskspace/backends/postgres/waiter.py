"""Waking waiters with LISTEN/NOTIFY: one listening connection per store (per
process) feeding a condition variable; never a sleep-poll.

Protocol (no lost wake-up): a waiter (1) notes the notification counter, (2)
registers its keys in the UNLOGGED table ``waiters`` (``until`` = server
time it may still wait) and commits, (3) checks the database (``ready``),
(4) sleeps on the condition until a notification for one of its keys
arrives. A writer, AFTER its write committed, runs one statement that
NOTIFYs the keys with a live row in ``waiters`` (NOTIFY_SQL), so a burst of
submits with nobody idle pays one index probe, never a NOTIFY. Why after:
under MVCC a check inside the writing transaction may run on a snapshot
older than a registration while the waiter's check runs before the write
commits, and both miss; with the writer's check after its commit, either
it sees the registration or the waiter's check (after the registration
committed) sees the write. The after-commit statement rides in the same
round trip as the write where it can (``conn.pipeline``), else it follows
the COMMIT (``PgConn.after_commit``). A push in a caller's own transaction
cannot check after the caller's commit: it NOTIFYs its keys unconditionally
(delivered at that commit).

Keys: ``q:<queue>`` (a task became ready in the queue), ``q:<queue>\\n<name>``
(of that name), ``done:<task id>`` (a task ended); PGSTATE's protocols use
keys of their own. All share one channel per schema (``channel_name``).

Faults: the listener thread reconnects with backoff and never dies of an
exception; every (re)connection, and every loss of it, wakes every waiter,
which re-checks. While it is away waits degrade to polling every
POLL_WITHOUT_LISTENER_S, so nothing waits past a wake-up for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskspace.backends.postgres.conn import PgConn

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("taskspace.backends.postgres")

POLL_WITHOUT_LISTENER_S = 0.5
# A registration outlives the wait it was made for by this much (a waiter
# re-checks more often than that, so it never misses a wake-up between steps).
REGISTER_SLACK_S = 2.0
# Keys remembered per notification counter before the table is reset (a
# reset wakes every waiter, which re-checks: nothing is missed).
MAX_KEYS = 20_000
RECONNECT_MAX_S = 2.0

# Writers: NOTIFY each key of %(keys)s (text[]) that someone may be waiting on.
NOTIFY_SQL = (
    "SELECT count(pg_notify(%(channel)s, key)) FROM waiters"
    " WHERE key = ANY(%(keys)s::text[]) AND until > extract(epoch FROM clock_timestamp())"
)
# A caller's own transaction: NOTIFY every key (delivered at its commit).
NOTIFY_ALL_SQL = "SELECT count(pg_notify(%(channel)s, k)) FROM unnest(%(keys)s::text[]) AS k"
# Waiters: register (or extend) interest in each key for %(seconds)s.
REGISTER_SQL = (
    "INSERT INTO waiters SELECT k, extract(epoch FROM clock_timestamp()) + %(seconds)s"
    " FROM unnest(%(keys)s::text[]) AS k"
    " ON CONFLICT (key) DO UPDATE SET until = GREATEST(waiters.until, excluded.until)"
)
# Reaping: registrations long past (maintenance, queue.reap).
REAP_SQL = "DELETE FROM waiters WHERE until < extract(epoch FROM clock_timestamp()) - 60"


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema's waiters (at most 63 bytes)."""
    return f"tw_{schema}"[:63]


class Waiter:
    """The listener of one store and the waits built on it (see the module
    docstring). Thread-safe; one listening connection, opened on first wait."""

    def __init__(self, conn: PgConn) -> None:
        self._c = conn
        self.channel = channel_name(conn.schema)
        self._cond = threading.Condition()
        self._counter = 0  # notifications seen
        self._seen: dict[str, int] = {}  # key -> counter at its last notification
        self._epoch = 0  # bumped on (re)connect, loss and reset: wakes everyone
        self._listening = False
        self._thread: threading.Thread | None = None
        self._closed = False
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._registered: dict[str, float] = {}  # key -> monotonic time it lapses
        conn.on_commit = self._after_commit

    # -- writers -------------------------------------------------------------------

    def notify(self, cur: psycopg.Cursor[Any], keys: Sequence[str]) -> None:
        """Wake the waiters of ``keys`` once the transaction of ``cur`` commits:
        in a :meth:`PgConn.run` / ``transaction`` the check runs after the
        COMMIT; on a caller's own connection the NOTIFYs are unconditional
        (PostgreSQL delivers them at the caller's commit)."""
        if not keys:
            return
        if not self._c.after_commit(cur, keys):
            cur.execute(NOTIFY_ALL_SQL, {"channel": self.channel, "keys": list(keys)})

    def notify_step(self, keys: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """The statement that wakes the waiters of ``keys``: run it (autocommit)
        after the write committed, e.g. as the next step of ``conn.pipeline``."""
        return NOTIFY_SQL, {"channel": self.channel, "keys": list(keys)}

    def _after_commit(self, conn: psycopg.Connection[Any], keys: list[str]) -> None:
        conn.execute(NOTIFY_SQL, {"channel": self.channel, "keys": sorted(set(keys))})

    # -- waiters --------------------------------------------------------------------

    def until(self, keys: Sequence[str], ready: Callable[[], float | None], timeout: float) -> None:
        """Block until ``ready()`` returns None (done), a write NOTIFYs one of
        ``keys`` (the caller re-checks: a notification may be stale), or
        ``timeout`` passes.

        ``ready`` checks the database and returns None when the wait is over,
        or how many more seconds at most to wait (an expiry that ends it); it
        runs again after the listener (re)connects."""
        if timeout < 0:
            return
        deadline = time.monotonic() + timeout
        self._start()
        while True:
            with self._cond:
                mark, epoch = self._counter, self._epoch
            remaining = deadline - time.monotonic()
            self._register(keys, remaining)
            cap = ready()
            if cap is None:
                return
            remaining = min(deadline - time.monotonic(), cap)
            if remaining <= 0:
                return
            if self._sleep(keys, mark, epoch, remaining):
                return  # a write NOTIFYed one of our keys: the caller re-checks itself
            if time.monotonic() >= deadline:
                return

    def _register(self, keys: Sequence[str], remaining: float) -> None:
        """Register interest in ``keys`` for the rest of the wait (skipped for
        keys this store registered for long enough already)."""
        now = time.monotonic()
        need = [k for k in keys if self._registered.get(k, 0.0) < now + remaining]
        if not need:
            return
        seconds = remaining + REGISTER_SLACK_S
        self._c.execute(REGISTER_SQL, {"keys": need, "seconds": seconds})
        lapse = now + seconds - 0.5
        for key in need:
            self._registered[key] = lapse
        if len(self._registered) > MAX_KEYS:
            self._registered = {k: v for k, v in self._registered.items() if v > now}

    def _sleep(self, keys: Sequence[str], mark: int, epoch: int, timeout: float) -> bool:
        """Sleep until a notification of one of ``keys`` (True), a (re)connect
        or ``timeout`` (False: the caller re-checks)."""

        def notified() -> bool:
            return any(self._seen.get(k, 0) > mark for k in keys)

        with self._cond:
            if not self._listening:
                timeout = min(timeout, POLL_WITHOUT_LISTENER_S)
            self._cond.wait_for(lambda: self._epoch != epoch or notified(), timeout)
            return notified()

    def wake_all(self) -> None:
        """End every wait of this store (each re-checks)."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    # -- the listener thread ------------------------------------------------------

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._cond:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(
                target=self._run, name=f"taskspace-pg-listen-{self._c.schema}", daemon=True
            )
            self._thread.start()
            # The first wait registers only once LISTEN is active (or failed).
            self._cond.wait_for(
                lambda: self._listening or self._epoch > 0, self._c.settings.connect_timeout
            )

    def _run(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                self._listen_once()
                delay = 0.05
            except Exception as exc:  # noqa: BLE001 - the thread never dies: log, back off
                if self._closed:
                    return
                log.warning("PostgreSQL listener lost (%s); reconnecting", exc)
            with self._cond:
                self._listening = False
                self._epoch += 1
                self._cond.notify_all()
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _listen_once(self) -> None:
        conn = self._c.dedicated()
        self._listen_conn = conn
        try:
            conn.execute(f'LISTEN "{self.channel}"')
            with self._cond:
                self._listening = True
                # Registrations may be gone (a crash empties UNLOGGED tables): make them again.
                self._registered = {}
                self._epoch += 1  # anything sent while we were away: re-check
                self._cond.notify_all()
            while not self._closed:
                for note in conn.notifies(timeout=1.0):
                    self._deliver(note.payload)
                conn.execute("")  # notice a dead connection within a step
        finally:
            self._listen_conn = None
            conn.close()

    def _deliver(self, key: str) -> None:
        with self._cond:
            self._counter += 1
            if len(self._seen) >= MAX_KEYS:
                self._seen.clear()
                self._epoch += 1
            self._seen[key] = self._counter
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the listener; idempotent."""
        self._closed = True
        conn = self._listen_conn
        if conn is not None:
            try:
                conn.cancel_safe()
            except Exception as exc:  # noqa: BLE001 - closing must never raise
                log.debug("cancelling the listener failed: %s", exc)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self.wake_all()
