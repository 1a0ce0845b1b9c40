"""Durable streams with consumer groups (``space.stream``) on every backend:
publish and replay, one consumer per message within a group, several groups,
redelivery with a delivery count, dead-lettering, nack, retention with
Compacted for a lagging group, bounded group state, bad input; and, with real
processes, a SIGKILLed consumer whose 100 unacked messages all reach another
consumer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.errors import Compacted, ConfigError, SerializationError
from taskspace.messaging import streams
from taskspace.messaging.streams import KEY_ROOT, Consumer, Message, StreamCompacted

REPO_ROOT = Path(__file__).resolve().parents[2]
VIS = 0.2  # a short visibility: redelivery tests wait about this long


def drain(
    consumer: Consumer, count: int | None = None, timeout: float = 0.0, wait: float = 10.0
) -> list[Message]:
    """What the consumer gets (acked) until nothing came for ``timeout``
    seconds or, with ``count``, once it has ``count`` (waiting up to ``wait``)."""
    out: list[Message] = []
    deadline = time.monotonic() + wait
    while count is None or len(out) < count:
        left = timeout if count is None else max(0.0, deadline - time.monotonic())
        got = consumer.fetch(100, timeout=left)
        if not got:
            break
        out += got
        for m in got:
            m.ack()
    consumer.flush()
    return out


def test_publish_read_and_replay(space: Space) -> None:
    s = space.stream("events")
    first = s.publish({"n": 0})
    ids = s.publish_many([{"n": i} for i in range(1, 6)])
    assert [first, *ids] == sorted({first, *ids})  # increasing, distinct
    assert s.publish_many([]) == []
    got = s.read()
    assert [m.id for m in got] == [first, *ids]
    assert [m.data for m in got] == [{"n": i} for i in range(6)]
    assert all(m.time > 1e9 for m in got)
    page = s.read(from_id=ids[1], limit=2)
    assert [m.id for m in page] == ids[1:3]
    assert s.read(from_id=page[-1].id + 1, limit=100)[0].id == ids[3]
    assert s.first_id() == first and s.last_id() == ids[-1]
    assert space.stream("other").last_id() == 0 and space.stream("other").first_id() is None


def test_each_message_goes_to_one_consumer_of_a_group(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("workers", start="earliest")
    a, b = g.consumer("a", prefetch=7), g.consumer("b", prefetch=5)
    ids = s.publish_many(list(range(60)))
    # (different prefetch sizes: some guesses about the other's claim are wrong)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    while True:  # interleaved: each claims its own batches from the shared cursor
        got_a, got_b = a.fetch(3), b.fetch(4)
        if not got_a and not got_b:
            break
        for name, got in (("a", got_a), ("b", got_b)):
            seen[name] += [m.id for m in got]
            for m in got:
                m.ack()
    assert seen["a"] and seen["b"]
    assert a.conflicts + b.conflicts > 0  # the lost-race paths (guesses) were taken
    assert not set(seen["a"]) & set(seen["b"])
    assert sorted(seen["a"] + seen["b"]) == ids
    a.flush(), b.flush()
    assert g.info()["pending"] == 0


def test_several_groups_each_see_every_message(space: Space) -> None:
    s = space.stream("events")
    groups = [s.group(name, start="earliest").consumer("c") for name in ("index", "audit")]
    ids = s.publish_many([f"m{i}" for i in range(25)])
    for consumer in groups:
        got = drain(consumer, 25)
        assert [m.id for m in got] == ids
        assert [m.data for m in got] == [f"m{i}" for i in range(25)]
        assert all(m.deliveries == 1 for m in got)
    assert sorted(s.groups()) == ["audit", "index"]


def test_a_later_group_starts_where_asked(space: Space) -> None:
    s = space.stream("events")
    old = s.publish_many([1, 2, 3])
    latest = s.group("late").consumer()
    assert latest.fetch(10) == []  # created now, at the end
    new = s.publish(4)
    assert [m.id for m in latest.fetch(10)] == [new]
    assert [m.data for m in drain(s.group("all", start="earliest").consumer(), 4)] == [1, 2, 3, 4]
    from_id = drain(s.group("from", start=old[1]).consumer(), 3)
    assert [m.id for m in from_id] == [old[1], old[2], new]


def test_unacked_messages_are_redelivered_with_a_count(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=VIS)
    a, b = g.consumer("a", prefetch=10), g.consumer("b")
    ids = s.publish_many(list(range(10)))
    held = a.fetch(10)
    assert [m.id for m in held] == ids and all(m.deliveries == 1 for m in held)
    assert b.fetch(10, timeout=0) == []  # leased to a
    held[0].ack()
    a.flush()
    again = b.fetch(10, timeout=5.0)
    assert [m.id for m in again] == ids[1:]  # the acked one is not redelivered
    assert all(m.deliveries == 2 for m in again)
    assert {p["consumer"] for p in g.pending()} == {"b"}
    for m in again:
        m.ack()
    b.flush()
    assert g.pending() == [] and g.info()["pending"] == 0


def test_a_late_ack_settles_the_redelivered_message(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=VIS)
    a, b = g.consumer("a", prefetch=2), g.consumer("b", prefetch=2)
    ids = s.publish_many(["x", "y"])
    late = a.fetch(2)
    again = b.fetch(2, timeout=5.0)  # a's lease ran out: b has them now
    assert [m.id for m in again] == ids and [m.deliveries for m in again] == [2, 2]
    for m in late:
        m.ack()
    a.flush()  # written into b's record: nothing left to redeliver
    assert g.pending() == []
    for m in again:
        m.ack()
    b.flush()  # b's record is gone already: nothing to do, no error
    assert g.pending() == [] and b.fetch(2, timeout=VIS * 2) == []


def test_dead_letter_after_max_deliveries(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=VIS, max_deliveries=2)
    c = g.consumer("c1")
    [poison] = s.publish_many([{"bad": True}])
    assert [m.deliveries for m in c.fetch(1)] == [1]
    assert [m.deliveries for m in c.fetch(1, timeout=5.0)] == [2]
    deadline = time.monotonic() + 5.0
    while not s.dead.read() and time.monotonic() < deadline:  # third expiry: dead-lettered
        assert c.fetch(1, timeout=VIS / 2) == []
    [dead] = s.dead.read()
    assert dead.data["id"] == poison and dead.data["group"] == "g"
    assert dead.data["deliveries"] == 2 and dead.data["consumer"] == "c1"
    assert dead.data["reason"] == "max_deliveries" and dead.data["data"] == {"bad": True}
    assert g.pending() == []
    # the dead-letter stream is a stream like any other
    dead_group = s.dead.group("ops", start="earliest").consumer()
    assert [m.data["id"] for m in drain(dead_group, 1)] == [poison]


def test_nack_hands_a_message_back(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=30)
    a, b = g.consumer("a", prefetch=5), g.consumer("b")
    ids = s.publish_many(list(range(5)))
    got = a.fetch(5)
    got[2].nack()  # at once, to anyone
    for m in got[:2] + got[3:]:
        m.ack()
    a.flush()
    [back] = b.fetch(5, timeout=5.0)
    assert back.id == ids[2] and back.deliveries == 2
    back.nack(delay=0.2)
    t0 = time.monotonic()
    [later] = b.fetch(5, timeout=5.0)
    assert later.id == ids[2] and later.deliveries == 3 and time.monotonic() - t0 >= 0.15
    later.ack()
    b.close()
    assert g.pending() == []


def test_close_hands_back_prefetched_messages(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=30)
    a = g.consumer("a", prefetch=10)
    ids = s.publish_many(list(range(10)))
    first, second = a.fetch(2)
    first.ack()
    a.close()  # 8 prefetched, never handed out: back at once, uncounted
    b = g.consumer("b", prefetch=10)
    back = b.fetch(10, timeout=3.0)
    assert [m.id for m in back] == ids[2:] and all(m.deliveries == 1 for m in back)
    assert [p["id"] for p in g.pending() if p["consumer"] == "a"] == [second.id]  # still leased
    for m in back:
        m.ack()
    b.close()


def test_group_state_is_bounded(space: Space) -> None:
    s = space.stream("jobs")
    c = s.group("g", start="earliest").consumer("c", prefetch=50)
    s.publish_many(list(range(500)))
    assert len(drain(c, 500)) == 500
    keys = [k for k, _ in space.store.kv.scan(KEY_ROOT)]
    assert len(keys) == 1 and keys[0].endswith("/cursor")  # no pending records left
    expires = space.store.kv.get(keys[0])
    assert expires is not None and expires.expires is not None  # group_ttl
    assert s.group("g").delete() == 1 and s.groups() == []


def test_maxlen_and_compacted_for_a_lagging_group(space: Space) -> None:
    s = space.stream("capped", maxlen=10)
    lagging = s.group("slow", start="earliest").consumer("c", prefetch=5)
    keeping_up = s.group("fast", start="earliest").consumer("c")
    seen: list[int] = []
    for chunk in range(6):
        s.publish_many(list(range(chunk * 5, chunk * 5 + 5)))
        if chunk == 0:
            assert [m.data for m in lagging.fetch(5)] == [0, 1, 2, 3, 4]
        seen += [m.data for m in drain(keeping_up, timeout=0)]
    assert seen == list(range(30))  # kept up: never told anything
    assert len(s.read(limit=100)) == 10
    with pytest.raises(StreamCompacted) as info:
        lagging.fetch(5)
    assert isinstance(info.value, Compacted)
    first = s.first_id()
    assert info.value.first_id == first and s.read(limit=1)[0].data == 20
    with pytest.raises(StreamCompacted):  # told again until it moves on
        lagging.fetch(5)
    assert lagging.skip_to_earliest() == first
    assert [m.data for m in drain(lagging, 10)] == list(range(20, 30))


def test_age_retention_and_a_caught_up_group(space: Space) -> None:
    s = space.stream("aging", max_age=0.05)
    c = s.group("g", start="earliest").consumer("c")
    s.publish_many([1, 2])
    assert len(drain(c, 2)) == 2
    lagging = s.group("lag", start="earliest").consumer("c", prefetch=1)
    assert [m.data for m in lagging.fetch(1)] == [1]
    time.sleep(0.1)
    assert s.trim() == 2 and s.read() == []
    s.publish(3)
    # caught up when its last entry aged out: nothing after it was lost
    assert [m.data for m in drain(c, 1)] == [3]
    # entry 2 was never taken; (the first consumer had read it ahead: it still delivers it)
    with pytest.raises(StreamCompacted):
        s.group("lag").consumer("other", prefetch=1).fetch(1)
    assert [m.data for m in lagging.fetch(1)] == [2]


def test_pending_entries_trimmed_before_redelivery_are_dead_lettered(space: Space) -> None:
    s = space.stream("capped", maxlen=3)
    g = s.group("g", start="earliest", visibility=VIS)
    ids = s.publish_many([1, 2, 3])
    assert len(g.consumer("a", prefetch=3).fetch(3)) == 3  # held, never acked
    s.publish(4)  # 1 is trimmed while pending
    got = drain(g.consumer("b"), 3)
    assert sorted(m.data for m in got) == [2, 3, 4]
    [dead] = [m.data for m in s.dead.read()]
    assert dead["id"] == ids[0] and dead["reason"] == "trimmed" and dead["data"] is None


def test_bad_input_changes_nothing(space: Space) -> None:
    s = space.stream("events")
    with pytest.raises(SerializationError):
        s.publish_many([1, {"when": object()}])
    with pytest.raises(SerializationError):
        s.publish(float("nan"))
    assert s.read() == []
    for bad in (
        lambda: space.stream(""),
        lambda: space.stream("x", maxlen=0),
        lambda: space.stream("x", max_age=-1),
        lambda: s.publish_many("abc"),
        lambda: s.read(limit=0),
        lambda: s.read(from_id=-1),
        lambda: s.group(""),
        lambda: s.group("g", start="middle"),
        lambda: s.group("g", start=0),
        lambda: s.group("g", visibility=0),
        lambda: s.group("g", max_deliveries=0),
        lambda: s.group("g").consumer(""),
        lambda: s.group("g").consumer("c", prefetch=0),
        lambda: s.group("g").consumer("c").fetch(0),
        lambda: s.group("g").consumer("c").get(timeout=-1),
    ):
        with pytest.raises(ConfigError):
            bad()
    assert s.read() == [] and s.groups() == []
    c = s.group("g", start="earliest").consumer("c")
    s.publish(1)
    [m] = c.fetch(1)
    with pytest.raises(ConfigError):
        m.nack(delay=-1)
    c.close()
    with pytest.raises(ConfigError):
        c.fetch(1)


def test_async_iteration(space: Space) -> None:
    s = space.stream("events")
    consumer = s.group("g", start="earliest").consumer("c")
    s.publish_many(["a", "b"])

    async def two() -> list[str]:
        out = []
        async for msg in consumer:
            out.append(msg.data)
            msg.ack()
            if len(out) == 2:
                break
        return out

    assert asyncio.run(two()) == ["a", "b"]


def test_blocking_get_wakes_on_publish(space: Space) -> None:
    if space.scheme == "memory":
        pytest.skip("covered: the memory store wakes readers by its condition variable")
    s = space.stream("events")
    consumer = s.group("g").consumer("c")
    assert consumer.get(timeout=0) is None
    other = Space(space.url)
    try:
        t0 = time.monotonic()
        import threading

        timer = threading.Timer(0.2, lambda: other.stream("events").publish("hi"))
        timer.start()
        msg = consumer.get(timeout=5.0)
        assert msg is not None and msg.data == "hi"
        assert time.monotonic() - t0 < 3.0
        timer.join()
    finally:
        other.close()


# -- real processes -------------------------------------------------------------


# -- regressions (review findings F1, F2, F3, F8, F15, F19) ------------------------------


@pytest.mark.parametrize("start", ["latest", "earliest"])
def test_a_group_created_on_an_empty_stream_is_told_of_trimmed_messages(
    space: Space, start: str
) -> None:
    s = space.stream("capped", maxlen=10)
    c = s.group("g", start=start).consumer("c")
    assert c.fetch(10) == []  # the group exists before anything is published
    ids = s.publish_many(list(range(30)))  # 20 trimmed before the group read any
    with pytest.raises(StreamCompacted) as info:
        c.fetch(10)
    assert info.value.first_id == ids[20]
    assert c.skip_to_earliest() == ids[20]
    assert [m.data for m in drain(c, 10)] == list(range(20, 30))
    # a group created on an empty stream that lost nothing is not told
    s2 = space.stream("roomy", maxlen=10)
    c2 = s2.group("g", start=start).consumer("c")
    assert c2.fetch(10) == []
    s2.publish_many(list(range(9)))
    assert [m.data for m in drain(c2, 9)] == list(range(9))


def test_a_message_handed_out_from_the_buffer_has_a_full_visibility(space: Space) -> None:
    vis = 0.4
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=vis, max_deliveries=1)
    a, b = g.consumer("a", prefetch=2), g.consumer("b", prefetch=2)
    s.publish_many(["m1", "m2"])
    m1 = a.get(timeout=5.0)
    assert m1 is not None and m1.data == "m1"
    time.sleep(0.45 * vis)
    m1.ack()
    m2 = a.get(timeout=0)  # from the buffer: its visibility starts now
    assert m2 is not None and m2.data == "m2"
    handed = time.monotonic()
    stolen: list[Message] = []
    while time.monotonic() - handed < 0.8 * vis:  # a works on m2 within its visibility
        stolen += b.fetch(2, timeout=0.05)
    m2.ack()  # no further call on a: the ack is written before the lease ends
    stolen += b.fetch(2, timeout=1.5 * vis)
    assert [m.data for m in stolen] == []  # nothing acked in time came back
    assert s.dead.read() == [] and g.pending() == []


def test_a_busy_consumer_keeps_its_group_alive(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "MIN_GROUP_TTL_S", 0.1)
    s = space.stream("jobs")
    g = s.group("g", visibility=0.1, group_ttl=0.4)  # start="latest"
    c = g.consumer("c", prefetch=10)
    assert c.fetch(1) == []  # the group is created
    s.publish_many(list(range(10)))
    for _ in range(10):  # 0.8 s of work on the prefetched batch: twice group_ttl
        m = c.get(timeout=5.0)
        assert m is not None
        time.sleep(0.08)
        m.ack()
    assert space.store.kv.get(g.cursor_key) is not None
    later = s.publish_many(["b0", "b1"])
    assert [m.id for m in drain(c, 2, wait=5.0)] == later


def test_a_vanished_cursor_is_recovered_not_recreated_at_latest(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest")
    a = g.consumer("a", prefetch=2)
    ids = s.publish_many(["x", "y", "z"])
    assert [m.id for m in a.fetch(2)] == ids[:2]  # leased to a, unacked
    assert space.store.kv.delete(g.cursor_key)  # as if group_ttl had passed
    more = s.publish("w")
    assert [m.id for m in drain(g.consumer("b"), 2, wait=5.0)] == [ids[2], more]
    # a consumer that knew the position recovers it too (no pending records left)
    g.delete()
    c = s.group("g", start="latest").consumer("c")
    assert c.fetch(1) == []  # created at the end
    assert space.store.kv.delete(g.cursor_key)
    last = s.publish("v")
    assert [m.id for m in drain(c, 1, wait=5.0)] == [last]


def test_a_nack_longer_than_group_ttl_is_not_lost(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "MIN_GROUP_TTL_S", 0.1)
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=0.1, group_ttl=0.3)
    c = g.consumer("c")
    [mid] = s.publish_many(["later"])
    [m] = c.fetch(1)
    m.nack(delay=0.6)  # twice group_ttl
    [again] = c.fetch(1, timeout=3.0)
    assert again.id == mid and again.deliveries == 2
    again.ack()
    c.flush()
    assert g.pending() == []


def test_concurrent_takeovers_dead_letter_once_and_never_an_acked_message(space: Space) -> None:
    s = space.stream("jobs")
    g = s.group("g", start="earliest", visibility=VIS, max_deliveries=1)
    owner, x, y = g.consumer("owner"), g.consumer("x"), g.consumer("y")
    [poison] = s.publish_many(["bad"])
    assert len(owner.fetch(1)) == 1  # delivered once, never acked
    [(key, found, rec)] = list(g._records(10))  # two scanners see the same record
    assert x._takeover(key, found, rec) == 0
    assert y._takeover(key, found, rec) == 0  # lost the compare: appends nothing
    assert [m.data["id"] for m in s.dead.read()] == [poison]  # once (also on SQLite)
    assert g.pending() == [] and list(space.store.kv.scan(g.dead_prefix)) == []
    # scan, then the owner acks, then the takeover goes on: not dead-lettered
    [acked] = s.publish_many(["fine"])
    [m] = owner.fetch(1)
    [(key, found, rec)] = list(g._records(10))
    m.ack()
    owner.flush()
    assert x._takeover(key, found, rec) == 0
    assert acked not in [d.data["id"] for d in s.dead.read()]
    assert g.pending() == []
    # a consumer that stops between its takeover and the append: its marker is
    # appended once by a later scan
    [lost] = s.publish_many(["orphan"])
    assert len(owner.fetch(1)) == 1
    [(key, found, rec)] = list(g._records(10))
    x._append_dead = lambda *args: None  # type: ignore[method-assign]  # "dies" after the txn
    assert x._takeover(key, found, rec) == 0
    assert len(list(space.store.kv.scan(g.dead_prefix))) == 1
    deadline = time.monotonic() + 5.0
    while lost not in [d.data["id"] for d in s.dead.read()] and time.monotonic() < deadline:
        y.fetch(1, timeout=VIS / 2)
    assert [d.data["id"] for d in s.dead.read()] == [poison, lost]
    assert list(space.store.kv.scan(g.dead_prefix)) == []


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.messaging.stream_procs", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, child: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child died: {child.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


@pytest.mark.fault
def test_sigkilled_consumer_loses_none_of_its_100_messages(space: Space, tmp_path: Path) -> None:
    if space.scheme == "memory":
        pytest.skip("memory:// lives in one process")
    s = space.stream("jobs")
    group = s.group("g", start="earliest", visibility=1.0)
    ids = s.publish_many([{"job": i} for i in range(100)])
    holder = _child("hold", space.url, str(tmp_path), "100", "1.0")
    try:
        _wait_for(tmp_path / "held.json", holder)
        held = json.loads((tmp_path / "held.json").read_text())
        assert held == ids
        assert len(group.pending()) == 100
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    other = group.consumer("survivor", prefetch=100)
    got = drain(other, 100)
    assert other.fetch(10, timeout=0) == []
    assert sorted(m.id for m in got) == ids  # every one, once
    assert all(m.deliveries == 2 for m in got)
    assert [m.data for m in sorted(got, key=lambda m: m.id)] == [{"job": i} for i in range(100)]
    assert group.pending() == [] and s.dead.read() == []


@pytest.mark.fault
def test_consumer_processes_share_a_group(space: Space, tmp_path: Path) -> None:
    if space.scheme == "memory":
        pytest.skip("memory:// lives in one process")
    s = space.stream("jobs")
    s.group("g", start="earliest").consumer("setup").fetch(1, timeout=0)  # create the group
    ids = s.publish_many(list(range(400)))
    names = ["p1", "p2"]
    children = [_child("drain", space.url, str(tmp_path), name) for name in names]
    try:
        for name, child in zip(names, children, strict=True):
            _wait_for(tmp_path / f"ready.{name}", child)
        (tmp_path / "go").touch()
        for name, child in zip(names, children, strict=True):
            _wait_for(tmp_path / f"{name}.json", child, timeout=60.0)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()
    seen = [json.loads((tmp_path / f"{name}.json").read_text()) for name in names]
    everything = [i for part in seen for i in part]
    assert sorted(everything) == ids  # each message to exactly one process
