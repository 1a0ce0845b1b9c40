"""LeaseStore conformance: capacity stored with the name, one grant per
acquisition, grant ids, data, fencing tokens, renewal, release, holders, wait."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from taskspace.backends.base import Grant
from taskspace.errors import ConfigError
from tests.conformance.conftest import LONG, PAST, TTL


def test_acquire_grants_a_slot(store):
    before = store.clock.now()
    g = store.leases.acquire("res", "h1", LONG)
    after = store.clock.now()
    assert isinstance(g, Grant)
    assert (g.name, g.holder, g.data) == ("res", "h1", b"")
    assert isinstance(g.id, str) and g.id
    assert g.token > 0
    assert before + LONG <= g.expires <= after + LONG
    assert store.leases.holders("res") == [g]


def test_capacity_is_respected(store):
    g1 = store.leases.acquire("res", "h1", LONG, capacity=2)
    g2 = store.leases.acquire("res", "h2", LONG, capacity=2)
    assert g1 is not None and g2 is not None
    assert store.leases.acquire("res", "h3", LONG, capacity=2) is None
    assert [g.holder for g in store.leases.holders("res")] == ["h1", "h2"]
    assert store.leases.release(g1) is True
    g3 = store.leases.acquire("res", "h3", LONG, capacity=2)
    assert g3 is not None
    assert g3.token > g2.token > g1.token
    assert store.leases.acquire("res", "h4", LONG, capacity=2) is None
    assert [g.holder for g in store.leases.holders("res")] == ["h2", "h3"]


def test_capacity_is_stored_with_the_name_while_it_has_live_grants(store):
    g = store.leases.acquire("res", "h1", LONG, capacity=2)
    assert g is not None
    for other in (1, 3):
        with pytest.raises(ConfigError):
            store.leases.acquire("res", "h2", LONG, capacity=other)
    assert store.leases.holders("res") == [g]  # the refused calls took nothing
    assert store.leases.release(g) is True
    # no live grant: the name may be used with another capacity now
    single = store.leases.acquire("res", "h2", LONG, capacity=1)
    assert single is not None
    assert store.leases.acquire("res", "h3", LONG, capacity=1) is None


def test_capacity_is_freed_with_the_name_after_expiry(timed):
    s = timed.store
    assert s.leases.acquire("res", "h1", TTL, capacity=3) is not None
    timed.advance(PAST)
    assert s.leases.acquire("res", "h2", LONG, capacity=1) is not None


@pytest.mark.parametrize(("ttl", "capacity"), [(0.0, 1), (-1.0, 1), (LONG, 0), (LONG, -2)], ids=str)
def test_bad_arguments_raise_config_error(store, ttl, capacity):
    with pytest.raises(ConfigError):
        store.leases.acquire("res", "h", ttl, capacity=capacity)
    assert store.leases.holders("res") == []
    g = store.leases.acquire("res", "h", LONG)
    if ttl <= 0:
        with pytest.raises(ConfigError):
            store.leases.renew([g], ttl)
        assert store.leases.holders("res") == [g]


def test_equal_holders_get_distinct_grants(store):
    a = store.leases.acquire("res", "same", LONG, capacity=2)
    b = store.leases.acquire("res", "same", LONG, capacity=2)
    assert a is not None and b is not None
    assert a.id != b.id and b.token > a.token
    assert store.leases.acquire("res", "same", LONG, capacity=2) is None
    assert store.leases.holders("res") == [a, b]
    # and with capacity 1 an equal holder is simply refused: no re-entrancy
    c = store.leases.acquire("one", "same", LONG)
    assert c is not None
    assert store.leases.acquire("one", "same", LONG) is None


def test_grant_id_makes_acquire_idempotent(store):
    g = store.leases.acquire("res", "h1", LONG, capacity=2, grant_id="g-1")
    assert g is not None and g.id == "g-1"
    again = store.leases.acquire("res", "h1", LONG, capacity=2, grant_id="g-1")
    assert again == g  # returned unchanged: same token, same expiry, no second slot
    assert store.leases.holders("res") == [g]
    other = store.leases.acquire("res", "h2", LONG, capacity=2)
    assert other is not None  # the second slot was still free
    assert store.leases.acquire("res", "h1", LONG, capacity=2, grant_id="g-1") == g
    assert store.leases.release(g) is True
    # no live grant with that id any more: a fresh grant, with a fresh token
    fresh = store.leases.acquire("res", "h1", LONG, capacity=2, grant_id="g-1")
    assert fresh is not None and fresh.id == "g-1"
    assert fresh.token > other.token > g.token


def test_a_live_grant_id_is_refused_for_another_name(timed):
    s = timed.store
    g = s.leases.acquire("a", "h", TTL, grant_id="gid")
    assert g is not None
    with pytest.raises(ConfigError, match="gid"):
        s.leases.acquire("b", "h", LONG, grant_id="gid")
    assert s.leases.holders("b") == []
    assert s.leases.holders("a") == [g]
    timed.pass_time_until(g.expires)  # expired: the id is free for any name
    other = s.leases.acquire("b", "h", LONG, grant_id="gid")
    assert other is not None and (other.name, other.id) == ("b", "gid")
    assert s.leases.release(other) is True
    assert s.leases.acquire("a", "h", LONG, grant_id="gid") is not None  # released: free too


def test_data_rides_on_the_grant(timed):
    s = timed.store
    g = s.leases.acquire("leader", "host:1", LONG, data=b"\x00http://10.0.0.1:80")
    assert g is not None and g.data == b"\x00http://10.0.0.1:80"
    assert s.leases.holders("leader")[0].data == g.data
    timed.advance(0.05)
    (r,) = s.leases.renew([g], LONG)
    assert r is not None and r.data == g.data
    assert s.leases.holders("leader") == [r]


def test_names_are_independent(store):
    a = store.leases.acquire("a", "h1", LONG)
    b = store.leases.acquire("b", "h2", LONG, capacity=5)
    assert a is not None and b is not None
    assert store.leases.acquire("a", "h2", LONG) is None
    assert store.leases.holders("a") == [a]
    assert store.leases.holders("b") == [b]
    assert store.leases.holders("c") == []


def test_tokens_increase_across_release(store):
    tokens = []
    for holder in ["h1", "h1", "h2", "h1"]:
        g = store.leases.acquire("res", holder, LONG)
        assert g is not None
        tokens.append(g.token)
        assert store.leases.release(g) is True
    other = store.leases.acquire("other-name", "h", LONG)
    tokens.append(other.token)
    assert all(a < b for a, b in itertools.pairwise(tokens))


def test_tokens_increase_across_expiry(timed):
    s = timed.store
    g1 = s.leases.acquire("res", "h1", TTL)
    assert g1 is not None
    assert s.leases.acquire("res", "h2", TTL) is None
    timed.advance(PAST)
    assert s.leases.holders("res") == []
    g2 = s.leases.acquire("res", "h2", LONG)
    assert g2 is not None and g2.token > g1.token
    assert s.leases.release(g2) is True
    g3 = s.leases.acquire("res", "h1", LONG)
    assert g3 is not None and g3.token > g2.token


def test_renew_extends_live_grants_and_reports_lost_ones(timed):
    s = timed.store
    a = s.leases.acquire("res", "a", TTL, capacity=3)
    b = s.leases.acquire("res", "b", TTL, capacity=3)
    c = s.leases.acquire("other", "c", TTL)
    assert s.leases.release(b) is True
    timed.advance(TTL * 0.6)
    before = s.clock.now()
    got = s.leases.renew([a, b, c], TTL)
    after = s.clock.now()
    assert len(got) == 3 and got[1] is None
    ra, rc = got[0], got[2]
    assert ra is not None and rc is not None
    for old, new in ((a, ra), (c, rc)):
        assert (new.name, new.id, new.holder, new.token, new.data) == (
            old.name, old.id, old.holder, old.token, old.data,
        )  # fmt: skip
        assert before + TTL <= new.expires <= after + TTL
    timed.advance(TTL * 0.6)  # past the first expiry, within the renewed one
    assert s.leases.holders("res") == [ra]
    assert s.leases.holders("other") == [rc]
    assert s.leases.renew([], LONG) == []


def test_renew_after_expiry_fails(timed):
    s = timed.store
    g = s.leases.acquire("res", "h1", TTL, capacity=2)
    timed.advance(PAST)
    assert s.leases.renew([g], LONG) == [None]
    assert s.leases.release(g) is False
    assert s.leases.holders("res") == []
    other = s.leases.acquire("res", "h2", LONG, capacity=2)
    assert s.leases.renew([g], LONG) == [None]
    assert s.leases.holders("res") == [other]


def test_only_the_current_grant_renews_or_releases(store):
    old = store.leases.acquire("res", "h1", LONG, grant_id="gid")
    assert store.leases.release(old) is True
    assert store.leases.release(old) is False
    assert store.leases.renew([old], LONG) == [None]
    new = store.leases.acquire("res", "h1", LONG, grant_id="gid")  # same id, new token
    assert new is not None and new.token > old.token
    assert store.leases.release(old) is False
    assert store.leases.renew([old], LONG) == [None]
    forged = [
        replace(new, token=new.token + 1),
        replace(new, id="another-id"),
        replace(new, name="other-name"),
    ]
    for fake in forged:
        assert store.leases.renew([fake], LONG) == [None]
        assert store.leases.release(fake) is False
    assert store.leases.holders("res") == [new]
    assert store.leases.release(new) is True
    assert store.leases.holders("res") == []


def test_holders_oldest_token_first_and_drops_expired(timed):
    s = timed.store
    a = s.leases.acquire("res", "a", LONG, capacity=3)
    b = s.leases.acquire("res", "b", TTL, capacity=3)
    c = s.leases.acquire("res", "c", LONG, capacity=3)
    assert s.leases.holders("res") == [a, b, c]
    s.leases.release(a)
    a2 = s.leases.acquire("res", "a", LONG, capacity=3)  # re-granted: now the newest token
    assert [g.holder for g in s.leases.holders("res")] == ["b", "c", "a"]
    timed.advance(PAST)
    assert s.leases.holders("res") == [c, a2]
    d = s.leases.acquire("res", "d", LONG, capacity=3)  # the expired slot is free again
    assert d is not None
    assert s.leases.acquire("res", "e", LONG, capacity=3) is None
    assert [g.holder for g in s.leases.holders("res")] == ["c", "a", "d"]


def test_concurrent_acquire_respects_capacity(store):
    threads, capacity = 8, 3
    barrier = threading.Barrier(threads)

    def contend(k: int) -> Grant | None:
        barrier.wait()
        return store.leases.acquire("res", f"h{k}", LONG, capacity=capacity)

    with ThreadPoolExecutor(threads) as pool:
        grants = [g for g in pool.map(contend, range(threads)) if g is not None]
    assert len(grants) == capacity
    assert len({g.token for g in grants}) == capacity
    assert store.leases.holders("res") == sorted(grants, key=lambda g: g.token)


# -- wait ----------------------------------------------------------------------------


def _release_later(store, grant: Grant, delay: float) -> threading.Thread:
    t = threading.Timer(delay, store.leases.release, (grant,))
    t.start()
    return t


def test_wait_returns_promptly_after_a_release(store):
    g = store.leases.acquire("res", "h1", LONG)
    t = _release_later(store, g, 0.1)
    start = time.monotonic()
    store.leases.wait("res", 10.0)
    elapsed = time.monotonic() - start
    t.join()
    assert elapsed < 2.0  # well before the timeout
    assert store.leases.acquire("res", "h2", LONG) is not None


def test_wait_returns_after_a_release_by_another_client(peers):
    a, b = peers
    g = b.leases.acquire("res", "h1", LONG)
    t = _release_later(b, g, 0.1)
    start = time.monotonic()
    a.leases.wait("res", 10.0)
    elapsed = time.monotonic() - start
    t.join()
    assert elapsed < 2.0
    assert a.leases.acquire("res", "h2", LONG) is not None


def test_wait_ends_by_the_earliest_expiry(store):
    store.leases.acquire("res", "long", LONG, capacity=2)
    store.leases.acquire("res", "short", 0.3, capacity=2)
    start = time.monotonic()
    while store.leases.acquire("res", "me", LONG, capacity=2) is None:
        assert time.monotonic() - start < 3.0
        store.leases.wait("res", 10.0)
    assert time.monotonic() - start < 3.0


def test_wait_times_out(store):
    store.leases.acquire("res", "h1", LONG)
    start = time.monotonic()
    store.leases.wait("res", 0.2)
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    store.leases.wait("free", 0.2)  # may return at once or at the timeout
    assert time.monotonic() - start < 1.5
