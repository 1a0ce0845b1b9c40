"""ShardedKV: slots (CRC16 vectors, the hash-tag rule), the versioned slot map,
bad input, balance and keys moved on a join, the KV methods through
rebalances on every backend, stale clients, resuming a stopped or killed
rebalance, and the acceptance test: writers and readers in other processes
(and threads) during add_shard+rebalance and remove_shard+rebalance lose no
acknowledged write and never read a value going backwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskspace import Space
from taskspace.backends.base import KV_CHANGES_KEEP
from taskspace.errors import (
    BackendError,
    Compacted,
    ConfigError,
    InvalidURL,
    TaskspaceError,
    VersionConflict,
)
from taskspace.state import NUM_SLOTS, ShardedKV, key_slot
from taskspace.state.sharding import (
    MAP_KEY,
    MARKER_PREFIX,
    MOVED,
    OWNED,
    decode_version,
    marker_key,
)
from taskspace.state.slots import (
    SHARD_ACTIVE,
    Move,
    SlotMap,
    apply_moves,
    crc16,
    crc16_table,
    hash_tag,
    plan_moves,
)
from tests.conftest import backend_url
from tests.services import RedisServer, free_port, postgres_url, shared_redis

REPO_ROOT = Path(__file__).resolve().parents[2]
START_WAIT_S = 20.0


def shard_urls(backend: str, tmp_path: Path, n: int) -> list[str]:
    """``n`` fresh, private shard URLs on ``backend``."""
    if backend == "memory":
        tag = uuid.uuid4().hex[:8]
        return [f"memory://shard-{tag}-{i}" for i in range(n)]
    if backend == "sqlite":
        return [f"sqlite:///{tmp_path}/shard{i}.db" for i in range(n)]
    if backend == "redis":
        return [shared_redis().namespaced_url() for _ in range(n)]
    if backend == "postgres":
        return [postgres_url() for _ in range(n)]
    raise AssertionError(backend)


def coordinator_url(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return f"memory://coord-{uuid.uuid4().hex[:8]}"
    return backend_url(backend, tmp_path)


@pytest.fixture
def memory_kv() -> Iterator[ShardedKV]:
    tag = uuid.uuid4().hex[:8]
    kv = ShardedKV([f"memory://m{tag}-{i}" for i in range(3)], coordinator=f"memory://c{tag}")
    yield kv
    kv.close()


# -- slots ---------------------------------------------------------------------


def test_crc16_and_key_slot_vectors() -> None:
    assert crc16(b"123456789") == 0x31C3
    assert crc16_table(b"123456789") == 0x31C3
    assert key_slot("somekey") == 11058
    assert key_slot("{user1}.following") == 8106
    assert key_slot("{user1}.followers") == 8106
    assert key_slot("123456789") == 0x31C3 % NUM_SLOTS == 12739


def test_hash_tag_rule_edge_cases() -> None:
    assert hash_tag("foo{}{bar}") == "foo{}{bar}"  # empty first tag: the whole key
    assert hash_tag("foo{{bar}}zap") == "{bar"  # first { then the first } after it
    assert hash_tag("foo{bar}{zap}") == "bar"
    assert hash_tag("{") == "{" and hash_tag("}{") == "}{"
    assert key_slot("é{ü}x") == key_slot("ü")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_crc16_matches_the_table_implementation(data: bytes) -> None:
    assert crc16(data) == crc16_table(data)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(st.characters(blacklist_characters="{"), max_size=8),
    tag=st.text(st.characters(blacklist_characters="}"), min_size=1, max_size=8),
    suffix=st.text(max_size=8),
)
def test_keys_sharing_a_tag_share_a_slot(prefix: str, tag: str, suffix: str) -> None:
    key = f"{prefix}{{{tag}}}{suffix}"
    assert key_slot(key) == key_slot(tag)
    assert 0 <= key_slot(key) < NUM_SLOTS


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab{}é"), min_size=1, max_size=12))
def test_key_slot_is_the_crc_of_the_hash_tag(key: str) -> None:
    assert key_slot(key) == crc16_table(hash_tag(key).encode()) % NUM_SLOTS


def test_key_slot_agrees_with_redis_cluster(tmp_path: Path) -> None:
    """CLUSTER KEYSLOT of a real cluster-enabled redis-server (no slots
    assigned: it only hashes) for keys with and without hash tags."""
    import random

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not available")
    port = free_port()
    # The cluster bus port defaults to port + 10,000: a free port above 55,535
    # made redis-server refuse to start, so it gets a free port of its own.
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--cluster-port", str(free_port()), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
         "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + START_WAIT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        rng = random.Random(9)
        alphabet = "ab{}xé:"
        keys = ["somekey", "{user1}.following", "foo{}{bar}", "foo{{bar}}zap", "{", "a{b}c{d}"]
        for _ in range(300):
            keys.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))))
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command("CLUSTER", "KEYSLOT", key)
            expected = pipe.execute()
        client.close()
        assert [key_slot(key) for key in keys] == expected
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", ["", None, 3, b"key"])
def test_key_slot_refuses_a_bad_key(bad: Any) -> None:
    with pytest.raises(ConfigError, match="key="):
        key_slot(bad)


# -- balance (the full figures; bench/sharding.py measures them on real shards) --


def _shard_counts(owners: list[int] | tuple[int, ...], slots: list[int]) -> Counter[int]:
    return Counter(owners[s] for s in slots)


KEY_SLOTS = [key_slot(f"key:{i}") for i in range(100_000)]


@pytest.mark.parametrize("n", [3, 4, 5])
def test_even_split_balances_100k_keys_within_1_percent(n: int) -> None:
    slot_map = SlotMap.initial([f"memory://s{i}" for i in range(n)])
    slot_counts = Counter(slot_map.owners)
    assert max(slot_counts.values()) - min(slot_counts.values()) <= 1
    keys = _shard_counts(slot_map.owners, KEY_SLOTS)
    ratio = max(keys.values()) / (len(KEY_SLOTS) / n)
    print(f"{n} shards: keys max/mean {ratio:.4f}")
    assert ratio <= 1.01


@pytest.mark.parametrize("n", [3, 4, 5])
def test_a_join_moves_one_share_and_only_to_the_new_shard(n: int) -> None:
    before = SlotMap.initial([f"memory://s{i}" for i in range(n)])
    joined = before.replace(
        shards={**before.shards, n: "memory://new"},
        status={**before.status, n: SHARD_ACTIVE},
        next_id=n + 1,
    )
    moves = plan_moves(joined)
    assert {m.target for m in moves} == {n}
    after = apply_moves(joined, moves)
    moved = sum(1 for s in KEY_SLOTS if before.owners[s] != after[s])
    fraction = moved / len(KEY_SLOTS)
    print(f"join {n}->{n + 1}: moved {fraction:.4f} (ideal {1 / (n + 1):.4f})")
    assert abs(fraction - 1 / (n + 1)) <= 0.02 / (n + 1)  # within 2 % of the ideal
    assert all(after[s] in (before.owners[s], n) for s in range(NUM_SLOTS))
    counts = Counter(after)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert plan_moves(joined.replace(owners=after)) == []


def test_a_removal_spreads_its_slots_over_the_others() -> None:
    slot_map = SlotMap.initial([f"memory://s{i}" for i in range(4)])
    leaving = slot_map.replace(status={**slot_map.status, 1: "leaving"})
    moves = plan_moves(leaving)
    assert {m.source for m in moves} == {1} and {m.target for m in moves} == {0, 2, 3}
    after = apply_moves(leaving, moves)
    assert 1 not in after
    assert all(after[s] == slot_map.owners[s] for s in range(NUM_SLOTS) if slot_map.owners[s] != 1)
    assert max(Counter(after).values()) - min(Counter(after).values()) <= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=1, max_size=8))
def test_plans_converge_to_an_even_split_from_any_membership_change(
    changes: list[tuple[bool, int]],
) -> None:
    """Model: random joins and removals (each followed by the planned moves)
    always end balanced, with leaving shards empty and, on a join, slots
    moving only to the new shard."""
    slot_map = SlotMap.initial(["memory://s0", "memory://s1"])
    for join, pick in changes:
        active = sorted(i for i, st in slot_map.status.items() if st == SHARD_ACTIVE)
        if join or len(active) == 1:
            new = slot_map.next_id
            slot_map = slot_map.replace(shards={**slot_map.shards, new: f"memory://s{new}"},
                                        status={**slot_map.status, new: SHARD_ACTIVE},
                                        next_id=new + 1)  # fmt: skip
        else:
            gone = active[pick % len(active)]
            slot_map = slot_map.replace(status={**slot_map.status, gone: "leaving"})
        moves = plan_moves(slot_map)
        if join or len(active) == 1:
            assert {m.target for m in moves} <= {slot_map.next_id - 1}
        owners = apply_moves(slot_map, moves)
        slot_map = slot_map.replace(owners=owners)
        keep = [i for i, st in slot_map.status.items() if st == SHARD_ACTIVE]
        assert not any(slot_map.counts[i] for i in slot_map.shards if i not in keep)
        slot_map = slot_map.replace(shards={i: slot_map.shards[i] for i in keep},
                                    status={i: SHARD_ACTIVE for i in keep})  # fmt: skip
        counts = [slot_map.counts[i] for i in keep]
        assert sum(counts) == NUM_SLOTS and max(counts) - min(counts) <= 1
        assert plan_moves(slot_map) == []


def test_slot_map_round_trips_and_refuses_a_malformed_one() -> None:
    slot_map = SlotMap.initial(["memory://a", "memory://b", "memory://c"])
    again = SlotMap.from_json(7, json.loads(json.dumps(slot_map.to_json())))
    assert again.owners == slot_map.owners and again.shards == slot_map.shards
    assert again.version == 7
    broken = slot_map.to_json()
    broken["slots"] = broken["slots"][:-1]
    with pytest.raises(ConfigError, match="malformed"):
        SlotMap.from_json(1, broken)


# -- bad input -------------------------------------------------------------------


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    coord = f"memory://c{uuid.uuid4().hex[:8]}"
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    with pytest.raises(ConfigError, match=r"urls=\[\]"):
        ShardedKV([], coordinator=coord)
    with pytest.raises(ConfigError, match="duplicate"):
        ShardedKV([a, b, a], coordinator=coord)
    with pytest.raises(ConfigError, match="list of backend URLs"):
        ShardedKV(a, coordinator=coord)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unnamed memory"):
        ShardedKV(["memory://"], coordinator=coord)
    with pytest.raises(InvalidURL):
        ShardedKV(["nosuch://x"], coordinator=coord)
    with pytest.raises(ConfigError, match="coordinator="):
        ShardedKV([a], coordinator=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wait="):
        ShardedKV([a], coordinator=coord, wait=0)
    with pytest.raises(ConfigError, match="urls=None"):
        ShardedKV(coordinator=coord)
    probe = Space(coord)
    assert probe.store.kv.get(MAP_KEY) is None  # nothing was written by a refused call
    with ShardedKV([a, b], coordinator=probe) as kv:
        version = kv.map_version
        for key in ("", None, 5, "taskspace/shard/map", "taskspace/x"):
            with pytest.raises(ConfigError, match="key="):
                kv.put(key, 1)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="ttl="):
            kv.put("k", 1, ttl=-1)
        with pytest.raises(ConfigError, match="version="):
            kv.cas("k", 1, version="3")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="already shard"):
            kv.add_shard(a)
        with pytest.raises(ConfigError, match="not a shard"):
            kv.remove_shard(f"sqlite:///{tmp_path}/c.db")
        with pytest.raises(ConfigError, match="batch_slots="):
            kv.rebalance(batch_slots=0)
        full = Space(f"sqlite:///{tmp_path}/full.db")
        full.kv.put("data", 1)
        full.kv.put("taskspace/own", 1)  # taskspace's own records may stay
        with pytest.raises(ConfigError, match="holds keys"):
            kv.add_shard(full.url)
        full.kv.delete("data")
        assert kv.add_shard(full.url) == 2
        full.close()
        kv.remove_shard(full.url)
        kv.remove_shard(a)
        with pytest.raises(ConfigError, match="last active shard"):
            kv.remove_shard(b)
        assert kv.refresh().status == {0: "leaving", 1: "active", 2: "leaving"}
        assert kv.map_version == version + 3
        assert kv.get("k") is None
    probe.close()


# -- the KV methods on every backend, through rebalances -------------------------


def test_kv_methods_through_a_join_and_a_removal(backend: str, tmp_path: Path) -> None:
    urls = shard_urls(backend, tmp_path, 4)
    with ShardedKV(urls[:3], coordinator=coordinator_url(backend, tmp_path)) as kv:
        n = 120
        for i in range(n):
            kv.put(f"key:{i}", {"i": i}, ttl=600 if i % 10 == 0 else None)
        assert set(kv.counts()) == set(urls[:3]) and sum(kv.counts().values()) == n
        entry = kv.get_versioned("key:7")
        assert entry is not None and entry.value == {"i": 7} and entry.expires is None
        version = kv.cas("key:7", {"i": 77}, version=entry.version)
        with pytest.raises(VersionConflict) as conflict:
            kv.cas("key:7", {"i": 0}, version=entry.version)
        assert conflict.value.current == version
        assert kv.cas("fresh", 1, version=None) and kv.delete("fresh") and not kv.delete("fresh")
        assert kv.update("counter", lambda v: v + 1, default=0) == 1
        old_versions = {f"key:{i}": kv.get_versioned(f"key:{i}").version for i in range(20)}  # type: ignore[union-attr]
        map_version = kv.map_version

        kv.add_shard(urls[3])
        report = kv.rebalance(batch_slots=2048)
        assert report.slots_moved == 4096 and report.batches == 3  # one per source
        assert kv.map_version > map_version
        counts = kv.counts()
        assert set(counts) == set(urls) and sum(counts.values()) == n + 1
        kv.remove_shard(urls[0])
        kv.rebalance(batch_slots=4096)
        assert kv.shards == urls[1:]
        assert sum(kv.counts().values()) == n + 1

        values = dict(kv.scan("key:"))
        assert values == {f"key:{i}": {"i": 77 if i == 7 else i} for i in range(n)}
        assert kv.get("counter") == 1 and kv.update("counter", lambda v: v + 1) == 2
        expiring = kv.get_versioned("key:10")
        assert expiring is not None and expiring.expires is not None  # the TTL moved too
        moved = [k for k, v in old_versions.items() if kv.get_versioned(k).version != v]  # type: ignore[union-attr]
        assert moved, "some of the first keys moved"
        for key in moved:  # a version read before the move conflicts after it
            with pytest.raises(VersionConflict):
                kv.cas(key, "x", version=old_versions[key])
        for key in moved:
            assert (
                decode_version(kv.get_versioned(key).version)[1]
                != decode_version(  # type: ignore[union-attr]
                    old_versions[key]
                )[1]
            )
        # the removed shard keeps only "moved" markers, no data
        gone = Space(urls[0])
        leftovers = [(k, v.value) for k, v in gone.store.kv.scan("", limit=20_000)]
        assert leftovers and all(k.startswith(MARKER_PREFIX) and v == MOVED for k, v in leftovers)
        gone.close()


def test_concurrent_updates_count_exactly(memory_kv: ShardedKV) -> None:
    def bump() -> None:
        for _ in range(50):
            memory_kv.update("counter", lambda v: v + 1, default=0)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert memory_kv.get("counter") == 200
    with pytest.raises(ConfigError, match="fn="):
        memory_kv.update("counter", 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout="):
        memory_kv.update("counter", lambda v: v, timeout=-1)
    with pytest.raises(ZeroDivisionError):
        memory_kv.update("counter", lambda v: v / 0)
    assert memory_kv.get("counter") == 200


def test_two_rebalances_at_once_take_turns(memory_kv: ShardedKV) -> None:
    other = ShardedKV(coordinator=memory_kv._coord)
    for i in range(300):
        memory_kv.put(f"k{i}", i)
    memory_kv.add_shard(f"memory://turns-{uuid.uuid4().hex[:8]}")
    reports: list[Any] = []
    threads = [
        threading.Thread(target=lambda c=client: reports.append(c.rebalance(batch_slots=512)))
        for client in (memory_kv, other)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(r.slots_moved for r in reports) == [0, 4096]
    assert plan_moves(memory_kv.refresh()) == []
    assert [memory_kv.get(f"k{i}") for i in range(300)] == list(range(300))
    assert sum(memory_kv.counts().values()) == 300
    other.close()


def test_ttl_moves_with_the_key_and_expires_on_the_new_shard(tmp_path: Path) -> None:
    urls = shard_urls("memory", tmp_path, 2)
    tag = next(t for t in map(str, range(100)) if key_slot(t) >= NUM_SLOTS // 2)
    short, long, forever = (f"{{{tag}}}{name}" for name in ("short", "long", "forever"))
    with ShardedKV(urls[:1], coordinator=f"memory://c{uuid.uuid4().hex[:8]}") as kv:
        kv.put(short, 1, ttl=2.5)
        kv.put(long, 2, ttl=600)
        kv.put(forever, 3)
        kv.add_shard(urls[1])
        kv.rebalance()
        assert kv.shard_for(long) == urls[1]  # the upper half of the slots moved
        entry = kv.get_versioned(long)
        assert entry is not None and entry.expires is not None
        remaining = entry.expires - kv._store(urls[1]).clock.now()
        assert 590 < remaining <= 600  # carried over, not reset and not dropped
        assert kv.get_versioned(forever).expires is None  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while kv.get(short) is not None:
            assert time.monotonic() < deadline, "the copied TTL never expired"
            time.sleep(0.05)
        assert kv.get(forever) == 3


def test_a_stale_client_is_told_the_map_moved(memory_kv: ShardedKV) -> None:
    coord = memory_kv._coord  # the same coordinator Space, a second client
    other = ShardedKV(coordinator=coord)
    for i in range(200):
        memory_kv.put(f"k{i}", i)
    stale_version = other.map_version
    memory_kv.add_shard(f"memory://new-{uuid.uuid4().hex[:8]}")
    memory_kv.rebalance()
    assert other.map_version == stale_version  # nobody told it yet
    moved = [
        f"k{i}" for i in range(200) if memory_kv.shard_for(f"k{i}") != other.shard_for(f"k{i}")
    ]
    assert moved
    assert other.get(moved[0]) == int(moved[0][1:])  # bounced, refreshed, read the new owner
    assert other.map_version == memory_kv.map_version
    other.put(moved[1], "new")
    assert memory_kv.get(moved[1]) == "new"
    other.close()


# -- a rebalance stopped or killed mid-batch ------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    "step", ["planned", "precopied", "migrating", "copied", "switched", "published", "cleaned"]
)
def test_a_rebalance_stopped_at_any_step_is_resumed(step: str, tmp_path: Path) -> None:
    urls = shard_urls("memory", tmp_path, 3)
    coord = f"memory://coord-{uuid.uuid4().hex[:8]}"
    with ShardedKV(urls[:2], coordinator=coord, wait=0.3) as kv:
        for i in range(400):
            kv.put(f"k{i}", i)
        kv.add_shard(urls[2])
        calls = 0

        def stop_at(name: str, move: Move) -> None:
            nonlocal calls
            if name == step:
                calls += 1
                if calls == 2:
                    raise Stop(name)

        with pytest.raises(Stop):
            kv.rebalance(batch_slots=1024, on_step=stop_at)
        stuck = kv.refresh()
        if step in ("migrating", "copied"):  # writes to the batch wait, then give up
            moving = stuck.moving
            assert moving is not None
            key = next(f"k{i}" for i in range(400) if key_slot(f"k{i}") in set(moving["slots"]))
            assert kv.get(key) == int(key[1:])  # reads are served while migrating
            started = time.monotonic()
            with pytest.raises(BackendError, match="rebalance"):
                kv.put(key, -1)
            assert time.monotonic() - started < 2.0
            patient = ShardedKV(coordinator=coord, wait=30)
            started = time.monotonic()
            with pytest.raises(BackendError):  # update's timeout bounds the wait too
                patient.update(key, lambda v: -1, timeout=0.2)
            assert time.monotonic() - started < 2.0
            patient.close()
        expected: dict[str, int | None] = {f"k{i}": i for i in range(400)}
        in_batch = set(stuck.moving["slots"]) if stuck.moving else set()
        chosen = [i for i in range(400) if key_slot(f"k{i}") in in_batch][:8]
        chosen += [i for i in range(0, 400, 9) if i not in chosen]
        hasty = ShardedKV(coordinator=coord, wait=0.05)
        for i in chosen:  # deletes and overwrites between the two runs
            key = f"k{i}"
            try:
                if i % 2:
                    hasty.put(key, -i)
                    expected[key] = -i
                else:
                    hasty.delete(key)
                    expected[key] = None
            except BackendError:  # its slot is in the stopped batch: unchanged
                pass
        hasty.close()
        report = kv.rebalance(batch_slots=1024)
        assert report.batches >= 1
        final = kv.refresh()
        assert final.moving is None and final.cleanup is None and plan_moves(final) == []
        assert {key: kv.get(key) for key in expected} == expected
        live = sum(value is not None for value in expected.values())
        assert sum(kv.counts().values()) == live  # no copy left behind anywhere


def test_a_compacted_change_feed_falls_back_to_a_scan() -> None:
    """Batches find their keys through a key index kept up to date by the
    source's change feed; when the feed was compacted in between (a worker's
    maintenance reaps it), the batch scans the source instead."""
    tag = uuid.uuid4().hex[:8]
    urls = [f"memory://feed{tag}-{i}" for i in range(2)]
    with ShardedKV(urls[:1], coordinator=f"memory://feed{tag}-c") as kv:
        for i in range(300):
            kv.put(f"k{i}", i)
        kv.add_shard(urls[1])
        churned = False

        def churn(name: str, move: Move) -> None:
            nonlocal churned
            if name == "published" and not churned:  # between the first and second batch
                churned = True
                store = Space(urls[0]).store
                for i in range(KV_CHANGES_KEEP + 100):
                    kv.put(f"k{i % 300}", i % 300 + 1000)
                store.kv.reap()
                with pytest.raises(Compacted):
                    store.kv.changes("", 1)

        kv.rebalance(batch_slots=1024, on_step=churn)
        assert churned
        assert [kv.get(f"k{i}") for i in range(300)] == [i + 1000 for i in range(300)]
        assert sum(kv.counts().values()) == 300


def _spawn(role: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.state.sharding_procs", role, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(
    folder: Path, pattern: str, count: int, children: list[subprocess.Popen[str]]
) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while len(list(folder.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"no {pattern} after {START_WAIT_S} s"
        for child in children:
            if child.poll() is not None:
                raise AssertionError(f"a child died early: {child.communicate()[1][-2000:]}")
        time.sleep(0.01)


@pytest.mark.fault
@pytest.mark.parametrize("step", ["copied", "switched"])
def test_a_rebalance_killed_mid_batch_is_resumed(step: str, tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path}/s0.db", shared_redis().namespaced_url(),
            f"sqlite:///{tmp_path}/s2.db"]  # fmt: skip
    coord = f"sqlite:///{tmp_path}/coord.db"
    with ShardedKV(urls[:2], coordinator=coord) as kv:
        for i in range(300):
            kv.put(f"k{i}", i)
        kv.add_shard(urls[2])
        child = _spawn("rebalance", coord, str(tmp_path), step, "2")
        try:
            _wait_for(tmp_path, "at-step", 1, [child])
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert kv.refresh().moving is not None
        kv.rebalance(lock_wait=15)  # the killed holder's lease expires first
        assert plan_moves(kv.refresh()) == []
        assert [kv.get(f"k{i}") for i in range(300)] == list(range(300))
        assert sum(kv.counts().values()) == 300


# -- acceptance: continuous writes during add/remove rebalances -------------------


def _check_no_lost_write(kv: ShardedKV, last: dict[str, int]) -> None:
    lost = {k: (v, kv.get(k)) for k, v in last.items() if kv.get(k) != v}
    print(f"keys {len(last)}, lost or stale {len(lost)}")
    assert lost == {}
    assert sum(kv.counts().values()) == len(last)


def test_acceptance_processes_write_and_read_during_rebalances(tmp_path: Path) -> None:
    redis = shared_redis()
    db_url = f"redis://127.0.0.1:{redis.port}/3?namespace=t{uuid.uuid4().hex[:8]}"
    urls = [f"sqlite:///{tmp_path}/a.db", redis.namespaced_url(), db_url,
            f"sqlite:///{tmp_path}/d.db"]  # fmt: skip
    coord = f"sqlite:///{tmp_path}/coord.db"
    keys = 400
    with ShardedKV(urls[:3], coordinator=coord) as kv:
        for i in range(keys):
            kv.put(f"k{i}", 0)
        children = [_spawn("writer", coord, str(tmp_path), str(keys)),
                    _spawn("reader", coord, str(tmp_path), str(keys))]  # fmt: skip
        try:
            _wait_for(tmp_path, "ready.*", 2, children)
            time.sleep(0.2)  # let the writer get going before the first move
            kv.add_shard(urls[3])
            joined = kv.rebalance(batch_slots=256)
            kv.remove_shard(urls[0])
            left = kv.rebalance(batch_slots=256)
            time.sleep(0.1)
            (tmp_path / "stop").touch()
            reports = []
            for child in children:
                out, err = child.communicate(timeout=60)
                assert child.returncode == 0, err[-3000:]
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.communicate()
        wrote, read = reports
        print(f"join: {joined}; removal: {left}")
        print(f"writer: {wrote['writes']} writes, {wrote['checks']} read-backs,"
              f" map {wrote['map_versions']}; "
              f"reader: {read['reads']} reads, {read['backwards']} backwards")  # fmt: skip
        assert wrote["errors"] == [] and read["errors"] == []
        assert wrote["checks"] > 50 and wrote["stale"] == []
        assert read["backwards"] == 0
        assert wrote["map_versions"][1] > wrote["map_versions"][0]  # it was told the map moved
        assert wrote["writes"] > 50
        assert kv.shards == urls[1:]
        _check_no_lost_write(kv, {f"k{i}": 0 for i in range(keys)} | wrote["last"])


class ThreadLoad:
    """A writer (put and update, increasing values), a reader (values never go
    backwards) and a scanner (no duplicate, nothing older than what was
    acknowledged when the scan began) on their own ShardedKV clients."""

    def __init__(self, coord: Space, keys: int) -> None:
        self.coord, self.keys = coord, keys
        self.stop = threading.Event()
        self.last: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self.backwards = self.scans = self.stale_scans = 0
        self.threads = [threading.Thread(target=f) for f in (self.write, self.read, self.scan)]

    def write(self) -> None:
        kv = ShardedKV(coordinator=self.coord, wait=20)
        value = 0
        while not self.stop.is_set():
            key = f"k{value % self.keys}"
            value += 1
            try:
                if value % 2:
                    kv.update(key, lambda _old, v=value: v)
                else:
                    kv.put(key, value)
            except TaskspaceError as exc:
                self.errors.append(exc)
                continue
            self.last[key] = value

    def read(self) -> None:
        kv = ShardedKV(coordinator=self.coord, wait=20)
        seen: dict[str, int] = {}
        i = 0
        while not self.stop.is_set():
            key = f"k{i % self.keys}"
            i += 1
            value = kv.get(key)
            if value is not None:
                self.backwards += value < seen.get(key, 0)
                seen[key] = max(value, seen.get(key, 0))

    def scan(self) -> None:
        kv = ShardedKV(coordinator=self.coord, wait=20)
        while not self.stop.is_set():
            floor = dict(self.last)  # acknowledged before the scan began
            found = list(kv.scan("k"))
            names = [key for key, _ in found]
            self.scans += 1
            self.stale_scans += len(names) != len(set(names))
            self.stale_scans += any(value < floor.get(key, 0) for key, value in found)


def test_acceptance_threads_on_memory_shards() -> None:
    tag = uuid.uuid4().hex[:8]
    urls = [f"memory://acc{tag}-{i}" for i in range(4)]
    coord = Space(f"memory://acc{tag}-coord")
    keys = 300
    load = ThreadLoad(coord, keys)
    with ShardedKV(urls[:3], coordinator=coord) as kv:
        for i in range(keys):
            kv.put(f"k{i}", 0)
        for thread in load.threads:
            thread.start()
        try:
            time.sleep(0.1)
            kv.add_shard(urls[3])
            kv.rebalance(batch_slots=512)
            kv.remove_shard(urls[1])
            kv.rebalance(batch_slots=512)
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=30)
        print(f"threads: {len(load.last)} keys written, {load.scans} scans")
        assert load.errors == [] and load.backwards == 0
        assert load.scans > 0 and load.stale_scans == 0
        assert len(load.last) > 50
        _check_no_lost_write(kv, {f"k{i}": 0 for i in range(keys)} | load.last)
    coord.close()


def test_a_shard_that_is_down_fails_fast_and_alone(tmp_path: Path) -> None:
    server = RedisServer().start()
    try:
        urls = [f"sqlite:///{tmp_path}/up.db", server.url + "?namespace=down"]
        with ShardedKV(urls, coordinator=f"sqlite:///{tmp_path}/c.db", wait=1) as kv:
            keys = [f"k{i}" for i in range(50)]
            for key in keys:
                kv.put(key, key)
            on_redis = [k for k in keys if kv.shard_for(k) == urls[1]]
            on_sqlite = [k for k in keys if kv.shard_for(k) == urls[0]]
            assert on_redis and on_sqlite
            server.kill()
            started = time.monotonic()
            with pytest.raises(BackendError):
                kv.get(on_redis[0])
            with pytest.raises(BackendError):
                kv.put(on_redis[0], "x")
            assert time.monotonic() - started < 10
            assert [kv.get(k) for k in on_sqlite] == on_sqlite  # the other shard serves on
            kv.put(on_sqlite[0], "still")
            with pytest.raises(BackendError):
                kv.add_shard(server.url + "?namespace=other")  # unreachable: map unchanged
            assert len(kv.refresh().shards) == 2
    finally:
        server.close()


def test_a_coordinator_that_is_down_stops_only_moves(tmp_path: Path) -> None:
    """The map is cached: with the coordinator down, every slot that is not
    moving is still served; what needs the map (a refused call, add_shard,
    rebalance) raises BackendError."""
    server = RedisServer().start()
    try:
        urls = [f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"]
        with ShardedKV(urls, coordinator=server.url, wait=1) as kv:
            kv.put("k", 1)
            server.kill()
            assert kv.get("k") == 1
            kv.put("k", 2)
            assert kv.update("k", lambda v: v + 1) == 3
            with pytest.raises(BackendError):
                kv.add_shard(f"sqlite:///{tmp_path}/c.db")
            with pytest.raises(BackendError):
                kv.refresh()
    finally:
        server.close()


def test_markers_say_who_owns_each_slot(memory_kv: ShardedKV) -> None:
    slot_map = memory_kv.refresh()
    for shard_id, url in slot_map.shards.items():
        space = Space(url)
        marks = space.store.kv.get_many([marker_key(s) for s in range(NUM_SLOTS)])
        owned = {s for s, m in enumerate(marks) if m is not None and m.value == OWNED}
        assert owned == set(slot_map.slots_of(shard_id))
        space.close()
