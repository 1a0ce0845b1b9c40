"""PostgreSQL leases, KV, streams and pub/sub beyond the conformance suite: the
SQL each protocol relies on (the name's row lock, the KV lock and the feed's
commit order, request ids and their retention, compaction steps, per-stream
ids), NOTIFY only when someone waits, pub/sub payloads above NOTIFY's limit and
Gaps after a terminated connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from taskspace.backends import open_store
from taskspace.backends.base import REQUEST_ID_TTL_S, Gap, Message, Put, VersionIs
from taskspace.backends.postgres import kv as pg_kv
from taskspace.backends.postgres.pubsub import MAX_PAYLOAD
from taskspace.errors import ConfigError
from tests.services import postgres_url


@pytest.fixture
def pg() -> Iterator[Any]:
    store = open_store(postgres_url())
    yield store
    store.close()


def sql(store: Any, statement: str, params: Any = ()) -> list[Any]:
    """Rows of one statement on the store's schema (autocommit)."""
    rows: list[Any] = store.conn.execute(statement, params)
    return rows


def drain(sub: Any, n: int, timeout: float = 5.0) -> list[Message | Gap]:
    got: list[Message | Gap] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        item = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {got} arrived"
        got.append(item)
    return got


# -- leases --------------------------------------------------------------------------


def test_an_acquire_waits_for_the_name_row_another_transaction_holds(pg: Any) -> None:
    """The name's row is locked before the grants are counted: while another
    transaction holds it, an acquire of the name blocks; other names do not."""
    assert pg.leases.acquire("held", "first", 30.0) is not None
    done = threading.Event()
    with pg.conn.transaction("test lock") as cur:
        cur.execute("SELECT 1 FROM lease_names WHERE name = 'held' FOR UPDATE")
        t = threading.Thread(
            target=lambda: (pg.leases.acquire("held", "second", 30.0), done.set()), daemon=True
        )
        t.start()
        assert pg.leases.acquire("other", "h", 30.0) is not None  # not blocked
        assert not done.wait(0.3)  # blocked on the row
    assert done.wait(5.0)
    t.join(5.0)
    assert [g.holder for g in pg.leases.holders("held")] == ["first"]


def test_kv_reap_prunes_expired_grants_and_idle_names(pg: Any) -> None:
    gone = pg.leases.acquire("short", "h", 0.2)
    kept = pg.leases.acquire("long", "h", 60.0)
    assert gone is not None and kept is not None
    released = pg.leases.acquire("released", "h", 60.0)
    assert pg.leases.release(released) is True
    time.sleep(0.3)
    pg.kv.reap()
    assert sql(pg, "SELECT name FROM lease_grants ORDER BY name") == [("long",)]
    assert sql(pg, "SELECT name FROM lease_names ORDER BY name") == [("long",)]
    again = pg.leases.acquire("short", "h", 60.0)  # the name comes back on its next acquire
    assert again is not None and again.token > kept.token


# -- KV ------------------------------------------------------------------------------


def test_the_feed_is_followed_without_a_miss_while_writers_race(pg: Any) -> None:
    """Revision order is commit order: a follower resuming from the last revision
    it saw collects every change, while four threads write."""
    writers, per = 4, 40
    stop = threading.Event()
    seen: list[int] = []

    def follow() -> None:
        after = 0
        while not stop.is_set() or after < pg.kv.revision():
            page = pg.kv.changes("f/", after)
            seen.extend(c.revision for c in page)
            if page:
                after = page[-1].revision
            else:
                pg.kv.wait("f/", after, 0.2)

    def write(k: int) -> None:
        for i in range(per):
            pg.kv.put(f"f/{k}/{i % 3}", b"%d" % i)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    stop.set()
    follower.join(30.0)
    feed = [c.revision for c in pg.kv.changes("f/", 0, limit=1000)]
    assert len(feed) == writers * per
    assert seen == feed


def test_revisions_come_from_the_sequence(pg: Any) -> None:
    w = pg.kv.put("k", b"v")
    (last,) = sql(pg, "SELECT last_value FROM kv_revision")[0]
    assert w.revision == last == pg.kv.revision()
    assert pg.kv.txn([VersionIs("k", w.version + 1)], [Put("k", b"x")]).ok is False
    assert sql(pg, "SELECT last_value FROM kv_revision")[0][0] == last  # none taken


def test_request_ids_are_kept_then_reaped(pg: Any) -> None:
    first = pg.kv.txn([], [Put("k", b"1")], request_id="req-1")
    assert pg.kv.incr("n", 2, request_id="req-2") == 2
    ids = pg.streams.append_many("s", [b"a"], request_id="req-3")
    rows = sql(pg, "SELECT family, expires - lease_now() FROM request_ids ORDER BY family")
    assert [r[0] for r in rows] == ["kv.incr", "kv.txn", "stream"]
    assert all(REQUEST_ID_TTL_S - 5 < r[1] <= REQUEST_ID_TTL_S for r in rows)
    assert pg.kv.txn([], [Put("k", b"1")], request_id="req-1") == first
    assert pg.streams.append_many("s", [b"a"], request_id="req-3") == ids
    sql(pg, "UPDATE request_ids SET expires = lease_now() - 1")
    pg.kv.reap()
    assert sql(pg, "SELECT count(*) FROM request_ids") == [(0,)]
    # an expired id is a new request
    assert pg.kv.incr("n", 2, request_id="req-2") == 4


