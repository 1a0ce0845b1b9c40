"""Redis-specific behaviour of leases, KV, streams and pubsub that the
conformance suite cannot reach: retries by request id, wake-ups across
processes, compaction boundaries, key retention and reconnects."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import taskspace.backends.redis.kv as redis_kv
import taskspace.backends.redis.subscription as redis_subscription
from taskspace.backends.base import (
    MAX_DURATION_S,
    Delete,
    Gap,
    GrantHeld,
    Message,
    Put,
    Versioned,
    VersionIs,
)
from taskspace.backends.checks import check_ttl
from taskspace.backends.redis import RedisStore
from taskspace.errors import BackendError, Compacted, ConfigError, NotAnInteger
from tests.services import RedisServer, shared_redis


@pytest.fixture
def url() -> str:
    return shared_redis().namespaced_url()


@pytest.fixture
def store(url: str) -> Iterator[RedisStore]:
    s = RedisStore(url)
    yield s
    s.close()


def keys(store: RedisStore, family: str) -> list[bytes]:
    return sorted(store.conn.client.keys(f"{store.prefix}{family}*"))


def in_other_process(url: str, code: str) -> subprocess.Popen[str]:
    """Run ``code`` with ``s`` (a RedisStore on ``url``) in a new interpreter;
    it prints 'ready' before its body runs."""
    prog = (
        "import sys, time\n"
        "from taskspace.backends.redis import RedisStore\n"
        f"s = RedisStore({url!r})\n"
        "print('ready', flush=True)\n" + code
    )
    return subprocess.Popen(
        [sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True, bufsize=1
    )


# -- KV ----------------------------------------------------------------------


def test_incr_request_id_adds_once_and_not_an_integer_changes_nothing(store: RedisStore) -> None:
    kv = store.kv
    assert kv.incr("n", 5, request_id="r1") == 5
    assert kv.incr("n", 5, request_id="r1") == 5  # a retry after a lost reply
    assert kv.incr("n", 1) == 6
    kv.put("s", b"twelve")
    before = kv.get("s")
    with pytest.raises(NotAnInteger):
        kv.incr("s")
    assert kv.get("s") == before
    kv.put("p", b"+007")
    assert kv.incr("p") == 8
    before_big = kv.put("big", str(2**63 - 1).encode())
    with pytest.raises(NotAnInteger):
        kv.incr("big")  # leaves 64 bits: refused, not wrapped
    assert kv.get("big") == before_big


def test_txn_request_id_and_fencing_by_grant(store: RedisStore) -> None:
    kv, leases = store.kv, store.leases
    grant = leases.acquire("lock", "me", 5.0)
    assert grant is not None
    first = kv.txn([GrantHeld(grant)], [Put("a", b"1"), Put("b", b"2")], request_id="t")
    assert first.ok and first.versions == (first.revision, first.revision)
    assert kv.txn([GrantHeld(grant)], [Put("a", b"9")], request_id="t") == first
    assert kv.get("a") == Versioned(b"1", first.revision, first.revision)
    assert leases.release(grant)
    fenced = kv.txn([VersionIs("a", first.revision), GrantHeld(grant)], [Delete("a")])
    assert not fenced.ok and fenced.failed == 1 and fenced.revision == first.revision
    with pytest.raises(ConfigError):
        kv.txn([], [Put("x", b""), Delete("x")])


def test_expiry_is_recorded_by_changes_without_reading_the_key(store: RedisStore) -> None:
    kv = store.kv
    put = kv.put("e/1", b"x", ttl=0.05)
    deadline = time.monotonic() + 2
    while not (changes := kv.changes("e/", put.revision)) and time.monotonic() < deadline:
        kv.wait("e/", put.revision, 0.5)
    assert [(c.kind, c.version) for c in changes] == [("expire", put.version)]
    assert changes[0].revision > put.revision and kv.revision() == changes[0].revision
    assert keys(store, "kv:") == [] and kv.get("e/1") is None


def test_revisions_and_stream_ids_follow_the_fencing_rule(store: RedisStore) -> None:
    """next = max(last + 1, wall µs): a small (pre-existing, dense) counter jumps
    up to the wall clock, a counter ahead of the clock (a failover to a server
    whose clock is behind) still moves by one, and old feed entries stay readable."""
    client, p = store.conn.client, store.prefix
    kv, st = store.kv, store.streams
    client.set(p + "kvrev", 5)
    client.xadd(p + "kvlog", {"k": "old", "kind": "put", "ver": 5, "v": b"o"}, id="5-0")
    client.set(p + "sid:s", 7)
    client.xadd(p + "s:s", {"d": b"old", "t": "1.0"}, id="7-0")
    before_us = int(time.time() * 1e6) - 10**6  # loopback server: clocks agree within 1 s
    jumped = kv.put("new", b"n")
    first = st.append("s", b"new")
    assert jumped.revision > before_us and first > before_us
    assert [c.revision for c in kv.changes("", 0)] == [5, jumped.revision]
    assert [e.id for e in st.read("s")] == [7, first]
    ahead = 2**52  # far above the wall clock, still exact in a double
    client.set(p + "kvrev", ahead)
    client.set(p + "sid:s", ahead)
    assert kv.txn([], [Put("a", b""), Put("b", b"")]).revision == ahead + 1
    assert kv.incr("c") == 1 and kv.get("c") == Versioned(b"1", ahead + 2, ahead + 2)
    assert st.append_many("s", [b"x", b"y"], request_id="r") == [ahead + 1, ahead + 2]
    assert st.append_many("s", [b"x", b"y"], request_id="r") == [ahead + 1, ahead + 2]
    assert kv.revision() == ahead + 2
    assert [c.revision for c in kv.changes("", jumped.revision)] == [ahead + 1] * 2 + [ahead + 2]


def test_compaction_keeps_a_revision_whole_and_raises_compacted(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_kv, "KV_CHANGES_KEEP", 3)
    kv = store.kv
    r = [kv.put(f"k{i}", b"v").revision for i in range(3)]
    r.append(kv.txn([], [Put("t1", b""), Put("t2", b"")]).revision)  # two changes
    assert kv.reap() == 0
    # Five changes, keep 3: r[3]'s two entries stay together, so r[0] and r[1] go.
    assert [c.revision for c in kv.changes("", r[1])] == [r[2], r[3], r[3]]
    with pytest.raises(Compacted) as info:
        kv.changes("", r[0])
    assert info.value.compacted == r[1] and info.value.revision == r[3]


def test_a_page_of_changes_is_whole_revisions_across_script_calls(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a scan budget of one feed entry per script call, a revision (with
    changes of another prefix inside it) is still never split."""
    monkeypatch.setattr(redis_kv, "SCAN_BUDGET", 1)
    kv = store.kv
    t1 = kv.txn([], [Put(k, b"") for k in ("p/a", "x/1", "p/b", "x/2", "p/c")]).revision
    d = kv.put("p/d", b"").revision
    kv.put("x/3", b"")
    t3 = kv.txn([], [Put(k, b"") for k in ("p/e", "p/f", "x/4", "p/g")]).revision

    def pages(limit: int) -> list[list[int]]:
        out: list[list[int]] = []
        after = 0
        while page := kv.changes("p/", after, limit):
            out.append([c.revision for c in page])
            after = page[-1].revision
        return out

    assert pages(2) == [[t1] * 3, [d], [t3] * 3]
    assert pages(4) == [[t1] * 3 + [d], [t3] * 3]
    assert pages(7) == [[t1] * 3 + [d] + [t3] * 3]
    started = time.monotonic()
    kv.wait("p/", t1, 5.0)  # returns at once: p/d is there, 5 feed entries on
    assert time.monotonic() - started < 1.0
    assert [c.key for c in kv.changes("p/", d, 1)] == ["p/e", "p/f", "p/g"]


