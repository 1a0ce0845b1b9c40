"""PubSub conformance: delivery after subscribe, channel filtering, order, close."""

from __future__ import annotations

import threading
import time

from taskspace.backends.base import Message

QUIET = 0.05  # how long to listen when nothing should arrive


def drain(sub, n: int, timeout: float = 5.0) -> list[Message]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        msg = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert msg is not None, f"only {len(got)} of {n} messages arrived: {got}"
        got.append(msg)
    return got


def test_subscriber_gets_messages_published_after_subscribing(store):
    store.publish("ch", b"before")
    with store.subscribe(["ch"]) as sub:
        store.publish("ch", b"one")
        store.publish("ch", b"two")
        got = drain(sub, 2)
        assert [(m.channel, m.data) for m in got] == [("ch", b"one"), ("ch", b"two")]
        assert sub.get(timeout=QUIET) is None


def test_only_subscribed_channels_in_order(store):
    with store.subscribe(["a", "b"]) as sub:
        for channel, data in [("a", b"1"), ("c", b"2"), ("b", b"3"), ("ab", b"4"), ("a", b"5")]:
            store.publish(channel, data)
        got = drain(sub, 3)
        assert [(m.channel, m.data) for m in got] == [("a", b"1"), ("b", b"3"), ("a", b"5")]
        assert sub.get(timeout=QUIET) is None


def test_every_subscriber_gets_each_message(store):
    with store.subscribe(["ch"]) as s1, store.subscribe(["ch", "other"]) as s2:
        store.publish("ch", b"x")
        store.publish("other", b"y")
        assert [m.data for m in drain(s1, 1)] == [b"x"]
        assert [m.data for m in drain(s2, 2)] == [b"x", b"y"]
        assert s1.get(timeout=QUIET) is None


def test_messages_between_clients(peers):
    a, b = peers
    with a.subscribe(["ch"]) as sub:
        b.publish("ch", b"hello")
        b.publish("elsewhere", b"no")
        b.publish("ch", b"\x00bytes")
        assert [(m.channel, m.data) for m in drain(sub, 2)] == [
            ("ch", b"hello"), ("ch", b"\x00bytes"),
        ]  # fmt: skip
        assert sub.get(timeout=QUIET) is None


def test_get_blocks_until_a_message_arrives(store):
    with store.subscribe(["ch"]) as sub:
        t = threading.Timer(0.1, store.publish, ("ch", b"late"))
        start = time.monotonic()
        t.start()
        msg = sub.get(timeout=5.0)
        t.join()
        assert msg is not None and msg.data == b"late"
        assert time.monotonic() - start < 2.5


def test_get_times_out(store):
    with store.subscribe(["ch"]) as sub:
        start = time.monotonic()
        assert sub.get(timeout=0.2) is None
        assert time.monotonic() - start < 1.0
        assert sub.get(timeout=0) is None


def test_close_is_idempotent_and_stops_delivery(store):
    sub = store.subscribe(["ch"])
    store.publish("ch", b"pending")
    sub.close()
    sub.close()
    store.publish("ch", b"after")
    assert sub.get(timeout=QUIET) is None
    assert sub.get(timeout=0) is None
    # other subscribers are unaffected
    with store.subscribe(["ch"]) as other:
        store.publish("ch", b"still")
        assert [m.data for m in drain(other, 1)] == [b"still"]
    other.close()  # after __exit__ closed it: still fine


def test_context_manager_closes(store):
    with store.subscribe(["ch"]) as sub:
        pass
    store.publish("ch", b"x")
    assert sub.get(timeout=QUIET) is None


def test_concurrent_publishing_loses_nothing_in_order(store):
    count = 500
    with store.subscribe(["mine"]) as sub:

        def publisher() -> None:
            for i in range(count):
                store.publish("mine", b"%d" % i)
                store.publish("noise", b"%d" % i)

        t = threading.Thread(target=publisher)
        t.start()
        got: list[Message] = []
        while len(got) < count:
            msg = sub.get(timeout=0.5)
            if msg is not None:
                got.append(msg)
            elif not t.is_alive():
                break
        t.join()
        assert [m.data for m in got] == [b"%d" % i for i in range(count)]
        assert {m.channel for m in got} == {"mine"}
        assert sub.get(timeout=QUIET) is None
