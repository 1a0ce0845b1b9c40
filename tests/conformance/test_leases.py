"""LeaseStore conformance: capacity, fencing tokens, renewal, release, holders."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskspace.backends.base import Grant
from tests.conformance.conftest import PAST, TTL

LONG = 60.0


def test_acquire_grants_a_slot(store):
    before = store.clock.now()
    g = store.acquire("res", "h1", 1, LONG)
    assert isinstance(g, Grant)
    assert (g.name, g.holder) == ("res", "h1")
    assert g.token > 0
    assert g.expires == pytest.approx(before + LONG, abs=1.0)
    assert store.holders("res") == [g]


def test_capacity_is_respected(store):
    g1 = store.acquire("res", "h1", 2, LONG)
    g2 = store.acquire("res", "h2", 2, LONG)
    assert g1 is not None and g2 is not None
    assert store.acquire("res", "h3", 2, LONG) is None
    assert [g.holder for g in store.holders("res")] == ["h1", "h2"]
    assert store.release(g1) is True
    g3 = store.acquire("res", "h3", 2, LONG)
    assert g3 is not None
    assert g3.token > g2.token > g1.token
    assert store.acquire("res", "h4", 2, LONG) is None
    assert [g.holder for g in store.holders("res")] == ["h2", "h3"]


def test_names_are_independent(store):
    a = store.acquire("a", "h1", 1, LONG)
    b = store.acquire("b", "h2", 1, LONG)
    assert a is not None and b is not None
    assert store.acquire("a", "h2", 1, LONG) is None
    assert store.holders("a") == [a]
    assert store.holders("b") == [b]
    assert store.holders("c") == []


def test_reacquire_by_holder_renews_same_token_without_using_a_slot(timed):
    s = timed.store
    g = s.acquire("res", "h1", 1, TTL)
    assert g is not None
    timed.advance(TTL * 0.6)
    again = s.acquire("res", "h1", 1, TTL)
    assert again is not None
    assert again.token == g.token
    assert again.expires > g.expires
    assert s.holders("res") == [again]
    timed.advance(TTL * 0.6)  # past the first expiry, within the renewed one
    assert s.holders("res") == [again]
    assert s.acquire("res", "h2", 1, TTL) is None


def test_tokens_increase_across_release(store):
    tokens = []
    for holder in ["h1", "h1", "h2", "h1"]:
        g = store.acquire("res", holder, 1, LONG)
        assert g is not None
        tokens.append(g.token)
        assert store.release(g) is True
    assert all(a < b for a, b in itertools.pairwise(tokens))


def test_tokens_increase_across_expiry(timed):
    s = timed.store
    g1 = s.acquire("res", "h1", 1, TTL)
    assert g1 is not None
    assert s.acquire("res", "h2", 1, TTL) is None
    timed.advance(PAST)
    assert s.holders("res") == []
    g2 = s.acquire("res", "h2", 1, LONG)
    assert g2 is not None
    assert g2.token > g1.token
    # the expired holder coming back gets a fresh, larger token, not its old one
    assert s.release(g2) is True
    g3 = s.acquire("res", "h1", 1, LONG)
    assert g3 is not None
    assert g3.token > g2.token


def test_renew_grant_extends_a_live_grant(timed):
    s = timed.store
    g = s.acquire("res", "h1", 1, TTL)
    timed.advance(TTL * 0.6)
    r = s.renew_grant(g, TTL)
    assert r is not None
    assert (r.name, r.holder, r.token) == (g.name, g.holder, g.token)
    assert r.expires > g.expires
    timed.advance(TTL * 0.6)
    assert s.holders("res") == [r]
    assert s.renew_grant(r, LONG) is not None
    assert s.acquire("res", "h2", 1, TTL) is None


def test_renew_grant_after_expiry_fails(timed):
    s = timed.store
    g = s.acquire("res", "h1", 1, TTL)
    timed.advance(PAST)
    assert s.renew_grant(g, LONG) is None
    assert s.holders("res") == []
    other = s.acquire("res", "h2", 1, LONG)
    assert other is not None
    assert s.renew_grant(g, LONG) is None
    assert s.holders("res") == [other]


def test_renew_grant_after_expiry_fails_even_before_anyone_else_acquires(timed):
    s = timed.store
    g = s.acquire("res", "h1", 2, TTL)
    timed.advance(PAST)
    assert s.renew_grant(g, LONG) is None
    assert s.release(g) is False
    again = s.acquire("res", "h1", 2, LONG)
    assert again is not None
    assert again.token > g.token


def test_renew_grant_with_stale_token_fails(store):
    old = store.acquire("res", "h1", 1, LONG)
    assert store.release(old) is True
    assert store.renew_grant(old, LONG) is None
    new = store.acquire("res", "h1", 1, LONG)
    assert new.token > old.token
    assert store.renew_grant(old, LONG) is None
    assert store.holders("res") == [new]


def test_release_with_stale_grant_fails(store):
    old = store.acquire("res", "h1", 1, LONG)
    assert store.release(old) is True
    assert store.release(old) is False
    new = store.acquire("res", "h1", 1, LONG)
    assert store.release(old) is False
    assert store.holders("res") == [new]
    forged = Grant("res", "h2", new.token, new.expires)
    assert store.release(forged) is False
    assert store.holders("res") == [new]
    assert store.release(new) is True
    assert store.holders("res") == []


def test_holders_oldest_token_first_and_drops_expired(timed):
    s = timed.store
    a = s.acquire("res", "a", 3, LONG)
    b = s.acquire("res", "b", 3, TTL)
    c = s.acquire("res", "c", 3, LONG)
    assert [g.holder for g in s.holders("res")] == ["a", "b", "c"]
    assert [g.token for g in s.holders("res")] == sorted([a.token, b.token, c.token])
    s.release(a)
    a2 = s.acquire("res", "a", 3, LONG)  # re-granted: now the newest token
    assert [g.holder for g in s.holders("res")] == ["b", "c", "a"]
    timed.advance(PAST)
    assert s.holders("res") == [c, a2]
    # the expired slot is free again
    d = s.acquire("res", "d", 3, LONG)
    assert d is not None
    assert s.acquire("res", "e", 3, LONG) is None
    assert [g.holder for g in s.holders("res")] == ["c", "a", "d"]


def test_concurrent_acquire_respects_capacity(store):
    threads, capacity = 8, 3
    barrier = threading.Barrier(threads)

    def contend(k: int) -> Grant | None:
        barrier.wait()
        return store.acquire("res", f"h{k}", capacity, LONG)

    with ThreadPoolExecutor(threads) as pool:
        grants = [g for g in pool.map(contend, range(threads)) if g is not None]
    assert len(grants) == capacity
    assert len({g.token for g in grants}) == capacity
    assert sorted(store.holders("res"), key=lambda g: g.holder) == sorted(
        grants, key=lambda g: g.holder
    )
