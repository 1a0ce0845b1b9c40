"""StreamStore of the SQLite backend: one table of entries, ids from one
AUTOINCREMENT sequence (so never reused, also after a trim)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from taskspace.backends.base import StreamEntry
from taskspace.backends.checks import (
    check_append,
    check_read,
    check_trim,
)
from taskspace.backends.sqlite.base import SQLiteConn
from taskspace.backends.sqlite.waiter import Waiter


class SQLiteStreams:
    """Append-only streams; an entry's time is the wall clock of its append."""

    def __init__(self, conn: SQLiteConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        return self.append_many(stream, [data], maxlen)[0]

    def append_many(
        self,
        stream: str,
        items: Sequence[bytes],
        maxlen: int | None = None,
        request_id: str | None = None,
    ) -> list[int]:
        check_append(stream, maxlen)
        if not items:
            return []
        # request_id needs no handling: a local transaction's reply cannot be lost.
        with self._c.write() as db:
            wall = self._c.clock.wall()
            ids = [
                int(
                    db.execute(
                        "INSERT INTO stream_entries (stream, data, time) VALUES (?, ?, ?)"
                        " RETURNING id",
                        (stream, data, wall),
                    ).fetchone()[0]
                )
                for data in items
            ]
            if maxlen is not None:
                self._trim_maxlen(db, stream, maxlen)
            return ids

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        check_read(stream, limit, wait)
        found: list[StreamEntry] = []

        def ready() -> float | None:
            rows = self._c.read(
                "SELECT id, data, time FROM stream_entries WHERE stream = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (stream, after, limit),
            )
            found.extend(StreamEntry(int(i), d, t) for i, d, t in rows)
            return None if found else wait

        if wait > 0:
            self._waiter.until(ready, wait)
        else:
            ready()
        return found

    @staticmethod
    def _trim_maxlen(db: sqlite3.Connection, stream: str, maxlen: int) -> int:
        cur = db.execute(
            "DELETE FROM stream_entries WHERE stream = ? AND id <= (SELECT id FROM stream_entries"
            " WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (stream, stream, maxlen),
        )
        return cur.rowcount

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        check_trim(stream, maxlen, max_age)
        dropped = 0
        with self._c.write() as db:
            if maxlen is not None:
                dropped += self._trim_maxlen(db, stream, maxlen)
            if min_id is not None:
                cur = db.execute(
                    "DELETE FROM stream_entries WHERE stream = ? AND id < ?", (stream, min_id)
                )
                dropped += cur.rowcount
            if max_age is not None:
                cur = db.execute(
                    "DELETE FROM stream_entries WHERE stream = ? AND time < ?",
                    (stream, self._c.clock.wall() - max_age),
                )
                dropped += cur.rowcount
        return dropped
