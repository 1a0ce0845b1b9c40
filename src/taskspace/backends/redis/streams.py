"""StreamStore on Redis (contract v2; work in progress)."""

from __future__ import annotations

from collections.abc import Sequence

from taskspace.backends.base import StreamEntry
from taskspace.backends.redis.conn import RedisConnection


class RedisStreams:
    """Append-only streams (see base.StreamStore)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        return int(self._conn.run("append", [stream, data, "" if maxlen is None else maxlen]))

    def append_many(
        self,
        stream: str,
        items: Sequence[bytes],
        maxlen: int | None = None,
        request_id: str | None = None,
    ) -> list[int]:
        return [self.append(stream, item, maxlen) for item in items]

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        conn = self._conn
        key = f"{conn.prefix}s:{stream}"
        rows = conn.call(lambda: conn.reads.xrange(key, min=f"{after + 1}-0", count=limit))
        return [
            StreamEntry(int(entry_id.split(b"-")[0]), fields[b"d"], float(fields[b"t"]))
            for entry_id, fields in rows
        ]

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        conn = self._conn
        key = f"{conn.prefix}s:{stream}"
        return int(conn.call(lambda: conn.client.xtrim(key, maxlen=maxlen, approximate=False)))
