"""A PubSub subscription on its own connection that reports what it may have missed.

Not redis-py's PubSub, which reconnects silently and so would hide a gap.
Replies are drained from the socket into a local buffer of at most
base.SUBSCRIPTION_BUFFER messages; past that the oldest are dropped and the
next ``get`` returns ``Gap("overflow", missed=n)``. A lost connection is
re-made at once (within the ``get``'s timeout, at most CONNECT_TIMEOUT_S per
try): once it is subscribed again, ``get`` returns ``Gap("reconnect")`` and
then what is published after it; while Redis stays away ``get`` raises
BackendError (the Gap still comes once it is back).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from taskspace.backends.base import SUBSCRIPTION_BUFFER, Closeable, Gap, Message, MessageBuffer
from taskspace.backends.redis.conn import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, RedisConnection
from taskspace.errors import BackendError

FOREVER_S = 1e9
# get(timeout=None) reads in steps of this long (a healthy idle socket just
# times out a step; the loop goes on).
IDLE_STEP_S = 30.0
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped (matches only itself)."""
    return text.translate(_GLOB)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSubscription(Closeable):
    """Channels (SUBSCRIBE) and prefixes (PSUBSCRIBE of the escaped prefix and
    ``*``) on a dedicated connection; see the module docstring."""

    def __init__(
        self, conn: RedisConnection, channels: Sequence[str], prefixes: Sequence[str]
    ) -> None:
        self._conn = conn
        self._prefix = conn.prefix + "ch:"
        self._names = list(dict.fromkeys(self._prefix + c for c in channels))
        self._patterns = {glob_escape(self._prefix + p) + "*": p for p in prefixes}
        self._sock: Any = None
        self._closed = False
        self._buffer = MessageBuffer()
        if self._names or self._patterns:
            conn.call(lambda: self._connect(CONNECT_TIMEOUT_S))

    def _connect(self, connect_timeout: float) -> None:
        """Open a connection and subscribe; returns once every channel and
        pattern is confirmed, so anything published after that is delivered."""
        pool = self._conn.client.connection_pool
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0}
        kwargs["socket_connect_timeout"] = max(0.05, connect_timeout)
        # Replies (the confirmations, then each message once can_read saw it)
        # come within READ_TIMEOUT_S from a healthy server, not the pool's long timeout.
        kwargs["socket_timeout"] = READ_TIMEOUT_S
        sock = pool.connection_class(**kwargs)
        # The confirmations come within the caller's time (at least 50 ms, at
        # most READ_TIMEOUT_S), else BackendError: a stalled server.
        deadline = time.monotonic() + min(READ_TIMEOUT_S, max(0.05, connect_timeout))
        try:
            sock.connect()
            if self._names:
                sock.send_command("SUBSCRIBE", *self._names)
            if self._patterns:
                sock.send_command("PSUBSCRIBE", *self._patterns)
            confirmed, wanted = 0, len(self._names) + len(self._patterns)
            while confirmed < wanted:
                if not sock.can_read(timeout=max(0.0, deadline - time.monotonic())):
                    raise BackendError(
                        f"Redis at {self._conn.url}: no subscription confirmation "
                        "in time (stalled connection)"
                    )
                reply = sock.read_response(push_request=True)
                if _text(reply[0]) in ("subscribe", "psubscribe"):
                    confirmed += 1
                else:
                    self._take(reply)
        except BaseException:
            sock.disconnect()
            raise
        self._sock = sock

    def _take(self, reply: Any) -> None:
        """Buffer a message reply (dropping the oldest past SUBSCRIPTION_BUFFER)."""
        if not reply:
            return
        kind = _text(reply[0])
        if kind == "message":
            message = Message(_text(reply[1])[len(self._prefix) :], reply[2])
        elif kind == "pmessage":
            channel = _text(reply[2])[len(self._prefix) :]
            message = Message(channel, reply[3], self._patterns.get(_text(reply[1])))
        else:
            return
        self._buffer.push(message, SUBSCRIPTION_BUFFER)

    def _fill(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a reply, then buffer the replies that
        have arrived (reading at most twice SUBSCRIPTION_BUFFER per call, so a
        publisher faster than this reader cannot keep it here). BackendError
        if the connection is lost."""
        sock = self._sock

        def drain() -> None:
            wait = timeout
            for _ in range(2 * SUBSCRIPTION_BUFFER):
                if not sock.can_read(timeout=wait):
                    return
                self._take(sock.read_response(push_request=True))
                wait = 0

        self._conn.call(drain)

    def get(self, timeout: float | None = None) -> Message | Gap | None:
        if self._closed:
            return None
        deadline = time.monotonic() + (FOREVER_S if timeout is None else timeout)
        if not self._names and not self._patterns:
            time.sleep(max(0.0, min(deadline - time.monotonic(), IDLE_STEP_S)))
            return None
        while True:
            item = self._buffer.pop()
            if item is not None:
                return item
            left = max(0.0, deadline - time.monotonic())
            if self._sock is None:
                self._reconnect(left)
                continue
            try:
                self._fill(min(left, IDLE_STEP_S))
            except BackendError:
                self._drop()
                self._reconnect(left)
                continue
            if not self._buffer.pending() and time.monotonic() >= deadline:
                return None

    def _reconnect(self, left: float) -> None:
        """Subscribe again (BackendError while Redis is away); queue the Gap."""
        before = len(self._buffer.items)  # received before the loss: delivered before the Gap
        self._conn.call(lambda: self._connect(min(CONNECT_TIMEOUT_S, max(left, 0.05))))
        self._buffer.items.insert(min(before, len(self._buffer.items)), Gap("reconnect"))

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone
                sock.disconnect()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()
            self._buffer.clear()
