"""A PubSub subscription on its own connection, that says when it lost it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from taskspace.backends.base import Closeable, Message
from taskspace.backends.redis.conn import CONNECT_TIMEOUT_S, RedisConnection
from taskspace.errors import BackendError, SubscriptionLost

FOREVER_S = 1e6


class RedisSubscription(Closeable):
    """Channels subscribed on a dedicated connection (not redis-py's PubSub,
    which reconnects silently and so would hide missed messages).

    When the connection drops, :meth:`get` raises SubscriptionLost once; later
    calls resubscribe (raising BackendError while Redis is away, within the
    timeout given) and then deliver what is published after that."""

    def __init__(self, conn: RedisConnection, channels: Sequence[str]) -> None:
        self._conn = conn
        self._prefix = conn.prefix + "ch:"
        self._names = list(dict.fromkeys(self._prefix + c for c in channels))
        self._sock: Any = None
        self._closed = False
        conn.call(lambda: self._connect(CONNECT_TIMEOUT_S))

    def _connect(self, connect_timeout: float) -> None:
        """Open a connection and subscribe; returns once every channel is confirmed,
        so anything published after that is delivered."""
        pool = self._conn.client.connection_pool
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0}
        kwargs["socket_connect_timeout"] = max(0.05, connect_timeout)
        sock = pool.connection_class(**kwargs)
        try:
            sock.connect()
            sock.send_command("SUBSCRIBE", *self._names)
            confirmed = 0
            while confirmed < len(self._names):
                reply = sock.read_response(push_request=True)
                if reply[0] in (b"subscribe", "subscribe"):
                    confirmed += 1
        except BaseException:
            sock.disconnect()
            raise
        self._sock = sock

    def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        deadline = time.monotonic() + (FOREVER_S if timeout is None else timeout)
        if self._sock is None:
            wait = FOREVER_S if timeout is None else timeout
            self._conn.call(lambda: self._connect(min(CONNECT_TIMEOUT_S, wait)))
        while True:
            try:
                reply = self._read(max(0.0, deadline - time.monotonic()))
            except BackendError:
                self._drop()
                raise SubscriptionLost(
                    f"subscription to Redis at {self._conn.url} lost its connection; "
                    "messages may have been missed"
                ) from None
            if reply is not None:
                return reply
            if time.monotonic() >= deadline:
                return None

    def _read(self, timeout: float) -> Message | None:
        """The next message within ``timeout``, or None (also for a non-message reply)."""
        sock = self._sock

        def read() -> Any:
            return sock.read_response(push_request=True) if sock.can_read(timeout=timeout) else None

        reply = self._conn.call(read)
        if not reply or reply[0] not in (b"message", "message"):
            return None
        channel = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return Message(channel[len(self._prefix) :], reply[2])

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone
                sock.disconnect()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()
