"""PubSub of the in-process backend.

Guarantees: a message is delivered to every subscription that exists when it
is published, in one global publish order (delivery happens under the space's
lock); a subscription to a channel gets ``Message(pattern=None)``, one to a
prefix of it ``Message(pattern=prefix)`` (both, as Redis does, when both
match). A subscription buffers at most SUBSCRIPTION_BUFFER undelivered
messages; past that it drops the oldest and its next ``get`` returns
``Gap("overflow", missed=n)`` before the messages that remain. Nothing here
can disconnect, so there is never a ``Gap("reconnect")``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from taskspace.backends.base import SUBSCRIPTION_BUFFER, Closeable, Gap, Message, MessageBuffer
from taskspace.backends.memory.state import MemoryState
from taskspace.errors import ConfigError


class MemorySubscription(Closeable):
    """A subscription delivered to by ``publish`` in the same process."""

    def __init__(
        self, owner: MemoryPubSub, channels: Sequence[str], prefixes: Sequence[str]
    ) -> None:
        self.channels = frozenset(channels)
        self.prefixes = tuple(dict.fromkeys(prefixes))
        self._owner = owner
        self._cond = threading.Condition(threading.Lock())
        self._buffer = MessageBuffer()
        self._closed = False

    def deliver(self, message: Message) -> None:
        with self._cond:
            if self._closed:
                return
            self._buffer.push(message, SUBSCRIPTION_BUFFER)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Message | Gap | None:
        """The next message or Gap, or None after ``timeout`` seconds (None:
        no limit) or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._buffer.pending() or self._closed, timeout)
            if self._closed:
                return None
            return self._buffer.pop()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._buffer.clear()
            self._cond.notify_all()
        self._owner._forget(self)


class MemoryPubSub:
    """Publish and subscribe among the clients of one memory space."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state
        self._mine: list[MemorySubscription] = []  # made through this store: closed with it

    def publish(self, channel: str, data: bytes) -> None:
        if not isinstance(channel, str):
            raise ConfigError(f"channel={channel!r}: must be a string")
        with self._s.cond:
            for sub in self._s.subs:
                if channel in sub.channels:
                    sub.deliver(Message(channel, data))
                for prefix in sub.prefixes:
                    if channel.startswith(prefix):
                        sub.deliver(Message(channel, data, prefix))

    def subscribe(
        self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> MemorySubscription:
        if isinstance(channels, str) or isinstance(prefixes, str):
            raise ConfigError(f"subscribe({channels!r}, {prefixes!r}): pass sequences of names")
        for name in (*channels, *prefixes):
            if not isinstance(name, str):
                raise ConfigError(f"channel or prefix {name!r}: must be a string")
        sub = MemorySubscription(self, channels, prefixes)
        with self._s.cond:
            self._s.subs.append(sub)
            self._mine.append(sub)
        return sub

    def _forget(self, sub: MemorySubscription) -> None:
        with self._s.cond:
            if sub in self._s.subs:
                self._s.subs.remove(sub)
            if sub in self._mine:
                self._mine.remove(sub)

    def close(self) -> None:
        """Close every subscription made through this object."""
        with self._s.cond:
            mine = list(self._mine)
        for sub in mine:
            sub.close()
