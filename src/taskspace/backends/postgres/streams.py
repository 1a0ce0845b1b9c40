"""StreamStore on PostgreSQL: an append-only table of entries and, per stream,
a head row holding the last id handed out.

An append locks the stream's head row (an upsert: the first append creates
it) and takes its ids from it in the same statement: ``first = max(last + 1,
server wall clock in µs)``, as fencing tokens are advanced, so ids increase
within a stream, are never reused (the head row stays after a trim) and never
repeat after a restore or failover that lost the last appends; they are not
dense. Appends to one stream are therefore serialised until commit, so ids
become visible in order: a reader that saw id n never misses an id below n
committed later. ``time`` is the server's wall clock.

A repeated ``request_id`` of ``append_many`` (after a lost reply) returns the
first call's ids: the reply is kept REQUEST_ID_TTL_S (kv.py's request ids),
looked up after the head row is locked. A blocking ``read`` waits through the
waiter (key ``s:<stream>``, which an append NOTIFYs when someone waits on it).
Entries stay until ``trim`` or an append's ``maxlen`` drops them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import StreamEntry
from taskspace.backends.checks import check_append, check_read, check_trim
from taskspace.backends.postgres.clock import WALL_SQL
from taskspace.backends.postgres.kv import _Request

if TYPE_CHECKING:
    import psycopg

    from taskspace.backends.postgres.conn import PgConn
    from taskspace.backends.postgres.waiter import Waiter

REQUESTS = _Request("stream")
W = f"w AS MATERIALIZED (SELECT {WALL_SQL} AS wall)"


def wait_key(stream: str) -> str:
    """The waiter key an append to ``stream`` notifies."""
    return f"s:{stream}"


class PgStreams:
    """Append-only streams (see base.StreamStore and the module docstring)."""

    def __init__(self, conn: PgConn, waiter: Waiter) -> None:
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

        def body(cur: psycopg.Cursor[Any]) -> list[int]:
            if request_id:
                # Lock the head first, so a retry waits for the first call to end.
                cur.execute(
                    "INSERT INTO stream_heads VALUES (%s, 0) ON CONFLICT (stream)"
                    " DO UPDATE SET last_id = stream_heads.last_id",
                    (stream,),
                )
                remembered = REQUESTS.recall(cur, f"{stream}\n{request_id}")
                if remembered is not None:
                    return [int(i) for i in remembered]
            ids = self._append(cur, stream, items)
            if maxlen is not None:
                self._trim_maxlen(cur, stream, maxlen)
            self._waiter.notify(cur, [wait_key(stream)])
            if request_id:
                REQUESTS.remember(cur, f"{stream}\n{request_id}", ids)
            return ids

        return self._c.run(body, "streams.append")

    @staticmethod
    def _append(cur: Any, stream: str, items: Sequence[bytes]) -> list[int]:
        n = len(items)
        cur.execute(
            f"WITH {W},"
            " head AS (INSERT INTO stream_heads AS h (stream, last_id)"
            "  SELECT %(s)s, GREATEST(%(n)s, (w.wall * 1000000)::bigint + %(n)s - 1) FROM w"
            "  ON CONFLICT (stream) DO UPDATE SET last_id = GREATEST(h.last_id + %(n)s,"
            "  EXCLUDED.last_id) RETURNING last_id),"
            " ins AS (INSERT INTO stream_entries (stream, id, data, time)"
            "  SELECT %(s)s, head.last_id - %(n)s + d.ord, d.data, w.wall"
            "  FROM head, w, unnest(%(items)s::bytea[]) WITH ORDINALITY AS d(data, ord))"
            " SELECT last_id FROM head",
            {"s": stream, "n": n, "items": list(items)},
        )
        last = int(cur.fetchone()[0])
        return list(range(last - n + 1, last + 1))

    @staticmethod
    def _trim_maxlen(cur: Any, stream: str, maxlen: int) -> int:
        cur.execute(
            "DELETE FROM stream_entries WHERE stream = %s AND id <= (SELECT id FROM"
            " stream_entries WHERE stream = %s ORDER BY id DESC LIMIT 1 OFFSET %s)",
            (stream, stream, maxlen),
        )
        return int(cur.rowcount)

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        check_read(stream, limit, wait)
        found: list[StreamEntry] = []

        def ready() -> float | None:
            rows = self._c.read(
                "SELECT id, data, time FROM stream_entries WHERE stream = %s AND id > %s"
                " ORDER BY id LIMIT %s",
                (stream, after, limit),
            )
            found.extend(StreamEntry(int(i), bytes(d), float(t)) for i, d, t in rows)
            return None if found else wait

        if wait <= 0:
            ready()
            return found
        deadline = time.monotonic() + wait
        # until() returns on a NOTIFY of the key (maybe for entries another
        # reader's limit or position left out): checked again until the wait ends.
        while not found and (left := deadline - time.monotonic()) > 0:
            self._waiter.until([wait_key(stream)], ready, left)
        return found

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        check_trim(stream, maxlen, max_age)

        def body(cur: psycopg.Cursor[Any]) -> int:
            dropped = 0
            if maxlen is not None:
                dropped += self._trim_maxlen(cur, stream, maxlen)
            if min_id is not None:
                cur.execute(
                    "DELETE FROM stream_entries WHERE stream = %s AND id < %s", (stream, min_id)
                )
                dropped += int(cur.rowcount)
            if max_age is not None:
                cur.execute(
                    f"WITH {W} DELETE FROM stream_entries USING w"
                    " WHERE stream = %s AND time < w.wall - %s",
                    (stream, max_age),
                )
                dropped += int(cur.rowcount)
            return dropped

        return self._c.run(body, "streams.trim")