def test_compaction_drops_at_most_a_step_per_reap(pg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_kv, "KV_CHANGES_KEEP", 5)
    monkeypatch.setattr(pg_kv, "COMPACT_STEP", 10)
    writes = [pg.kv.put("k", b"%d" % i) for i in range(40)]
    pg.kv.reap()
    assert sql(pg, "SELECT count(*) FROM kv_changes") == [(30,)]  # 10 dropped
    assert sql(pg, "SELECT compacted FROM kv_state") == [(writes[9].revision,)]
    pg.kv.reap()
    pg.kv.reap()
    pg.kv.reap()
    assert [c.revision for c in pg.kv.changes("", writes[-6].revision)] == [
        w.revision for w in writes[-5:]
    ]
    assert sql(pg, "SELECT count(*) FROM kv_changes") == [(5,)]


def test_a_write_notifies_only_when_someone_waits(pg: Any) -> None:
    listener = pg.conn.dedicated()
    try:
        listener.execute(f'LISTEN "{pg.waiter.channel}"')
        pg.kv.put("cfg/a", b"1")  # nobody waits
        assert list(listener.notifies(timeout=0.3)) == []
        rev = pg.kv.revision()
        waiting = threading.Thread(target=pg.kv.wait, args=("cfg/", rev, 5.0))
        waiting.start()
        deadline = time.monotonic() + 5
        while not sql(pg, "SELECT 1 FROM waiters WHERE key = 'kv:cfg/'"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pg.kv.put("other/x", b"1")  # no waiter of its prefixes
        pg.kv.put("cfg/b", b"1")
        got = [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)]
        waiting.join(5.0)
        assert got == ["kv:cfg/"]
    finally:
        listener.close()


# -- streams -------------------------------------------------------------------------


def test_stream_ids_start_at_the_wall_clock_and_survive_a_full_trim(pg: Any) -> None:
    before = int(time.time() * 1e6) - 5_000_000
    ids = pg.streams.append_many("s", [b"a", b"b", b"c"])
    assert ids[0] > before and ids == list(range(ids[0], ids[0] + 3))
    assert pg.streams.trim("s", min_id=ids[-1] + 1) == 3
    assert sql(pg, "SELECT last_id FROM stream_heads WHERE stream = 's'") == [(ids[-1],)]
    assert pg.streams.append("s", b"d") > ids[-1]


# -- pub/sub -------------------------------------------------------------------------


def test_a_message_above_the_notify_limit_is_delivered_through_the_table(pg: Any) -> None:
    other = open_store(pg.url)
    try:
        with pg.pubsub.subscribe(["big"], ["b"]) as sub:
            data = bytes(range(256)) * 100  # 25.6 KB, NUL bytes included
            other.pubsub.publish("big", data)
            other.pubsub.publish("big", b"small")
            got = drain(sub, 4)
            assert got == [
                Message("big", data),
                Message("big", data, "b"),
                Message("big", b"small"),
                Message("big", b"small", "b"),
            ]
        assert sql(pg, "SELECT count(*) FROM pubsub_payloads") == [(1,)]
    finally:
        other.close()


def test_a_stored_payload_gone_before_it_was_read_is_a_gap(pg: Any) -> None:
    with pg.pubsub.subscribe(["ch"]) as sub:
        pg.pubsub.publish("ch", b"x" * (MAX_PAYLOAD * 2))
        sql(pg, "DELETE FROM pubsub_payloads")
        pg.pubsub.publish("ch", b"after")
        assert drain(sub, 2) == [Gap("overflow"), Message("ch", b"after")]


def test_a_terminated_subscription_connection_reports_a_gap_then_delivers(pg: Any) -> None:
    with pg.pubsub.subscribe(["ch"]) as sub:
        pg.pubsub.publish("ch", b"before")
        assert drain(sub, 1) == [Message("ch", b"before")]
        pid = sub._listen.info.backend_pid
        sql(pg, "SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        item = sub.get(timeout=10.0)
        assert item == Gap("reconnect")
        assert sub._listen.info.backend_pid != pid
        pg.pubsub.publish("ch", b"after")
        assert drain(sub, 1, timeout=max(0.1, deadline - time.monotonic())) == [
            Message("ch", b"after")
        ]


def test_channel_names_with_nul_are_refused(pg: Any) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        pg.pubsub.publish("a\x00b", b"x")
    with pytest.raises(ConfigError, match="NUL"):
        pg.pubsub.subscribe(["a\x00"])


def test_closing_the_store_closes_its_subscriptions() -> None:
    store = open_store(postgres_url())
    sub = store.pubsub.subscribe(["ch"])
    listen = sub._listen
    assert listen is not None and not listen.closed
    store.close()
    assert listen.closed
    assert sub.get(timeout=0) is None
