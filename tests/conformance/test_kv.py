"""KVStore conformance: versions, compare-and-set, TTL, incr, delete, scan."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskspace.backends.base import Versioned
from tests.conformance.conftest import PAST, TTL


def test_put_get_round_trip(store):
    assert store.kv_get("k") is None
    v1 = store.kv_put("k", b"\x00one")
    got = store.kv_get("k")
    assert got == Versioned(b"\x00one", v1, None)
    v2 = store.kv_put("k", b"two")
    assert v2 > v1
    assert store.kv_get("k") == Versioned(b"two", v2, None)
    assert store.kv_put("empty", b"") > 0
    assert store.kv_get("empty").value == b""


def test_versions_strictly_increase_per_key(store):
    versions = [store.kv_put("k", b"a")]
    versions.append(store.kv_cas("k", versions[-1], b"b"))
    versions.append(store.kv_put("other", b"x"))  # another key in between
    versions.append(store.kv_put("k", b"c"))
    store.kv_incr("n")
    versions.append(store.kv_get("n").version)
    versions.append(store.kv_put("k", b"d"))
    k_versions = [versions[0], versions[1], versions[3], versions[5]]
    assert all(a < b for a, b in itertools.pairwise(k_versions))
    assert store.kv_get("k").version == k_versions[-1]


def test_versions_increase_across_delete_and_recreate(store):
    v1 = store.kv_put("k", b"a")
    assert store.kv_delete("k") is True
    v2 = store.kv_put("k", b"a")
    assert v2 > v1
    assert store.kv_delete("k") is True
    v3 = store.kv_cas("k", None, b"a")
    assert v3 is not None and v3 > v2
    assert store.kv_delete("k") is True
    store.kv_incr("k")
    v4 = store.kv_get("k").version
    assert v4 > v3
    # no ABA: a CAS against the first incarnation's version must fail
    assert store.kv_cas("k", v1, b"z") is None


def test_versions_increase_across_expiry(timed):
    s = timed.store
    v1 = s.kv_put("k", b"a", ttl=TTL)
    timed.advance(PAST)
    v2 = s.kv_put("k", b"b")
    assert v2 > v1


def test_cas_none_requires_absence(store):
    v1 = store.kv_cas("k", None, b"first")
    assert v1 is not None
    assert store.kv_get("k") == Versioned(b"first", v1, None)
    assert store.kv_cas("k", None, b"second") is None
    assert store.kv_get("k").value == b"first"


def test_cas_with_version(store):
    v1 = store.kv_put("k", b"a")
    v2 = store.kv_cas("k", v1, b"b")
    assert v2 is not None and v2 > v1
    assert store.kv_get("k") == Versioned(b"b", v2, None)
    assert store.kv_cas("k", v1, b"stale") is None
    assert store.kv_cas("k", v2 + 1000, b"future") is None
    assert store.kv_get("k") == Versioned(b"b", v2, None)
    assert store.kv_cas("absent", v1, b"x") is None
    assert store.kv_get("absent") is None


def test_cas_sets_ttl(timed):
    s = timed.store
    v = s.kv_cas("k", None, b"a", ttl=TTL)
    assert s.kv_get("k").expires == pytest.approx(s.now() + TTL, abs=0.1)
    v2 = s.kv_cas("k", v, b"b")  # a write without ttl makes the key permanent
    assert s.kv_get("k").expires is None
    timed.advance(PAST)
    assert s.kv_get("k") == Versioned(b"b", v2, None)


def test_ttl_expiry_behaves_like_missing(timed):
    s = timed.store
    v1 = s.kv_put("app/a", b"short", ttl=TTL)
    s.kv_put("app/b", b"long")
    got = s.kv_get("app/a")
    assert got is not None and got.value == b"short"
    assert got.expires == pytest.approx(s.now() + TTL, abs=0.1)
    assert [k for k, _ in s.kv_scan("app/")] == ["app/a", "app/b"]

    timed.advance(PAST)
    assert s.kv_get("app/a") is None
    assert [k for k, _ in s.kv_scan("app/")] == ["app/b"]
    assert s.kv_delete("app/a") is False
    assert s.kv_delete("app/a", v1) is False
    assert s.kv_cas("app/a", v1, b"x") is None
    v2 = s.kv_cas("app/a", None, b"new")
    assert v2 is not None and v2 > v1
    assert s.kv_get("app/a") == Versioned(b"new", v2, None)


def test_incr_on_expired_key_starts_from_zero(timed):
    s = timed.store
    s.kv_put("n", b"41", ttl=TTL)
    assert s.kv_incr("n") == 42
    timed.advance(PAST)
    assert s.kv_incr("n", 5) == 5


def test_incr_ttl_applies_only_on_create(timed):
    s = timed.store
    assert s.kv_incr("n", ttl=TTL) == 1
    expires = s.kv_get("n").expires
    assert expires == pytest.approx(s.now() + TTL, abs=0.1)
    assert s.kv_incr("n", ttl=60.0) == 2
    assert s.kv_incr("n") == 3
    assert s.kv_get("n").expires == pytest.approx(expires, abs=0.05)
    timed.advance(PAST)
    assert s.kv_get("n") is None
    assert s.kv_incr("n") == 1
    assert s.kv_get("n").expires is None


def test_incr(store):
    assert store.kv_incr("n") == 1
    assert store.kv_incr("n", 10) == 11
    assert store.kv_incr("n", -20) == -9
    assert int(store.kv_get("n").value) == -9
    assert store.kv_incr("m", -3) == -3
    store.kv_put("p", b"100")
    v = store.kv_get("p").version
    assert store.kv_incr("p", 5) == 105
    assert store.kv_get("p").version > v
    assert int(store.kv_get("p").value) == 105


def test_delete(store):
    assert store.kv_delete("k") is False
    v1 = store.kv_put("k", b"a")
    assert store.kv_delete("k", v1 + 1000) is False
    assert store.kv_get("k") == Versioned(b"a", v1, None)
    v2 = store.kv_put("k", b"b")
    assert store.kv_delete("k", v1) is False
    assert store.kv_get("k").value == b"b"
    assert store.kv_delete("k", v2) is True
    assert store.kv_get("k") is None
    assert store.kv_delete("k", v2) is False
    store.kv_put("k", b"c")
    assert store.kv_delete("k") is True
    assert store.kv_get("k") is None


def test_scan_prefix_order_and_limit(store):
    keys = ["b/2", "a", "b/10", "b/1", "b", "b/", "ba", "c/1", "b/\u00e9", "b/Z", "b/_", "b/%"]
    versions = {k: store.kv_put(k, k.encode()) for k in keys}
    expected = sorted(k for k in keys if k.startswith("b/"))
    pairs = store.kv_scan("b/")
    assert [k for k, _ in pairs] == expected
    assert all(v == Versioned(k.encode(), versions[k], None) for k, v in pairs)
    assert [k for k, _ in store.kv_scan("b/", limit=3)] == expected[:3]
    assert store.kv_scan("b/", limit=0) == []
    assert [k for k, _ in store.kv_scan("b/", limit=100)] == expected
    assert [k for k, _ in store.kv_scan("")] == sorted(keys)
    assert [k for k, _ in store.kv_scan("b/_")] == ["b/_"]  # no LIKE wildcards
    assert [k for k, _ in store.kv_scan("b/%")] == ["b/%"]
    assert store.kv_scan("zzz") == []


def test_scan_limit_counts_only_live_keys(timed):
    s = timed.store
    s.kv_put("p/1", b"x", ttl=TTL)
    s.kv_put("p/2", b"x", ttl=TTL)
    s.kv_put("p/3", b"x")
    s.kv_put("p/4", b"x")
    timed.advance(PAST)
    assert [k for k, _ in s.kv_scan("p/", limit=1)] == ["p/3"]
    assert [k for k, _ in s.kv_scan("p/", limit=2)] == ["p/3", "p/4"]


def test_concurrent_incr_and_cas_lose_no_update(store):
    threads, rounds = 4, 50
    barrier = threading.Barrier(threads)

    def work(_: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            store.kv_incr("counter")
            while True:
                cur = store.kv_get("cas-counter")
                if cur is None:
                    if store.kv_cas("cas-counter", None, b"1") is not None:
                        break
                elif store.kv_cas("cas-counter", cur.version, b"%d" % (int(cur.value) + 1)):
                    break

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    assert int(store.kv_get("counter").value) == threads * rounds
    assert int(store.kv_get("cas-counter").value) == threads * rounds
