"""PubSub on Redis: PUBLISH to ``ch:<channel>`` under the space prefix;
subscriptions in ``subscription.py``. Nothing is stored."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from taskspace.backends.redis.conn import RedisConnection
from taskspace.backends.redis.subscription import RedisSubscription
from taskspace.errors import ConfigError


class RedisPubSub:
    """Best-effort broadcast (see base.PubSub): a subscriber told of every
    possible loss by a Gap."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._subs: weakref.WeakSet[RedisSubscription] = weakref.WeakSet()

    def publish(self, channel: str, data: bytes) -> None:
        if not isinstance(channel, str):
            raise ConfigError(f"channel={channel!r}: must be a string")
        conn = self._conn
        conn.call(lambda: conn.client.publish(f"{conn.prefix}ch:{channel}", data))

    def subscribe(
        self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> RedisSubscription:
        if isinstance(channels, str) or isinstance(prefixes, str):
            raise ConfigError(f"subscribe({channels!r}, {prefixes!r}): pass sequences of names")
        for name in (*channels, *prefixes):
            if not isinstance(name, str):
                raise ConfigError(f"channel or prefix {name!r}: must be a string")
        sub = RedisSubscription(self._conn, channels, prefixes)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """Close every subscription made through this object; idempotent."""
        for sub in list(self._subs):
            sub.close()
