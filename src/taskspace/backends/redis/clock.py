"""The store's clocks on Redis: the server's TIME, never a client's."""

from __future__ import annotations

from taskspace.backends.redis.conn import RedisConnection


class RedisClock:
    """``now()`` is the lease clock every script uses (``clock()`` in
    ``lua/common.lua``): the server's TIME plus the space's offset, kept above
    a high-water mark stored in the space, so it never goes backwards when
    the server's clock steps back. ``wall()`` is the server's TIME as Unix
    epoch seconds. Both raise BackendError when Redis fails."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def now(self) -> float:
        return float(self._conn.run("now", [], read=True))

    def wall(self) -> float:
        conn = self._conn
        seconds, micros = conn.call(conn.reads.time)
        return float(seconds) + float(micros) / 1e6
