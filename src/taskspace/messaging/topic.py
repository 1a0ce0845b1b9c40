"""Live broadcast (``space.topic``): best-effort pub/sub of JSON values, gaps reported.

::

    chat = space.topic("chat")
    with chat.subscribe() as sub:
        chat.publish({"from": "agent-1", "text": "hi"})
        for item in sub:                       # TopicMessage or Gap, forever
            if isinstance(item, Gap):
                resync()                       # messages may have been missed here
            else:
                print(item.data)

**Guarantees.** Written on ``store.pubsub``: a message reaches the
subscriptions that exist when it is published, in publish order per
publisher; nothing is stored, so there is no replay. A subscriber may miss
messages (its connection dropped, or it fell more than SUBSCRIPTION_BUFFER
messages behind); it is then handed a :class:`~taskspace.backends.base.Gap`
(``reason`` ``"reconnect"`` or ``"overflow"``, ``missed`` when known) at the
place of the loss, never a silent skip. Use :mod:`taskspace.messaging.streams`
when every message must arrive.

**Faults.** ``publish`` raises BackendError when the store is down (the
message may or may not have been sent); ``get`` raises BackendError while the
backend stays away (the subscription re-subscribes by itself and reports a
Gap). A payload that is not JSON (published on the channel by something
else) is handed over as a :class:`TopicMessage` with the raw bytes as
``data`` and ``raw`` True. Bad arguments raise ConfigError naming them.
Storage: none beyond the backend's own pub/sub transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from taskspace.backends.base import Gap, Subscription
from taskspace.backends.checks import check_seconds
from taskspace.codec import JSON
from taskspace.errors import ConfigError

if TYPE_CHECKING:
    from taskspace.space import Space

CHANNEL_PREFIX = "taskspace/topic/"
# One blocking get of an iteration lasts at most this long (close() is seen).
ITER_STEP_S = 1.0

__all__ = ["CHANNEL_PREFIX", "Gap", "Topic", "TopicMessage", "TopicSubscription"]


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """A message of a topic: ``data`` is the published JSON value (the raw
    bytes, with ``raw`` True, if it was not JSON)."""

    topic: str
    data: Any
    raw: bool = False


class TopicSubscription:
    """Messages published on a topic after it was made; ``get``, iterate, or
    ``with``. Close it when done (idempotent)."""

    def __init__(self, topic: str, sub: Subscription) -> None:
        self.topic = topic
        self._sub = sub
        self._closed = False

    def get(self, timeout: float | None = None) -> TopicMessage | Gap | None:
        """The next message or Gap, or None after ``timeout`` seconds (None:
        wait until one comes or the subscription is closed)."""
        if timeout is not None:
            check_seconds(timeout, "timeout")
        if self._closed:
            return None
        item = self._sub.get(timeout)
        if item is None or isinstance(item, Gap):
            return item
        try:
            return TopicMessage(self.topic, orjson.loads(item.data))
        except orjson.JSONDecodeError:
            return TopicMessage(self.topic, item.data, raw=True)

    def __iter__(self) -> Iterator[TopicMessage | Gap]:
        """Every message and Gap until the subscription is closed."""
        while not self._closed:
            item = self.get(ITER_STEP_S)
            if item is not None:
                yield item

    def close(self) -> None:
        """Stop receiving; idempotent."""
        self._closed = True
        self._sub.close()

    def __enter__(self) -> TopicSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Topic:
    """A named live broadcast channel of JSON values (see the module docstring)."""

    def __init__(self, space: Space, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string")
        self.space = space
        self.name = name
        self.channel = CHANNEL_PREFIX + name
        self._codec = JSON.limited(space.max_payload)

    def __repr__(self) -> str:
        return f"<Topic {self.name!r}>"

    def publish(self, obj: Any) -> None:
        """Send a JSON value to the current subscribers (SerializationError if
        it is not JSON, nothing sent); best-effort, see the module docstring."""
        data = self._codec.encode(obj, f"message of topic {self.name!r}")
        self.space.store.pubsub.publish(self.channel, data)

    def subscribe(self) -> TopicSubscription:
        """A subscription to what is published from now on."""
        return TopicSubscription(self.name, self.space.store.pubsub.subscribe([self.channel]))