def test_wait_of_a_quiet_prefix_ignores_other_prefixes_and_wakes_on_its_own(
    store: RedisStore, url: str
) -> None:
    kv = store.kv
    rev = kv.revision()
    other = RedisStore(url)
    try:
        stop = threading.Event()

        def writer() -> None:
            while not stop.wait(0.02):
                other.kv.put("noise", b"x")

        t = threading.Thread(target=writer)
        t.start()
        started = time.monotonic()
        kv.wait("quiet/", rev, 0.3)
        assert time.monotonic() - started >= 0.25
        timer = threading.Timer(0.1, lambda: other.kv.put("quiet/1", b"x"))
        timer.start()
        started = time.monotonic()
        kv.wait("quiet/", rev, 5.0)
        woken = time.monotonic() - started
        stop.set()
        t.join()
        timer.join()
    finally:
        other.close()
    assert woken < 1.0
    assert keys(store, "kvwaiters") == []  # the put consumed the registration


def test_wait_ends_by_an_expiry_of_its_own_prefix_only(store: RedisStore) -> None:
    kv = store.kv
    kv.put("other/1", b"x", ttl=0.05)
    started = time.monotonic()
    kv.wait("quiet/", kv.revision(), 0.3)
    assert time.monotonic() - started >= 0.25  # another prefix's expiry: no wake-up
    kv.put("quiet/1", b"x", ttl=0.05)
    rev = kv.revision()
    started = time.monotonic()
    kv.wait("quiet/", rev, 5.0)
    assert time.monotonic() - started < 1.0  # its own key's expiry ends the wait
    assert [c.kind for c in kv.changes("quiet/", rev)] == ["expire"]


