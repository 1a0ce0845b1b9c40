"""Embedded backend on one SQLite file: safe for many processes on one host.

Atomicity: every write runs in one ``BEGIN IMMEDIATE`` transaction, which
takes SQLite's write lock up front, so read-decide-write sequences (claim,
fenced finish, compare-and-set) cannot interleave with another writer.

Durability: WAL journal. ``synchronous=normal`` (the default) survives any
process crash, including SIGKILL mid-transaction; ``synchronous=full``
(``sqlite:///path.db?synchronous=full``) also survives power loss, at the
cost of an fsync per commit.

Errors: every driver error becomes :class:`~taskspace.errors.BackendError`
naming the cause (a full disk, a lock held too long); a connection a failure
left in an unknown state is replaced, so the store works again as soon as the
cause is gone.

Clock: the host's CLOCK_MONOTONIC (shared by every process on the host and
immune to wall-clock jumps) plus an offset stored in the file. Write
transactions keep a high-water mark of the clock in the file, ahead of every
time they used. The file also records the kernel's boot id; opened after a
reboot, the clock restarts from the high-water mark — delays and TTLs keep
their remaining time, give or take the downtime — and every lease is expired,
so a reset monotonic clock can never make a lease valid twice.

Wake-ups: idle workers and result waiters poll ``PRAGMA data_version`` (a
read of shared memory that changes when another connection commits) with a
short backoff capped at ``poll_ms``, and are woken at once by commits made
in the same process.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Self

from taskspace.backends.sqlite.base import BOOT_ID_PATH, SQLiteSettings, boot_id
from taskspace.backends.sqlite.other import SQLiteOther, SQLiteSubscription, Waiter
from taskspace.backends.sqlite.queue import SQLiteQueue


class SQLiteStore(SQLiteQueue, SQLiteOther):
    """All five store protocols on one SQLite file (see the module docstring)."""

    # Transitional: callers use ``store.queue`` and ``store.clock`` (contract v2)
    # while the per-protocol objects are being built.
    @property
    def queue(self) -> Self:
        return self

    @property
    def clock(self) -> Self:
        return self

    def __init__(self, settings: SQLiteSettings, url: str, clock: Any = None) -> None:
        super().__init__(settings, url)  # TODO(contract v2): use an injected clock
        self._waiter = Waiter(self)

    def reap(self, limit: int = 1000) -> int:
        with self._write() as db:
            now = self.now()
            deleted = self._reap_tasks(db, now, limit)
            return deleted + self._reap_kv(db, now, limit - deleted)

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        """As the contract says; ``names`` (an extension): only tasks of these names
        count as claimable, so a worker that claims by name does not spin while
        other apps' tasks wait in its queues."""
        queue_list = list(dict.fromkeys(queues))
        if queue_list:
            self._waiter.baseline()
            if self._any_ready(queue_list, names):
                return  # a task is claimable already
            due = self._read(
                "SELECT MIN(ready_at) FROM tasks WHERE state = 'queued' AND waiting = 1"
            )[0][0]
            if due is not None:
                until_due = due - self.now()
                if until_due <= 0:
                    return  # the next claim promotes it
                timeout = min(timeout, until_due)
        self._waiter.wait(timeout)

    def _any_ready(self, queues: list[str], names: Collection[str] | None) -> bool:
        sql = "SELECT 1 FROM tasks WHERE state = 'queued' AND waiting = 0"
        sql += f" AND queue IN ({','.join('?' * len(queues))})"
        params = list(queues)
        if names is not None:
            sql += f" AND name IN ({','.join('?' * len(names))})"
            params += list(names)
        return bool(self._read(sql + " LIMIT 1", params))

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        ids = list(dict.fromkeys(task_ids))
        if ids:
            self._waiter.baseline()
            marks = ",".join("?" * len(ids))
            live = self._read(
                f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks})"
                " AND state IN ('queued', 'running')",
                ids,
            )[0][0]
            if live < len(ids):
                return  # one of them has ended (or does not exist) already
        self._waiter.wait(timeout)


__all__ = [
    "BOOT_ID_PATH",
    "SQLiteSettings",
    "SQLiteStore",
    "SQLiteSubscription",
    "boot_id",
]
