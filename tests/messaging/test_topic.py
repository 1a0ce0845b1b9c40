"""Live topics (``space.topic``) on every backend: delivery to every current
subscriber in order, nothing for later subscribers, overflow and reconnect
reported as Gaps, non-JSON payloads, bad input."""

from __future__ import annotations

import sys
import time

import pytest

from taskspace import Space
from taskspace.backends.base import SUBSCRIPTION_BUFFER, Gap
from taskspace.errors import ConfigError, SerializationError
from taskspace.messaging.topic import CHANNEL_PREFIX, TopicMessage, TopicSubscription


def take(sub: TopicSubscription, n: int, timeout: float = 10.0) -> list[TopicMessage | Gap]:
    out: list[TopicMessage | Gap] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        item = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {out} arrived"
        out.append(item)
    return out


def test_every_subscriber_gets_each_message_in_order(space: Space) -> None:
    chat = space.topic("chat")
    with chat.subscribe() as a, chat.subscribe() as b, space.topic("other").subscribe() as c:
        for i in range(20):
            chat.publish({"n": i})
        expected = [TopicMessage("chat", {"n": i}) for i in range(20)]
        assert take(a, 20) == expected
        assert take(b, 20) == expected
        assert c.get(timeout=0.1) is None  # another topic
        assert a.get(timeout=0.05) is None


def test_a_later_subscriber_misses_earlier_messages(space: Space) -> None:
    chat = space.topic("chat")
    chat.publish("before anyone listened")
    with chat.subscribe() as sub:
        chat.publish("after")
        assert take(sub, 1) == [TopicMessage("chat", "after")]


def test_iteration_between_clients(space: Space) -> None:
    if space.scheme == "memory":
        pytest.skip("memory:// has one client")
    other = Space(space.url)
    try:
        with space.topic("chat").subscribe() as sub:
            other.topic("chat").publish([1, "two"])
            item = next(iter(sub))
            assert item == TopicMessage("chat", [1, "two"])
    finally:
        other.close()


def test_overflow_is_reported_as_a_gap(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = space.topic("chat")
    with chat.subscribe() as sub:
        module = sys.modules[type(sub._sub).__module__]
        assert getattr(module, "SUBSCRIPTION_BUFFER", None) == SUBSCRIPTION_BUFFER
        monkeypatch.setattr(module, "SUBSCRIPTION_BUFFER", 5)
        for i in range(50):
            chat.publish(i)
        chat.publish("end")
        items: list[TopicMessage | Gap] = []
        while not items or items[-1] != TopicMessage("chat", "end"):
            items += take(sub, 1)
        gaps = [i for i in items if isinstance(i, Gap)]
        numbers = [i.data for i in items if isinstance(i, TopicMessage)][:-1]
        assert gaps and all(g.reason == "overflow" for g in gaps)
        assert isinstance(items[0], Gap)  # reported where the loss is
        assert numbers == sorted(numbers) and len(numbers) < 50
        assert sum(g.missed or 0 for g in gaps) + len(numbers) == 50


def test_a_dropped_redis_connection_is_a_gap(space: Space) -> None:
    if space.scheme != "redis":
        pytest.skip("the Redis subscription connection is killed by CLIENT KILL")
    chat = space.topic("chat")
    with chat.subscribe() as sub:
        chat.publish(1)
        assert take(sub, 1) == [TopicMessage("chat", 1)]
        admin = space.store.conn.client  # type: ignore[attr-defined]
        admin.client_kill_filter(_type="pubsub")
        assert take(sub, 1) == [Gap("reconnect")]
        chat.publish(2)
        assert take(sub, 1) == [TopicMessage("chat", 2)]


def test_non_json_payloads_and_bad_input(space: Space) -> None:
    chat = space.topic("chat")
    with chat.subscribe() as sub:
        space.store.pubsub.publish(CHANNEL_PREFIX + "chat", b"\xff not json")
        assert take(sub, 1) == [TopicMessage("chat", b"\xff not json", raw=True)]
        with pytest.raises(SerializationError):
            chat.publish({1, 2})
        with pytest.raises(ConfigError):
            sub.get(timeout=-1)
        assert sub.get(timeout=0.05) is None  # the refused publish sent nothing
    assert sub.get(timeout=0) is None  # closed
    for bad in ("", None, 3):
        with pytest.raises(ConfigError):
            space.topic(bad)  # type: ignore[arg-type]