def test_scan_pages_past_expired_keys(store: RedisStore) -> None:
    kv = store.kv
    for i in range(10):
        kv.put(f"p/{i:02}", b"x", ttl=0.05 if i < 8 else None)
    kv.put("q", b"outside")
    time.sleep(0.1)  # TTLs on the server clock: nothing to await
    assert [k for k, _ in kv.scan("p/", limit=1)] == ["p/08"]
    assert [k for k, _ in kv.scan("p/", after_key="p/08")] == ["p/09"]


# -- Leases ------------------------------------------------------------------


def test_release_wakes_a_waiter_in_another_process(store: RedisStore, url: str) -> None:
    grant = store.leases.acquire("slot", "me", 30.0)
    assert grant is not None
    proc = in_other_process(
        url,
        "t = time.perf_counter()\n"
        "s.leases.wait('slot', 10.0)\n"
        "print(time.perf_counter() - t, flush=True)\n",
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        # Released only once the waiter has registered (lease_wait adds it to lwq:).
        while not keys(store, "lwq:") and time.monotonic() < deadline:
            time.sleep(0.005)
        released = time.perf_counter()
        assert store.leases.release(grant)
        waited = float(proc.stdout.readline())
        latency = time.perf_counter() - released
    finally:
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert waited < 5.0 and latency < 1.0  # woken, not timed out (typically ~2 ms)


def test_a_wait_that_timed_out_leaves_no_wake_up_for_the_next_one(store: RedisStore) -> None:
    leases = store.leases
    first = leases.acquire("x", "a", 30.0)
    assert first is not None
    leases.wait("x", 1.2)  # several BLPOP steps, then the timeout
    assert leases.release(first)  # wakes only waiters still registered
    assert leases.acquire("x", "b", 30.0) is not None
    started = time.monotonic()
    leases.wait("x", 0.3)
    assert time.monotonic() - started >= 0.25  # not woken by the earlier wait's token


def test_lease_keys_are_gone_after_release(store: RedisStore) -> None:
    leases = store.leases
    grants = [leases.acquire("sem", f"h{i}", 5.0, capacity=3) for i in range(3)]
    assert leases.acquire("sem", "h", 5.0, capacity=3) is None
    with pytest.raises(ConfigError):
        leases.acquire("sem", "h", 5.0, capacity=2)
    assert all(g is not None and leases.release(g) for g in grants)
    assert keys(store, "lz:") == keys(store, "lg:") == keys(store, "lc:") == []
    assert leases.acquire("sem", "h", 5.0, capacity=2) is not None  # no live grant: free


def test_grant_id_makes_acquire_idempotent_and_renew_is_one_batch(store: RedisStore) -> None:
    leases = store.leases
    a = leases.acquire("n", "me", 5.0, capacity=2, data=b"d", grant_id="g1")
    assert a is not None and leases.acquire("n", "me", 5.0, capacity=2, grant_id="g1") == a
    b = leases.acquire("n", "me", 5.0, capacity=2)
    assert b is not None and b.token > a.token and b.id != a.id
    assert leases.release(b)
    renewed = leases.renew([a, b], 10.0)
    assert renewed[1] is None and renewed[0] is not None
    assert renewed[0].token == a.token and renewed[0].expires > a.expires


def test_every_auxiliary_key_expires_on_its_own(store: RedisStore, url: str) -> None:
    """Grants, capacities, waiter registrations, wake lists and request ids
    carry a Redis expiry, so a space nobody uses any more sheds them."""
    leases, kv = store.leases, store.kv
    held = leases.acquire("busy", "me", 30.0)
    assert held is not None
    leases.wait("busy", 0.05)  # registers a waiter, times out
    kv.wait("quiet/", kv.revision(), 0.05)
    kv.txn([], [Put("a", b"1")], request_id="t")
    kv.incr("n", request_id="i")
    store.streams.append_many("s", [b"x"], request_id="s")
    waiter = RedisStore(url)
    try:
        timer = threading.Timer(0.1, lambda: kv.put("quiet/1", b"x"))
        timer.start()
        waiter.kv.wait("quiet/", kv.revision(), 5.0)
        timer.join()
    finally:
        waiter.close()
    families = ("lz:", "lg:", "lc:", "lwq:", "lw:", "kvwaiters", "kvw:", "kvreq", "kvincr", "sreq")
    aux = [k for f in families for k in keys(store, f)]
    assert len(aux) >= 8
    ttls = {k: store.conn.client.pttl(k) for k in aux}
    assert all(ttl > 0 for ttl in ttls.values()), ttls


# -- Streams -----------------------------------------------------------------


def test_append_many_request_id_and_blocking_read(store: RedisStore, url: str) -> None:
    st = store.streams
    ids = st.append_many("s", [b"a", b"b"], request_id="r")
    assert ids[1] == ids[0] + 1 and ids[0] > 10**15  # wall microseconds: not dense
    assert st.append_many("s", [b"a", b"b"], request_id="r") == ids  # exact, not 14 digits
    assert [e.id for e in st.read("s")] == ids
    other = RedisStore(url)
    try:
        timer = threading.Timer(0.05, lambda: other.streams.append("s", b"c"))
        timer.start()
        started = time.monotonic()
        got = st.read("s", after=ids[1], wait=5.0)
        timer.join()
    finally:
        other.close()
    assert [e.data for e in got] == [b"c"] and time.monotonic() - started < 1.0


# -- PubSub ------------------------------------------------------------------


def test_prefix_subscription_escapes_glob_characters(store: RedisStore) -> None:
    with store.pubsub.subscribe(prefixes=["a*[b]?/"]) as sub:
        store.pubsub.publish("aXbY/1", b"no")
        store.pubsub.publish("a*[b]?/1", b"yes")
        assert sub.get(2.0) == Message("a*[b]?/1", b"yes", "a*[b]?/")
        assert sub.get(0.05) is None


def test_overflow_reports_a_gap_with_the_count(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_subscription, "SUBSCRIPTION_BUFFER", 4)
    with store.pubsub.subscribe(["c"]) as sub:
        for i in range(7):
            store.pubsub.publish("c", str(i).encode())
        got = [sub.get(2.0) for _ in range(5)]
    assert got[0] == Gap("overflow", missed=3)
    assert got[1:] == [Message("c", str(i).encode()) for i in (3, 4, 5, 6)]


def test_pubsub_gap_after_the_server_restarts(tmp_path: Path) -> None:
    server = RedisServer(workdir=tmp_path).start()
    try:
        store = RedisStore(server.url)
        sub = store.pubsub.subscribe(["c"])
        store.pubsub.publish("c", b"before")
        assert sub.get(2.0) == Message("c", b"before")
        server.stop()
        with pytest.raises(BackendError):
            sub.get(0.2)  # Redis is away
        server.restart()
        assert sub.get(5.0) == Gap("reconnect")
        store.pubsub.publish("c", b"after")
        assert sub.get(2.0) == Message("c", b"after")
        assert sub.get(0.05) is None  # the Gap came once
        sub.close()
        store.close()
    finally:
        server.close()


# -- review fixes -------------------------------------------------------------


def wait_past(store: RedisStore, expires: float | None) -> None:
    """Block until the lease clock is past ``expires``."""
    assert expires is not None
    while store.clock.now() <= expires:
        time.sleep(0.02)


def test_a_put_over_an_expired_key_records_its_expiry_past_the_first_due_ones(
    store: RedisStore,
) -> None:
    kv = store.kv
    last = None
    for i in range(300):  # more than KV_EXPIRE_STEP (100) due expiries per script
        last = kv.put(f"k{i:03d}", b"v", ttl=1.0)  # none expires before the last is put
    assert last is not None
    wait_past(store, last.expires)
    kv.put("k299", b"again")  # its script records the first 100 due expiries, then k299's
    assert [c.kind for c in kv.changes("k299", 0)] == ["put", "expire", "put"]
    # Writes of a txn over expired keys (past the next 100 due): each expiry
    # is logged before the txn's own revision, so the feed stays in order.
    result = kv.txn([], [Put("new", b"1"), Delete("k298"), Put("k297", b"2")])
    assert result.ok
    feed = kv.changes("", 0, limit=10_000)
    tail = [(c.key, c.kind) for c in feed if c.key in ("new", "k297", "k298")]
    assert set(tail[-4:-2]) == {("k298", "expire"), ("k297", "expire")}
    assert tail[-2:] == [("new", "put"), ("k297", "put")]
    revisions = [c.revision for c in feed]
    assert revisions == sorted(revisions)
    assert kv.get("k297") == Versioned(b"2", result.revision, result.revision, None)


def test_a_huge_valid_ttl_is_stored_and_nothing_fails_halfway(store: RedisStore) -> None:
    leases = store.leases
    huge = MAX_DURATION_S
    grant = leases.acquire("long", "me", huge)
    assert grant is not None and grant.expires > store.clock.now() + huge - 60
    assert leases.renew([grant], huge)[0] is not None
    assert [g.id for g in leases.holders("long")] == [grant.id]
    assert all(store.conn.client.pttl(k) > 0 for k in keys(store, "lg:long"))
    # Past the cap: refused up front by check_ttl with nothing written, or, if
    # the contract's check lets it through, stored whole (Redis expiries are
    # clamped, so no script fails after its first write).
    way_over = 1e16
    try:
        check_ttl(way_over, optional=False)
    except ConfigError:
        with pytest.raises(ConfigError):
            leases.acquire("other", "me", way_over)
        assert keys(store, "lz:other") == [] and keys(store, "lg:other") == []
    else:
        other = leases.acquire("other", "me", way_over)
        assert other is not None and leases.renew([other], way_over)[0] is not None
        assert [g.id for g in leases.holders("other")] == [other.id]
        assert leases.acquire("other", "you", 5) is None  # capacity 1: held


def test_compaction_passes_a_revision_larger_than_its_step(store: RedisStore) -> None:
    kv, conn = store.kv, store.conn
    big = kv.txn([], [Put(f"k{i}", b"v") for i in range(6)]).revision  # one revision, 6 entries
    for _ in range(10):
        kv.put("x", b"v")
    log = conn.prefix + "kvlog"
    for _ in range(4):
        conn.run("kv_reap", [100, 5, 4])  # keep 5, at most 4 per call (or one whole revision)
    assert conn.client.xlen(log) <= 5 + 3
    with pytest.raises(Compacted) as info:
        kv.changes("", 0)
    assert info.value.compacted > big
    assert all(c.revision > big for c in kv.changes("", info.value.compacted))


def test_names_and_arguments_are_checked_as_on_every_backend(store: RedisStore) -> None:
    bad: list[Callable[[], object]] = [
        lambda: store.streams.append("", b"x"),
        lambda: store.streams.read("", wait=0),
        lambda: store.streams.read("s", wait=-1),
        lambda: store.streams.trim("", maxlen=1),
        lambda: store.streams.trim("s", max_age=-1),
        lambda: store.leases.acquire("", "h", 5),
        lambda: store.leases.acquire("n", "h", 5, grant_id=""),
        lambda: store.kv.incr("n", True),
        lambda: store.kv.incr("n", 2**63),
        lambda: store.queue.reap(0),
    ]
    for call in bad:
        with pytest.raises(ConfigError):
            call()
    assert keys(store, "s:") == [] and keys(store, "lz:") == [] and keys(store, "kv:") == []
