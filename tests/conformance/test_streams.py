"""StreamStore conformance: increasing ids never reused, wall-clock times, read
windows, blocking reads, append_many, maxlen and trim by maxlen/min_id/max_age."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskspace.errors import ConfigError
from tests.conformance.conftest import PAST, TTL


def _ids(entries):
    return [e.id for e in entries]


def test_append_and_read(store):
    before = time.time()
    ids = [store.streams.append("s", b"e%d" % i) for i in range(5)]
    after = time.time()
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert ids[0] > 0
    entries = store.streams.read("s")
    assert _ids(entries) == ids
    assert [e.data for e in entries] == [b"e%d" % i for i in range(5)]
    times = [e.time for e in entries]
    assert times == sorted(times)
    assert before - 1.0 <= times[0] and times[-1] <= after + 1.0  # epoch seconds
    assert store.streams.read("missing") == []


def test_append_many_in_order_in_one_step(store):
    first = store.streams.append("s", b"a")
    ids = store.streams.append_many("s", [b"b", b"c", b"\x00d"])
    assert len(ids) == 3
    assert all(a < b for a, b in itertools.pairwise([first, *ids]))
    assert [(e.id, e.data) for e in store.streams.read("s")] == [
        (first, b"a"), (ids[0], b"b"), (ids[1], b"c"), (ids[2], b"\x00d"),
    ]  # fmt: skip
    assert store.streams.append_many("s", []) == []
    kept = store.streams.append_many("s", [b"e", b"f", b"g"], maxlen=2)
    assert _ids(store.streams.read("s")) == kept[1:]


def test_append_many_request_id_appends_once(store, caps):
    if not caps.lost_replies:
        pytest.skip("replies cannot be lost: request ids may be ignored")
    ids = store.streams.append_many("s", [b"a", b"b"], request_id="r1")
    assert store.streams.append_many("s", [b"a", b"b"], request_id="r1") == ids
    assert _ids(store.streams.read("s")) == ids


def test_read_after_and_limit(store):
    ids = store.streams.append_many("s", [b"%d" % i for i in range(10)])
    assert _ids(store.streams.read("s", after=ids[3])) == ids[4:]
    assert _ids(store.streams.read("s", after=ids[3], limit=2)) == ids[4:6]
    assert _ids(store.streams.read("s", limit=3)) == ids[:3]
    assert store.streams.read("s", after=ids[-1]) == []
    assert _ids(store.streams.read("s", after=0)) == ids
    seen, cursor = [], 0
    while page := store.streams.read("s", after=cursor, limit=4):
        seen.extend(_ids(page))
        cursor = page[-1].id
    assert seen == ids


def test_read_default_limit_is_100(store):
    store.streams.append_many("s", [b"%d" % i for i in range(105)])
    assert len(store.streams.read("s")) == 100


def test_bad_arguments_raise_config_error(store):
    calls = [
        lambda: store.streams.append("s", b"x", maxlen=0),
        lambda: store.streams.append_many("s", [b"x"], maxlen=0),
        lambda: store.streams.read("s", limit=0),
        lambda: store.streams.read("s", wait=-1.0),
        lambda: store.streams.trim("s", maxlen=0),
    ]
    for call in calls:
        with pytest.raises(ConfigError):
            call()
    assert store.streams.read("s") == []


def test_streams_are_independent(store):
    a1 = store.streams.append("a", b"a1")
    b1 = store.streams.append("b", b"b1")
    a2 = store.streams.append("a", b"a2")
    assert a2 > a1
    assert [e.data for e in store.streams.read("a")] == [b"a1", b"a2"]
    assert [(e.id, e.data) for e in store.streams.read("b")] == [(b1, b"b1")]
    assert store.streams.trim("a", maxlen=1) == 1
    assert [e.data for e in store.streams.read("b")] == [b"b1"]


def test_append_maxlen_keeps_newest(store):
    ids = [store.streams.append("s", b"%d" % i, maxlen=3) for i in range(6)]
    assert [e.data for e in store.streams.read("s")] == [b"3", b"4", b"5"]
    assert _ids(store.streams.read("s")) == ids[3:]
    store.streams.append("s", b"6")  # no maxlen: nothing dropped
    assert len(store.streams.read("s")) == 4
    store.streams.append("s", b"7", maxlen=1)
    assert [e.data for e in store.streams.read("s")] == [b"7"]


def test_trim_by_maxlen(store):
    ids = store.streams.append_many("s", [b"%d" % i for i in range(7)])
    assert store.streams.trim("s", maxlen=10) == 0
    assert store.streams.trim("s", maxlen=7) == 0
    assert store.streams.trim("s", maxlen=4) == 3
    assert _ids(store.streams.read("s")) == ids[3:]
    assert store.streams.trim("s", maxlen=4) == 0
    assert store.streams.trim("s", maxlen=1) == 3
    assert _ids(store.streams.read("s")) == ids[-1:]
    assert store.streams.trim("s") == 0  # no criterion: nothing dropped
    assert store.streams.trim("missing", maxlen=1) == 0


def test_trim_by_min_id(store):
    ids = store.streams.append_many("s", [b"%d" % i for i in range(6)])
    assert store.streams.trim("s", min_id=ids[0]) == 0
    assert store.streams.trim("s", min_id=ids[2]) == 2  # below min_id: dropped
    assert _ids(store.streams.read("s")) == ids[2:]
    assert store.streams.trim("s", min_id=ids[-1] + 1) == 4
    assert store.streams.read("s") == []
    # both criteria: whatever either drops
    more = store.streams.append_many("s", [b"%d" % i for i in range(6)])
    assert store.streams.trim("s", maxlen=4, min_id=more[3]) == 3
    assert _ids(store.streams.read("s")) == more[3:]


def test_trim_by_max_age(timed):
    s = timed.store
    old = s.streams.append_many("s", [b"old1", b"old2"])
    timed.advance(PAST)  # the wall clock moves with the lease clock
    new = s.streams.append("s", b"new")
    assert s.streams.trim("s", max_age=3600.0) == 0
    assert s.streams.trim("s", max_age=TTL) == len(old)
    assert _ids(s.streams.read("s")) == [new]


def test_ids_never_reused_after_trim(store):
    ids = store.streams.append_many("s", [b"x"] * 3)
    store.streams.trim("s", min_id=ids[-1] + 1)
    new = store.streams.append("s", b"y")
    assert new > ids[-1]
    assert _ids(store.streams.read("s")) == [new]
    assert store.streams.read("s", after=ids[-1]) == store.streams.read("s")
    newer = store.streams.append("s", b"w", maxlen=1)
    assert newer > new
    assert _ids(store.streams.read("s")) == [newer]


# -- blocking read ---------------------------------------------------------------------


def test_blocking_read_returns_when_another_thread_appends(store):
    last = store.streams.append("s", b"old")
    t = threading.Timer(0.1, store.streams.append, ("s", b"new"))
    start = time.monotonic()
    t.start()
    got = store.streams.read("s", after=last, wait=10.0)
    elapsed = time.monotonic() - start
    t.join()
    assert [e.data for e in got] == [b"new"]
    assert elapsed < 2.0


def test_blocking_read_wakes_on_an_append_by_another_client(peers):
    a, b = peers
    t = threading.Timer(0.1, b.streams.append, ("s", b"hello"))
    start = time.monotonic()
    t.start()
    got = a.streams.read("s", wait=10.0)
    t.join()
    assert [e.data for e in got] == [b"hello"]
    assert time.monotonic() - start < 2.0


def test_blocking_read_returns_empty_after_wait(store):
    last = store.streams.append("s", b"old")
    store.streams.append("other", b"x")
    start = time.monotonic()
    assert store.streams.read("s", after=last, wait=0.2) == []
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.5


def test_blocking_read_returns_at_once_when_entries_exist(store):
    store.streams.append("s", b"x")
    start = time.monotonic()
    assert len(store.streams.read("s", wait=10.0)) == 1
    assert time.monotonic() - start < 1.0


# -- concurrency -------------------------------------------------------------------------


def test_concurrent_appends_get_distinct_increasing_ids(store):
    threads, per = 4, 50
    barrier = threading.Barrier(threads)

    def writer(k: int) -> list[int]:
        barrier.wait()
        return [store.streams.append("s", b"%d-%d" % (k, i)) for i in range(per)]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(writer, range(threads)))
    for ids in results:  # each writer sees its own ids increase
        assert ids == sorted(ids)
    all_ids = [i for ids in results for i in ids]
    assert len(set(all_ids)) == threads * per
    assert _ids(store.streams.read("s", limit=1000)) == sorted(all_ids)
