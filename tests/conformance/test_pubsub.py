"""PubSub conformance: delivery after subscribe, channel and prefix filtering,
order, overflow Gaps, close."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from taskspace.backends.base import SUBSCRIPTION_BUFFER, Gap, Message

QUIET = 0.05  # how long to listen when nothing should arrive


def drain(sub, n: int, timeout: float = 5.0) -> list[Message]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        msg = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert msg is not None, f"only {len(got)} of {n} messages arrived: {got}"
        assert isinstance(msg, Message), msg  # no Gap on a healthy, drained subscription
        got.append(msg)
    return got


def test_subscriber_gets_messages_published_after_subscribing(store):
    store.pubsub.publish("ch", b"before")
    with store.pubsub.subscribe(["ch"]) as sub:
        store.pubsub.publish("ch", b"one")
        store.pubsub.publish("ch", b"two")
        got = drain(sub, 2)
        assert [(m.channel, m.data) for m in got] == [("ch", b"one"), ("ch", b"two")]
        assert sub.get(timeout=QUIET) is None


def test_only_subscribed_channels_in_order(store):
    with store.pubsub.subscribe(["a", "b"]) as sub:
        for channel, data in [("a", b"1"), ("c", b"2"), ("b", b"3"), ("ab", b"4"), ("a", b"5")]:
            store.pubsub.publish(channel, data)
        got = drain(sub, 3)
        assert [(m.channel, m.data) for m in got] == [("a", b"1"), ("b", b"3"), ("a", b"5")]
        assert sub.get(timeout=QUIET) is None


def test_every_subscriber_gets_each_message(store):
    with store.pubsub.subscribe(["ch"]) as s1, store.pubsub.subscribe(["ch", "other"]) as s2:
        store.pubsub.publish("ch", b"x")
        store.pubsub.publish("other", b"y")
        assert [m.data for m in drain(s1, 1)] == [b"x"]
        assert [m.data for m in drain(s2, 2)] == [b"x", b"y"]
        assert s1.get(timeout=QUIET) is None


def test_messages_between_clients(peers):
    a, b = peers
    with a.pubsub.subscribe(["ch"]) as sub:
        b.pubsub.publish("ch", b"hello")
        b.pubsub.publish("elsewhere", b"no")
        b.pubsub.publish("ch", b"\x00bytes")
        assert [(m.channel, m.data) for m in drain(sub, 2)] == [
            ("ch", b"hello"), ("ch", b"\x00bytes"),
        ]  # fmt: skip
        assert sub.get(timeout=QUIET) is None


def test_get_blocks_until_a_message_arrives(store):
    with store.pubsub.subscribe(["ch"]) as sub:
        t = threading.Timer(0.1, store.pubsub.publish, ("ch", b"late"))
        start = time.monotonic()
        t.start()
        msg = sub.get(timeout=5.0)
        t.join()
        assert msg is not None and msg.data == b"late"
        assert time.monotonic() - start < 2.5


def test_get_times_out(store):
    with store.pubsub.subscribe(["ch"]) as sub:
        start = time.monotonic()
        assert sub.get(timeout=0.2) is None
        assert time.monotonic() - start < 1.0
        assert sub.get(timeout=0) is None


def test_close_is_idempotent_and_stops_delivery(store):
    sub = store.pubsub.subscribe(["ch"])
    store.pubsub.publish("ch", b"pending")
    sub.close()
    sub.close()
    store.pubsub.publish("ch", b"after")
    assert sub.get(timeout=QUIET) is None
    assert sub.get(timeout=0) is None
    # other subscribers are unaffected
    with store.pubsub.subscribe(["ch"]) as other:
        store.pubsub.publish("ch", b"still")
        assert [m.data for m in drain(other, 1)] == [b"still"]
    other.close()  # after __exit__ closed it: still fine


def test_context_manager_closes(store):
    with store.pubsub.subscribe(["ch"]) as sub:
        pass
    store.pubsub.publish("ch", b"x")
    assert sub.get(timeout=QUIET) is None


def test_concurrent_publishing_loses_nothing_in_order(store):
    count = 500
    with store.pubsub.subscribe(["mine"]) as sub:

        def publisher() -> None:
            for i in range(count):
                store.pubsub.publish("mine", b"%d" % i)
                store.pubsub.publish("noise", b"%d" % i)

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


# -- prefixes --------------------------------------------------------------------------


def test_prefix_subscription_reports_the_pattern(store):
    with store.pubsub.subscribe(prefixes=["jobs."]) as sub:
        for channel in ["jobs.a", "jobs", "jobsX", "jobs.b.c", "other.jobs.x", "jobs."]:
            store.pubsub.publish(channel, channel.encode())
        got = drain(sub, 3)
        assert got == [
            Message("jobs.a", b"jobs.a", "jobs."),
            Message("jobs.b.c", b"jobs.b.c", "jobs."),
            Message("jobs.", b"jobs.", "jobs."),
        ]
        assert sub.get(timeout=QUIET) is None


def test_channels_and_prefixes_together(store):
    with store.pubsub.subscribe(channels=["exact"], prefixes=["p/", "q/"]) as sub:
        store.pubsub.publish("exact", b"1")
        store.pubsub.publish("q/x", b"2")
        store.pubsub.publish("exactly", b"no")
        store.pubsub.publish("p/y", b"3")
        got = drain(sub, 3)
        assert got == [
            Message("exact", b"1"),
            Message("q/x", b"2", "q/"),
            Message("p/y", b"3", "p/"),
        ]
        assert got[0].pattern is None
        assert sub.get(timeout=QUIET) is None


@pytest.mark.parametrize("prefix", ["a*", "a?", "[ab]", "a\\", "a%", "a_"])
def test_prefixes_match_literally(store, prefix):
    with store.pubsub.subscribe(prefixes=[prefix]) as sub:
        for channel in ["abc", "ab", "a", "b", "\\x", "ax"]:
            store.pubsub.publish(channel, b"no")
        store.pubsub.publish(prefix + "yes", b"yes")
        assert drain(sub, 1) == [Message(prefix + "yes", b"yes", prefix)]
        assert sub.get(timeout=QUIET) is None


def test_prefix_subscription_between_clients(peers):
    a, b = peers
    with a.pubsub.subscribe(prefixes=["t."]) as sub:
        b.pubsub.publish("t.1", b"x")
        assert drain(sub, 1) == [Message("t.1", b"x", "t.")]


# -- overflow ----------------------------------------------------------------------------


def _patch_buffer(monkeypatch: pytest.MonkeyPatch, sub, size: int) -> int:
    """Make ``sub`` buffer only ``size`` messages, where its backend reads the
    constant at call time; otherwise the real size (the test publishes more)."""
    module = sys.modules[type(sub).__module__]
    if getattr(module, "SUBSCRIPTION_BUFFER", None) == SUBSCRIPTION_BUFFER:
        monkeypatch.setattr(module, "SUBSCRIPTION_BUFFER", size)
        return size
    return SUBSCRIPTION_BUFFER


def test_overflow_drops_the_oldest_and_reports_a_gap(store, monkeypatch):
    with store.pubsub.subscribe(["ch"]) as sub:
        size = _patch_buffer(monkeypatch, sub, 5)
        total = size * 10
        for i in range(total):
            store.pubsub.publish("ch", b"%d" % i)
        store.pubsub.publish("ch", b"end")
        items: list[Message | Gap] = []
        deadline = time.monotonic() + 10.0
        while not items or items[-1] != Message("ch", b"end"):
            item = sub.get(timeout=max(0.0, deadline - time.monotonic()))
            assert item is not None, f"'end' never arrived: {items[-3:]}"
            items.append(item)
        gaps = [i for i in items if isinstance(i, Gap)]
        messages = [i for i in items if isinstance(i, Message)]
        assert gaps, "no overflow reported"
        assert all(g.reason == "overflow" and g.missed and g.missed > 0 for g in gaps)
        assert isinstance(items[0], Gap)  # the gap comes before what remains
        assert sum(g.missed for g in gaps) + len(messages) == total + 1  # type: ignore[misc]
        numbers = [int(m.data) for m in messages[:-1]]
        assert numbers == sorted(numbers)  # what remains is in order: the oldest were dropped
        assert len(messages) <= size * len(gaps) + size
        assert sub.get(timeout=QUIET) is None
