"""KVStore conformance: revisions and versions, compare-and-set without ABA,
TTLs and touch, incr, delete, scan paging, get_many and argument errors."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskspace.backends.base import Versioned
from taskspace.errors import ConfigError, NotAnInteger
from tests.conformance.conftest import PAST, TTL


def test_put_get_round_trip(store):
    assert store.kv.revision() == 0
    assert store.kv.get("k") is None
    w1 = store.kv.put("k", b"\x00one")
    assert isinstance(w1, Versioned)
    assert (w1.value, w1.expires) == (b"\x00one", None)
    assert store.kv.get("k") == w1
    assert store.kv.revision() == w1.revision
    w2 = store.kv.put("k", b"two")
    assert w2.version > w1.version and w2.revision > w1.revision
    assert store.kv.get("k") == w2
    assert store.kv.put("empty", b"").value == b""
    assert store.kv.get("empty").value == b""


def test_version_is_the_revision_of_the_write(store):
    writes = [
        store.kv.put("a", b"1"),
        store.kv.put("b", b"1"),
        store.kv.cas("a", store.kv.get("a").version, b"2"),
    ]
    store.kv.incr("n")
    writes.append(store.kv.get("n"))
    for w in writes:
        assert w.version == w.revision
    revisions = [w.revision for w in writes]
    assert all(a < b for a, b in itertools.pairwise(revisions))
    assert store.kv.revision() == revisions[-1]


def test_every_write_takes_the_next_revision_and_failed_ones_none(store):
    r0 = store.kv.revision()
    w = store.kv.put("k", b"a")
    assert w.revision > r0
    assert store.kv.cas("k", w.version + 1000, b"b") is None
    assert store.kv.delete("k", w.version + 1000) is False
    assert store.kv.delete("absent") is False
    assert store.kv.get("k") == w
    assert store.kv.revision() == w.revision  # refused writes took no revision
    assert store.kv.delete("k") is True
    assert store.kv.revision() > w.revision


def test_versions_increase_across_delete_and_recreate(store):
    v1 = store.kv.put("k", b"a").version
    assert store.kv.delete("k") is True
    v2 = store.kv.put("k", b"a").version
    assert v2 > v1
    assert store.kv.delete("k") is True
    w3 = store.kv.cas("k", None, b"a")
    assert w3 is not None and w3.version > v2
    assert store.kv.delete("k") is True
    store.kv.incr("k")
    v4 = store.kv.get("k").version
    assert v4 > w3.version
    # no ABA: a CAS or delete against an earlier incarnation's version fails
    for old in (v1, v2, w3.version):
        assert store.kv.cas("k", old, b"z") is None
        assert store.kv.delete("k", old) is False
    assert store.kv.get("k").version == v4


def test_versions_increase_across_expiry(timed):
    s = timed.store
    v1 = s.kv.put("k", b"a", ttl=TTL).version
    timed.advance(PAST)
    assert s.kv.cas("k", v1, b"b") is None
    v2 = s.kv.put("k", b"b").version
    assert v2 > v1


def test_cas_none_requires_absence(store):
    w = store.kv.cas("k", None, b"first")
    assert w is not None
    assert store.kv.get("k") == w
    assert store.kv.cas("k", None, b"second") is None
    assert store.kv.get("k").value == b"first"


def test_cas_with_version(store):
    w1 = store.kv.put("k", b"a")
    w2 = store.kv.cas("k", w1.version, b"b")
    assert w2 is not None and w2.version > w1.version
    assert store.kv.get("k") == w2
    assert store.kv.cas("k", w1.version, b"stale") is None
    assert store.kv.cas("k", w2.version + 1000, b"future") is None
    assert store.kv.get("k") == w2
    assert store.kv.cas("absent", w1.version, b"x") is None
    assert store.kv.get("absent") is None


def test_ttl_is_on_the_lease_clock_and_a_write_without_ttl_clears_it(timed):
    s = timed.store
    before = s.clock.now()
    w = s.kv.cas("k", None, b"a", ttl=TTL)
    after = s.clock.now()
    assert before + TTL <= w.expires <= after + TTL
    assert s.kv.get("k").expires == w.expires
    w2 = s.kv.cas("k", w.version, b"b")  # a write without ttl makes the key permanent
    assert w2.expires is None
    timed.advance(PAST)
    assert s.kv.get("k") == w2


def test_expired_key_behaves_like_missing(timed):
    s = timed.store
    w1 = s.kv.put("app/a", b"short", ttl=TTL)
    s.kv.put("app/b", b"long")
    assert [k for k, _ in s.kv.scan("app/")] == ["app/a", "app/b"]
    timed.advance(PAST)
    assert s.kv.get("app/a") is None
    assert s.kv.get_many(["app/a", "app/b"])[0] is None
    assert [k for k, _ in s.kv.scan("app/")] == ["app/b"]
    assert s.kv.delete("app/a") is False
    assert s.kv.delete("app/a", w1.version) is False
    assert s.kv.cas("app/a", w1.version, b"x") is None
    assert s.kv.touch("app/a", 60.0) is None
    w2 = s.kv.cas("app/a", None, b"new")
    assert w2 is not None and w2.version > w1.version
    assert s.kv.get("app/a") == w2


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_ttl_raises_config_error(store, bad):
    with pytest.raises(ConfigError):
        store.kv.put("k", b"a", ttl=bad)
    with pytest.raises(ConfigError):
        store.kv.cas("k", None, b"a", ttl=bad)
    with pytest.raises(ConfigError):
        store.kv.incr("k", ttl=bad)
    store.kv.put("k", b"a")
    with pytest.raises(ConfigError):
        store.kv.touch("k", bad)
    assert store.kv.get("k").value == b"a"


def test_empty_key_and_bad_limits_raise_config_error(store):
    calls = [
        lambda: store.kv.put("", b"a"),
        lambda: store.kv.get(""),
        lambda: store.kv.cas("", None, b"a"),
        lambda: store.kv.incr(""),
        lambda: store.kv.delete(""),
        lambda: store.kv.touch("", None),
        lambda: store.kv.scan("", limit=0),
        lambda: store.kv.changes("", 0, limit=0),
    ]
    for call in calls:
        with pytest.raises(ConfigError):
            call()
    assert store.kv.revision() == 0


# -- touch ----------------------------------------------------------------------------


def test_touch_moves_expiry_without_a_new_version_revision_or_change(timed):
    s = timed.store
    w = s.kv.put("k", b"v", ttl=TTL)
    rev = s.kv.revision()
    timed.advance(TTL * 0.6)
    before = s.clock.now()
    t = s.kv.touch("k", TTL)
    after = s.clock.now()
    assert t is not None
    assert (t.value, t.version, t.revision) == (w.value, w.version, w.revision)
    assert before + TTL <= t.expires <= after + TTL
    assert s.kv.revision() == rev
    assert [c.kind for c in s.kv.changes("", 0)] == ["put"]
    timed.advance(TTL * 0.6)  # past the first expiry, within the touched one
    assert s.kv.get("k") == t
    forever = s.kv.touch("k", None)
    assert forever is not None and forever.expires is None
    timed.advance(PAST)
    assert s.kv.get("k") == forever
    assert s.kv.touch("absent", 10.0) is None
    assert s.kv.revision() == rev


# -- incr ------------------------------------------------------------------------------


def test_incr(store):
    assert store.kv.incr("n") == 1
    assert store.kv.incr("n", 10) == 11
    assert store.kv.incr("n", -20) == -9
    assert int(store.kv.get("n").value) == -9
    assert store.kv.incr("m", -3) == -3
    w = store.kv.put("p", b"100")
    assert store.kv.incr("p", 5) == 105
    after = store.kv.get("p")
    assert after.version > w.version and int(after.value) == 105


@pytest.mark.parametrize("value", [b"abc", b"1.5", b"", b"\xff", b"12x", b"1e3"])
def test_incr_on_a_non_integer_raises_and_changes_nothing(store, value):
    w = store.kv.put("k", value)
    rev = store.kv.revision()
    with pytest.raises(NotAnInteger):
        store.kv.incr("k", 1)
    assert store.kv.get("k") == w
    assert store.kv.revision() == rev
    assert [c.revision for c in store.kv.changes("", 0)] == [w.revision]


@pytest.mark.parametrize("delta", [1.5, 2.0, "1", None, True, 2**63, -(2**63) - 1])
def test_incr_delta_must_be_an_int64(store, delta):
    w = store.kv.put("k", b"7")
    with pytest.raises(ConfigError):
        store.kv.incr("k", delta)
    with pytest.raises(ConfigError):
        store.kv.incr("new", delta)
    assert store.kv.get("k") == w
    assert store.kv.get("new") is None
    assert store.kv.revision() == w.revision


def test_incr_stays_within_int64(store):
    top, bottom = 2**63 - 1, -(2**63)
    assert store.kv.incr("hi", top) == top
    assert store.kv.incr("lo", bottom) == bottom
    assert store.kv.incr("mid", 2**62) == 2**62
    before = {key: store.kv.get(key) for key in ("hi", "lo", "mid")}
    rev = store.kv.revision()
    for key, delta in (("hi", 1), ("lo", -1), ("mid", 2**62), ("mid", top)):
        with pytest.raises(NotAnInteger):
            store.kv.incr(key, delta)
    assert {key: store.kv.get(key) for key in before} == before  # nothing written
    assert store.kv.revision() == rev
    assert store.kv.incr("mid", 2**62 - 1) == top  # exactly the top fits
    assert store.kv.incr("hi", bottom) == -1
    # a stored integer beyond 64 bits is not one incr can add to
    for big in (b"9223372036854775808", b"-9223372036854775809", b"1" * 30):
        put = store.kv.put("big", big)
        rev = store.kv.revision()
        with pytest.raises(NotAnInteger):
            store.kv.incr("big", -1)
        assert store.kv.get("big") == put
        assert store.kv.revision() == rev


def test_incr_on_expired_key_starts_from_zero(timed):
    s = timed.store
    s.kv.put("n", b"41", ttl=TTL)
    assert s.kv.incr("n") == 42
    timed.advance(PAST)
    assert s.kv.incr("n", 5) == 5


def test_incr_ttl_applies_only_on_create(timed):
    s = timed.store
    assert s.kv.incr("n", ttl=TTL) == 1
    expires = s.kv.get("n").expires
    assert expires is not None
    assert s.kv.incr("n", ttl=60.0) == 2
    assert s.kv.incr("n") == 3
    assert s.kv.get("n").expires == pytest.approx(expires, abs=0.05)
    timed.advance(PAST)
    assert s.kv.get("n") is None
    assert s.kv.incr("n") == 1
    assert s.kv.get("n").expires is None


def test_incr_request_id_adds_once(store, caps):
    if not caps.lost_replies:
        pytest.skip("replies cannot be lost: request ids may be ignored")
    assert store.kv.incr("n", 5, request_id="r1") == 5
    assert store.kv.incr("n", 5, request_id="r1") == 5
    assert store.kv.incr("n", 5, request_id="r2") == 10
    assert int(store.kv.get("n").value) == 10


# -- delete ----------------------------------------------------------------------------


def test_delete(store):
    assert store.kv.delete("k") is False
    w1 = store.kv.put("k", b"a")
    assert store.kv.delete("k", w1.version + 1000) is False
    assert store.kv.get("k") == w1
    w2 = store.kv.put("k", b"b")
    assert store.kv.delete("k", w1.version) is False
    assert store.kv.get("k").value == b"b"
    assert store.kv.delete("k", w2.version) is True
    assert store.kv.get("k") is None
    assert store.kv.delete("k", w2.version) is False
    store.kv.put("k", b"c")
    assert store.kv.delete("k") is True
    assert store.kv.get("k") is None


# -- scan and get_many ------------------------------------------------------------------


def test_scan_prefix_order_and_limit(store):
    keys = ["b/2", "a", "b/10", "b/1", "b", "b/", "ba", "c/1", "b/\u00e9", "b/Z", "b/_", "b/%"]
    writes = {k: store.kv.put(k, k.encode()) for k in keys}
    expected = sorted(k for k in keys if k.startswith("b/"))
    pairs = store.kv.scan("b/")
    assert [k for k, _ in pairs] == expected
    assert all(v == writes[k] for k, v in pairs)
    assert [k for k, _ in store.kv.scan("b/", limit=3)] == expected[:3]
    assert [k for k, _ in store.kv.scan("b/", limit=100)] == expected
    assert [k for k, _ in store.kv.scan("")] == sorted(keys)
    assert [k for k, _ in store.kv.scan("b/_")] == ["b/_"]  # no LIKE wildcards
    assert [k for k, _ in store.kv.scan("b/%")] == ["b/%"]
    assert [k for k, _ in store.kv.scan("b/*")] == []  # no glob either
    assert store.kv.scan("zzz") == []


def test_scan_pages_with_after_key(store):
    keys = [f"p/{i:03d}" for i in range(23)] + ["q/000", "o/999"]
    for k in keys:
        store.kv.put(k, b"x")
    seen: list[str] = []
    after = None
    while page := store.kv.scan("p/", after_key=after, limit=5):
        assert len(page) <= 5
        seen.extend(k for k, _ in page)
        after = page[-1][0]
    assert seen == [f"p/{i:03d}" for i in range(23)]
    assert [k for k, _ in store.kv.scan("p/", after_key="p/0205", limit=2)] == ["p/021", "p/022"]
    assert store.kv.scan("p/", after_key="p/022") == []
    assert [k for k, _ in store.kv.scan("p/", after_key="a", limit=1)] == ["p/000"]


def test_scan_limit_counts_only_live_keys(timed):
    s = timed.store
    s.kv.put("p/1", b"x", ttl=TTL)
    s.kv.put("p/2", b"x", ttl=TTL)
    s.kv.put("p/3", b"x")
    s.kv.put("p/4", b"x")
    timed.advance(PAST)
    assert [k for k, _ in s.kv.scan("p/", limit=1)] == ["p/3"]
    assert [k for k, _ in s.kv.scan("p/", limit=2)] == ["p/3", "p/4"]


def test_get_many_in_the_order_asked(store):
    a = store.kv.put("a", b"1")
    b = store.kv.put("b", b"2")
    assert store.kv.get_many(["b", "missing", "a", "b"]) == [b, None, a, b]
    assert store.kv.get_many([]) == []


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_incr_and_cas_lose_no_update(store):
    threads, rounds = 4, 50
    barrier = threading.Barrier(threads)

    def work(_: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            store.kv.incr("counter")
            while True:
                cur = store.kv.get("cas-counter")
                if cur is None:
                    if store.kv.cas("cas-counter", None, b"1") is not None:
                        break
                elif store.kv.cas("cas-counter", cur.version, b"%d" % (int(cur.value) + 1)):
                    break

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    assert int(store.kv.get("counter").value) == threads * rounds
    assert int(store.kv.get("cas-counter").value) == threads * rounds
