"""PubSub on Redis (contract v2; work in progress)."""

from __future__ import annotations

from collections.abc import Sequence

from taskspace.backends.redis.conn import RedisConnection
from taskspace.backends.redis.subscription import RedisSubscription


class RedisPubSub:
    """Best-effort broadcast (see base.PubSub)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def publish(self, channel: str, data: bytes) -> None:
        conn = self._conn
        conn.call(lambda: conn.client.publish(f"{conn.prefix}ch:{channel}", data))

    def subscribe(
        self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> RedisSubscription:
        return RedisSubscription(self._conn, channels)
