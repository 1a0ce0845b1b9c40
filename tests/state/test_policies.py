"""Eviction policies (taskspace.state.policies): LRU and LFU against cachetools for
identical operation sequences, TTL expiry on an injected clock, W-TinyLFU's
admission (scan resistance), bounds, bad input, and a small hit-rate check.

No backend is involved: these are in-process structures (each test runs once).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Hashable
from typing import Any

import cachetools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskspace.errors import ConfigError
from taskspace.state.policies import (
    MISSING,
    POLICIES,
    LFUPolicy,
    LRUPolicy,
    Policy,
    TinyLFUPolicy,
    TTLPolicy,
    make_policy,
)

# ---------------------------------------------------------------- helpers


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def zipf_stream(requests: int, keys: int, seed: int, shifts: int = 0) -> list[int]:
    """Zipf(1.0) ranks over ``keys`` keys; with ``shifts``, ranks re-permuted at even points."""
    rnd = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / r for r in range(1, keys + 1)))
    ranks = rnd.choices(range(keys), cum_weights=cum, k=requests)
    out, phase = [], requests // (shifts + 1)
    mapping = list(range(keys))
    for i, rank in enumerate(ranks):
        if shifts and i and i % phase == 0:
            rnd.shuffle(mapping)
        out.append(mapping[rank])
    return out


def read_through(policy: Policy, stream: list[int]) -> float:
    """Hit rate of a read-through client (get; on a miss put)."""
    hits = 0
    for key in stream:
        if policy.get(key) is MISSING:
            policy.put(key, key)
        else:
            hits += 1
    return hits / len(stream)


OPS = st.lists(
    st.tuples(st.sampled_from(["get", "get", "put", "pop"]), st.integers(0, 9), st.integers()),
    max_size=120,
)


def replay_against(policy: Policy, reference: Any, ops: list[tuple[str, int, int]]) -> None:
    """Apply ``ops`` to both; every result and the held key set must agree at every step."""
    for op, key, value in ops:
        if op == "get":
            assert policy.get(key) == reference.get(key, MISSING), (op, key)
        elif op == "put":
            policy.put(key, value)
            reference[key] = value
        else:
            assert policy.pop(key, "absent") == reference.pop(key, "absent"), (op, key)
        held = {k for k in range(10) if k in policy}
        assert held == set(reference.keys())
        assert len(policy) == len(reference) <= policy.capacity


# ---------------------------------------------------------------- LRU / LFU against cachetools


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 5), ops=OPS)
def test_lru_matches_cachetools_lrucache(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    replay_against(make_policy("lru", capacity), cachetools.LRUCache(capacity), ops)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 5), ops=OPS)
def test_lfu_matches_cachetools_lfucache(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    replay_against(make_policy("lfu", capacity), cachetools.LFUCache(capacity), ops)


def test_lru_evicts_least_recently_used() -> None:
    lru = make_policy("lru", 3)
    for key in "abc":
        lru.put(key, key.upper())
    assert lru.get("a") == "A"  # a is now the most recent: b is next out
    lru.put("d", "D")
    assert "b" not in lru
    assert [k for k in "abcd" if k in lru] == ["a", "c", "d"]
    assert lru.get("b") is MISSING
    assert lru.get("b", None) is None


def test_lfu_keeps_the_frequently_used_and_forgets_counts_of_evicted() -> None:
    lfu = make_policy("lfu", 3)
    for key in "abc":
        lfu.put(key, key)
    for _ in range(5):
        lfu.get("a")
    lfu.get("b")
    lfu.put("d", "d")  # c has the lowest count (1)
    assert "c" not in lfu and {"a", "b", "d"} == {k for k in "abcd" if k in lfu}
    lfu.put("e", "e")  # d: count 1, the least recently counted among the lowest
    assert "d" not in lfu
    lfu.pop("a")  # pop records nothing and keeps the structure consistent
    lfu.put("c", "c")
    lfu.put("f", "f")  # lowest counts: e (1), c (1): e is older
    assert {k for k in "abcdef" if k in lfu} == {"b", "c", "f"}
    lfu.clear()
    assert len(lfu) == 0 and lfu.get("b") is MISSING


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(POLICIES), capacity=st.integers(1, 6), ops=OPS)
def test_every_policy_is_a_consistent_bounded_map(
    name: str, capacity: int, ops: list[tuple[str, int, int]]
) -> None:
    """Whatever it evicts, a policy never holds more than ``capacity`` and a held key's
    value is the last one put."""
    policy = make_policy(name, capacity)
    model: dict[int, int] = {}  # the last value put per key (a superset of what is held)
    for op, key, value in ops:
        if op == "put":
            policy.put(key, value)
            model[key] = value
            assert key in policy  # a new key always lands (tinylfu: in the window)
        elif op == "get":
            got = policy.get(key)
            assert got is MISSING or got == model[key]
        else:
            got = policy.pop(key, MISSING)
            assert got is MISSING or got == model.pop(key)
            assert key not in policy
        assert len(policy) <= capacity
        assert len(policy) == sum(k in policy for k in range(10))


# ---------------------------------------------------------------- TTL


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["get", "get", "put", "pop", "tick"]),
            st.integers(0, 7),
            st.integers(0, 3),
        ),
        max_size=120,
    ),
)
def test_lru_with_ttl_matches_cachetools_ttlcache(
    capacity: int, ops: list[tuple[str, int, int]]
) -> None:
    """LRU + ttl against cachetools.TTLCache (LRU with per-put expiry) on one fake clock:
    the same hits, misses, expiries and evictions."""
    clock = FakeClock()
    policy = make_policy("lru", capacity, ttl=2.0, clock=clock)
    reference: Any = cachetools.TTLCache(capacity, ttl=2.0, timer=clock)
    for op, key, value in ops:
        if op == "tick":
            clock.now += value * 0.5  # 0 to 1.5 s: some reads land exactly on a deadline
        elif op == "get":
            assert policy.get(key) == reference.get(key, MISSING), (op, key)
        elif op == "put":
            policy.put(key, value)
            reference[key] = value
        else:
            assert policy.pop(key, "absent") == reference.pop(key, "absent"), (op, key)
        assert {k for k in range(8) if k in policy} == {k for k in range(8) if k in reference}
        assert len(policy) <= capacity


@pytest.mark.parametrize("name", POLICIES)
def test_ttl_expires_entries_after_their_put(name: str) -> None:
    clock = FakeClock()
    policy = make_policy(name, 10, ttl=5.0, clock=clock)
    assert isinstance(policy, TTLPolicy) and isinstance(policy, Policy)
    policy.put("a", 1)
    clock.now += 3
    policy.put("b", 2)
    assert policy.get("a") == 1 and policy.get("b") == 2 and len(policy) == 2
    clock.now += 2  # a's deadline (put + 5 s) is reached: expired
    assert "a" not in policy
    assert policy.get("a") is MISSING
    assert policy.get("b") == 2
    assert len(policy) == 1
    policy.put("b", 3)  # a replacing put gives a fresh deadline
    clock.now += 4
    assert policy.get("b") == 3
    clock.now += 1
    assert policy.pop("b", "gone") == "gone"
    assert len(policy) == 0


@pytest.mark.parametrize("name", POLICIES)
def test_ttl_sweeps_expired_entries_on_put_so_they_hold_no_capacity(name: str) -> None:
    clock = FakeClock()
    policy = make_policy(name, 100, ttl=1.0, clock=clock)
    assert isinstance(policy, TTLPolicy)
    for key in range(100):
        policy.put(key, key)
    clock.now += 1.5
    policy.put("fresh", 0)
    assert len(policy) == 1  # every expired entry went at once, nothing was evicted live
    assert len(policy._deadlines) == 1
    for key in range(1000):  # evictions by the policy forget their deadlines too
        policy.put(("k", key), key)
    assert len(policy) <= 100 and len(policy._deadlines) == len(policy)


def test_ttl_expired_get_still_counts_for_tinylfu_and_clear_forgets() -> None:
    clock = FakeClock()
    policy = make_policy("tinylfu", 50, ttl=2.0, clock=clock)
    assert isinstance(policy, TTLPolicy)
    inner = policy._inner
    assert isinstance(inner, TinyLFUPolicy)
    policy.put("k", 1)
    clock.now += 2.5
    before = inner.frequency("k")
    assert policy.get("k") is MISSING
    assert inner.frequency("k") == before + 1
    policy.clear()
    assert len(policy) == 0 and inner.frequency("k") == 0


# ---------------------------------------------------------------- W-TinyLFU


def test_tinylfu_scan_of_one_hit_keys_does_not_flush_the_hot_set() -> None:
    """10,000 keys seen once each (50x the capacity), while the hot set goes on being
    used (one hot access per 4 scanned keys): LRU loses the hot set, TinyLFU keeps it."""
    capacity, hot = 200, list(range(100))
    tiny, lru = make_policy("tinylfu", capacity), make_policy("lru", capacity)
    rnd = random.Random(3)

    def access(key: int) -> None:
        for policy in (tiny, lru):
            if policy.get(key) is MISSING:
                policy.put(key, key)

    for _ in range(10):
        for key in rnd.sample(hot, len(hot)):
            access(key)
    for scanned in range(10_000, 20_000):
        access(scanned)
        if scanned % 4 == 0:
            access(rnd.choice(hot))
    assert sum(key in tiny for key in hot) >= 95
    assert sum(key in lru for key in hot) <= 60  # LRU: ~300 scanned keys between two uses
    assert len(tiny) == capacity


def test_tinylfu_admits_a_candidate_only_if_more_frequent_than_the_victim() -> None:
    tiny = TinyLFUPolicy(100)  # window 1, main 99
    for key in range(100):
        tiny.put(key, key)
        for _ in range(3):
            tiny.get(key)
    assert len(tiny) == 100
    tiny.put("new", 0)  # window overflow: the candidate (99) vs the victim, equally frequent
    assert "new" in tiny and 99 not in tiny and len(tiny) == 100
    for _ in range(6):
        tiny.get("hot")  # six misses: the sketch counts them
    tiny.put("hot", 1)
    tiny.put("other", 2)  # candidate "hot" (6 misses) beats probation's first entry (3 gets)
    assert "hot" in tiny and "other" in tiny and len(tiny) == 100


def test_tinylfu_sketch_saturates_at_15_and_ages_by_halving() -> None:
    tiny = TinyLFUPolicy(16)  # halving after 160 increments
    for _ in range(20):
        tiny.get("a")
    assert tiny.frequency("a") == 15
    for key in range(140):
        tiny.get(("noise", key))
    assert tiny.frequency("a") == 7  # 160 increments: every counter halved
    assert tiny.frequency("never") < 7  # collisions add a little, never that much


def test_tinylfu_shrinks_protected_on_a_shift_only() -> None:
    """A steady stream never trips the hit-rate-drop check (protected stays at 90%);
    a re-permuted popularity does (protected to 10%), and protected grows back."""
    steady = TinyLFUPolicy(500)
    shares = set()
    for i, key in enumerate(zipf_stream(30_000, 5_000, seed=4)):
        if steady.get(key) is MISSING:
            steady.put(key, key)
        if i % 1024 == 0:
            shares.add(steady._share)
    assert shares == {0.9}
    moved = TinyLFUPolicy(500)
    shares_after: list[float] = []
    for i, key in enumerate(zipf_stream(60_000, 5_000, seed=4, shifts=1)):
        if moved.get(key) is MISSING:
            moved.put(key, key)
        if i >= 30_000 and i % 1024 == 0:
            shares_after.append(moved._share)
    assert min(shares_after[:4]) == pytest.approx(0.1)  # detected within ~4k requests
    assert shares_after[-1] == pytest.approx(0.9)  # and back to steady
    assert len(moved._protected) <= moved._protected_max


def test_tinylfu_recovers_when_popularity_shifts() -> None:
    stream = zipf_stream(60_000, 5_000, seed=7, shifts=3)
    tiny, lru = make_policy("tinylfu", 500), make_policy("lru", 500)
    assert read_through(tiny, stream) >= read_through(lru, stream) - 0.005


def test_tinylfu_beats_lru_on_zipf() -> None:
    stream = zipf_stream(50_000, 10_000, seed=1)
    rates = {name: read_through(make_policy(name, 500), stream) for name in POLICIES}
    assert rates["tinylfu"] > rates["lru"] + 0.02, rates
    assert rates["lfu"] > rates["lru"], rates


# ---------------------------------------------------------------- construction and bad input


def test_make_policy_returns_the_named_policy() -> None:
    kinds = {"tinylfu": TinyLFUPolicy, "lru": LRUPolicy, "lfu": LFUPolicy}
    for name, cls in kinds.items():
        policy = make_policy(name, 7)
        assert type(policy) is cls and policy.capacity == 7 and isinstance(policy, Policy)
    assert make_policy("lru", 3, ttl=1).capacity == 3


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": "arc"}, "name"),
        ({"name": "LRU"}, "name"),
        ({"name": None}, "name"),
        ({"capacity": 0}, "capacity"),
        ({"capacity": -1}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": "10"}, "capacity"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1.0}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"ttl": "1"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"clock": 3.0}, "clock"),
    ],
)
def test_bad_arguments_raise_config_error_naming_them(
    kwargs: dict[str, Any], argument: str
) -> None:
    args: dict[str, Any] = {"name": "lru", "capacity": 10, "ttl": 1.0, "clock": FakeClock()}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=rf"^{argument} "):
        make_policy(**args)


@pytest.mark.parametrize("name", POLICIES)
def test_unhashable_key_is_a_type_error_and_changes_nothing(name: str) -> None:
    policy = make_policy(name, 4)
    policy.put("a", 1)
    bad: Hashable = [1]  # type: ignore[assignment]
    with pytest.raises(TypeError):
        policy.put(bad, 2)
    with pytest.raises(TypeError):
        policy.get(bad)
    assert len(policy) == 1 and policy.get("a") == 1
