"""StreamStore on Redis: append-only logs on Redis Streams.

Each stream is a Redis stream ``s:<name>`` under the space prefix, entry ids
``<n>-0`` from the counter ``sid:<name>``, advanced like fencing tokens
(``max(last + 1, server wall clock in µs)``, ``lua/_stream.lua``): ids never
repeat, also after a trim and across a failover that lost the last appends,
and are not dense. Fields ``d`` (data) and ``t`` (wall clock of the append).
Retention: entries stay until ``trim`` or an append's ``maxlen`` drops them;
the counter stays with the stream's name; request ids of ``append_many`` (``sreq``) are
pruned after REQUEST_ID_TTL_S and capped at 100,000 (``lua/_stream.lua``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from taskspace.backends.base import REQUEST_ID_TTL_S, StreamEntry
from taskspace.backends.checks import (
    check_append,
    check_read,
    check_trim,
)
from taskspace.backends.redis.conn import RedisConnection

# One XREAD BLOCK of a read lasts at most this long (below conn.READ_TIMEOUT_S).
WAIT_STEP_S = 0.5


def _entries(rows: Sequence[Any]) -> list[StreamEntry]:
    return [
        StreamEntry(int(entry_id.split(b"-")[0]), fields[b"d"], float(fields[b"t"]))
        for entry_id, fields in rows
    ]


class RedisStreams:
    """Append-only streams (see base.StreamStore and the module docstring)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def _key(self, stream: str) -> str:
        return f"{self._conn.prefix}s:{stream}"

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
        args = [stream, "" if maxlen is None else int(maxlen), request_id or "",
                repr(REQUEST_ID_TTL_S), *items]  # fmt: skip
        first, n = self._conn.run("stream_append", args)
        return list(range(int(first), int(first) + int(n)))

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        """With ``wait``, blocks in XREAD BLOCK on the reads client, in steps
        of WAIT_STEP_S (an append wakes it at once)."""
        check_read(stream, limit, wait)
        conn, key = self._conn, self._key(stream)
        after = max(0, int(after))
        start = f"{after + 1}-0"
        rows = conn.call(lambda: conn.reads.xrange(key, min=start, count=limit))
        if rows or wait <= 0:
            return _entries(rows)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            block_ms = max(1, int(min(left, WAIT_STEP_S) * 1000))
            reply = self._xread(key, after, limit, block_ms)
            if reply:
                return _entries(reply[0][1])
        return []

    def _xread(self, key: str, after: int, limit: int, block_ms: int) -> Any:
        conn = self._conn
        return conn.call(lambda: conn.reads.xread({key: f"{after}-0"}, count=limit, block=block_ms))

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        check_trim(stream, maxlen, max_age)
        args = [
            stream,
            "" if maxlen is None else int(maxlen),
            "" if min_id is None or min_id <= 1 else int(min_id),
            "" if max_age is None else repr(float(max_age)),
        ]
        dropped, more = self._conn.run("stream_trim", args)
        total = int(dropped)
        while more:  # a long run of old entries: trimmed in steps (see the script)
            dropped, more = self._conn.run("stream_trim", [stream, "", "", args[3]])
            total += int(dropped)
        return total
