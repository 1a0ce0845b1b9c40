"""StreamStore conformance: increasing ids never reused, read windows, maxlen, trim."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor


def _ids(entries):
    return [e.id for e in entries]


def test_append_and_read(store):
    before = store.clock.now()
    ids = [store.append("s", b"e%d" % i) for i in range(5)]
    after = store.clock.now()
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert ids[0] > 0
    entries = store.read("s")
    assert _ids(entries) == ids
    assert [e.data for e in entries] == [b"e%d" % i for i in range(5)]
    times = [e.time for e in entries]
    assert times == sorted(times)
    assert before - 0.01 <= times[0] and times[-1] <= after + 0.01
    assert store.read("missing") == []


def test_read_after_and_limit(store):
    ids = [store.append("s", b"%d" % i) for i in range(10)]
    assert _ids(store.read("s", after=ids[3])) == ids[4:]
    assert _ids(store.read("s", after=ids[3], limit=2)) == ids[4:6]
    assert _ids(store.read("s", limit=3)) == ids[:3]
    assert store.read("s", after=ids[-1]) == []
    assert _ids(store.read("s", after=0)) == ids
    # paging with after=last id visits every entry once, in order
    seen, cursor = [], 0
    while page := store.read("s", after=cursor, limit=4):
        seen.extend(_ids(page))
        cursor = page[-1].id
    assert seen == ids


def test_read_default_limit_is_100(store):
    for i in range(105):
        store.append("s", b"%d" % i)
    assert len(store.read("s")) == 100


def test_streams_are_independent(store):
    a1 = store.append("a", b"a1")
    b1 = store.append("b", b"b1")
    a2 = store.append("a", b"a2")
    assert a2 > a1
    assert [e.data for e in store.read("a")] == [b"a1", b"a2"]
    assert [(e.id, e.data) for e in store.read("b")] == [(b1, b"b1")]
    assert store.trim("a", 0) == 2
    assert [e.data for e in store.read("b")] == [b"b1"]


def test_append_maxlen_keeps_newest(store):
    ids = [store.append("s", b"%d" % i, maxlen=3) for i in range(6)]
    assert [e.data for e in store.read("s")] == [b"3", b"4", b"5"]
    assert _ids(store.read("s")) == ids[3:]
    store.append("s", b"6")  # no maxlen: nothing dropped
    assert len(store.read("s")) == 4
    store.append("s", b"7", maxlen=1)
    assert [e.data for e in store.read("s")] == [b"7"]


def test_trim_returns_dropped_count(store):
    ids = [store.append("s", b"%d" % i) for i in range(7)]
    assert store.trim("s", 10) == 0
    assert store.trim("s", 7) == 0
    assert store.trim("s", 4) == 3
    assert _ids(store.read("s")) == ids[3:]
    assert store.trim("s", 4) == 0
    assert store.trim("s", 1) == 3
    assert _ids(store.read("s")) == ids[-1:]
    assert store.trim("s", 0) == 1
    assert store.read("s") == []
    assert store.trim("s", 0) == 0
    assert store.trim("missing", 0) == 0


def test_ids_never_reused_after_trim(store):
    ids = [store.append("s", b"x") for _ in range(3)]
    store.trim("s", 0)
    new = store.append("s", b"y")
    assert new > ids[-1]
    assert _ids(store.read("s")) == [new]
    assert store.read("s", after=ids[-1]) == store.read("s")
    dropped = store.append("s", b"z", maxlen=0)  # appended and dropped at once
    assert dropped > new
    assert store.read("s") == []
    newer = store.append("s", b"w")
    assert newer > dropped
    assert _ids(store.read("s")) == [newer]


def test_concurrent_appends_get_distinct_increasing_ids(store):
    threads, per = 4, 50
    barrier = threading.Barrier(threads)

    def writer(k: int) -> list[int]:
        barrier.wait()
        return [store.append("s", b"%d-%d" % (k, i)) for i in range(per)]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(writer, range(threads)))
    for ids in results:  # each writer sees its own ids increase
        assert ids == sorted(ids)
    all_ids = [i for ids in results for i in ids]
    assert len(set(all_ids)) == threads * per
    assert _ids(store.read("s", limit=1000)) == sorted(all_ids)
