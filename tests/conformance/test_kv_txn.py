"""KVStore conformance: txn (every compare kind, fenced writes, one revision),
the change feed (put/delete/expire in revision order, prefix, limit),
compaction (Compacted), wait, and reap."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from taskspace.backends.base import (
    KV_CHANGES_KEEP,
    Change,
    Delete,
    Exists,
    GrantHeld,
    Put,
    TxnResult,
    ValueIs,
    VersionIs,
)
from taskspace.errors import Compacted, ConfigError
from tests.conformance.conftest import LONG, PAST, TTL

# -- txn ---------------------------------------------------------------------------------


def test_txn_writes_share_one_revision(store):
    store.kv.put("other", b"o")
    store.kv.put("gone", b"g")
    r = store.kv.txn([], [Put("a", b"1"), Delete("gone"), Put("b", b"2", ttl=LONG)])
    assert isinstance(r, TxnResult)
    assert r.ok and r.failed is None
    assert r.revision == store.kv.revision()
    assert r.versions == (r.revision, r.revision)  # one per Put, in write order
    a, b = store.kv.get_many(["a", "b"])
    assert (a.value, a.version, a.revision, a.expires) == (b"1", r.revision, r.revision, None)
    assert (b.value, b.version) == (b"2", r.revision)
    assert b.expires is not None
    assert store.kv.get("gone") is None
    changes = store.kv.changes("", r.revision - 1)
    assert {(c.key, c.kind) for c in changes} == {("a", "put"), ("gone", "delete"), ("b", "put")}
    assert {c.revision for c in changes} == {r.revision}


def test_txn_version_is(store):
    w = store.kv.put("k", b"a")
    assert store.kv.txn([VersionIs("k", w.version)], [Put("k", b"b")]).ok
    rev = store.kv.revision()
    r = store.kv.txn([VersionIs("k", w.version)], [Put("k", b"c")])
    assert (r.ok, r.failed, r.revision, r.versions) == (False, 0, rev, ())
    assert store.kv.get("k").value == b"b"
    assert store.kv.txn([VersionIs("new", None)], [Put("new", b"x")]).ok
    assert not store.kv.txn([VersionIs("new", None)], [Put("new", b"y")]).ok
    assert store.kv.get("new").value == b"x"


def test_txn_value_is(store):
    store.kv.put("k", b"\x00v")
    assert not store.kv.txn([ValueIs("k", b"v")], [Put("out", b"1")]).ok
    assert not store.kv.txn([ValueIs("missing", b"")], [Put("out", b"1")]).ok
    assert store.kv.get("out") is None
    assert store.kv.txn([ValueIs("k", b"\x00v")], [Put("out", b"1")]).ok
    store.kv.put("empty", b"")
    assert store.kv.txn([ValueIs("empty", b"")], [Put("out", b"2")]).ok


def test_txn_exists(timed):
    s = timed.store
    s.kv.put("k", b"v")
    s.kv.put("short", b"v", ttl=TTL)
    assert s.kv.txn([Exists("k"), Exists("none", exists=False)], [Put("o", b"1")]).ok
    r = s.kv.txn([Exists("k"), Exists("none")], [Put("o", b"2")])
    assert (r.ok, r.failed) == (False, 1)
    assert s.kv.txn([Exists("short")], [Put("o", b"3")]).ok
    timed.advance(PAST)
    assert not s.kv.txn([Exists("short")], [Put("o", b"4")]).ok  # expired: absent at once
    assert s.kv.txn([Exists("short", exists=False)], [Put("o", b"5")]).ok
    assert s.kv.get("o").value == b"5"


def test_txn_reports_the_first_failed_compare_and_writes_nothing(store):
    w = store.kv.put("k", b"v")
    rev = store.kv.revision()
    compares = [Exists("k"), ValueIs("k", b"v"), VersionIs("k", w.version + 1), Exists("nope")]
    r = store.kv.txn(compares, [Put("a", b"1"), Delete("k")])
    assert (r.ok, r.failed, r.revision) == (False, 2, rev)
    assert store.kv.get("k") == w and store.kv.get("a") is None
    assert store.kv.revision() == rev
    assert store.kv.changes("", rev) == []


def test_txn_grant_held_is_a_fenced_write(timed):
    s = timed.store
    g = s.leases.acquire("leader", "me", TTL)
    assert g is not None
    assert s.kv.txn([GrantHeld(g)], [Put("config", b"v1")]).ok
    assert s.leases.release(g) is True
    r = s.kv.txn([GrantHeld(g)], [Put("config", b"v2")])
    assert (r.ok, r.failed) == (False, 0)
    # expired, not released: fenced off too
    g2 = s.leases.acquire("leader", "me", TTL)
    assert s.kv.txn([Exists("config"), GrantHeld(g2)], [Put("config", b"v3")]).ok
    timed.advance(PAST)
    r = s.kv.txn([Exists("config"), GrantHeld(g2)], [Put("config", b"v4")])
    assert (r.ok, r.failed) == (False, 1)
    # a newer grant of the same name does not revive the old one
    g3 = s.leases.acquire("leader", "me", LONG)
    assert not s.kv.txn([GrantHeld(g2)], [Put("config", b"v5")]).ok
    assert s.kv.txn([GrantHeld(g3)], [Put("config", b"v6")]).ok
    assert s.kv.get("config").value == b"v6"


def test_txn_writing_one_key_twice_is_a_config_error(store):
    rev = store.kv.revision()
    for writes in ([Put("k", b"1"), Put("k", b"2")], [Put("k", b"1"), Delete("k")]):
        with pytest.raises(ConfigError):
            store.kv.txn([], writes)
    assert store.kv.get("k") is None
    assert store.kv.revision() == rev


def test_txn_bad_arguments(store):
    with pytest.raises(ConfigError):
        store.kv.txn([], [Put("", b"1")])
    with pytest.raises(ConfigError):
        store.kv.txn([], [Put("k", b"1", ttl=0.0)])
    assert store.kv.revision() == 0


def test_txn_no_aba_across_delete_and_recreate(store):
    w1 = store.kv.put("k", b"same")
    store.kv.delete("k")
    store.kv.put("k", b"same")
    assert not store.kv.txn([VersionIs("k", w1.version)], [Put("k", b"x")]).ok
    assert store.kv.txn([ValueIs("k", b"same")], [Put("k", b"x")]).ok  # value compare: no fence


def test_txn_request_id_applies_once(store, caps):
    if not caps.lost_replies:
        pytest.skip("replies cannot be lost: request ids may be ignored")
    first = store.kv.txn([VersionIs("k", None)], [Put("k", b"1")], request_id="r1")
    assert first.ok
    again = store.kv.txn([VersionIs("k", None)], [Put("k", b"1")], request_id="r1")
    assert again == first
    assert store.kv.revision() == first.revision


# -- change feed ------------------------------------------------------------------------


def test_changes_in_revision_order_with_kind_version_and_value(timed):
    s = timed.store
    a1 = s.kv.put("app/a", b"1")
    s.kv.put("other", b"x")
    b1 = s.kv.put("app/b", b"2", ttl=TTL)
    a2 = s.kv.cas("app/a", a1.version, b"3")
    assert s.kv.delete("app/a") is True
    timed.advance(PAST)
    changes = s.kv.changes("app/", 0)  # records the expiry of app/b
    assert [(c.key, c.kind, c.version, c.value) for c in changes] == [
        ("app/a", "put", a1.version, b"1"),
        ("app/b", "put", b1.version, b"2"),
        ("app/a", "put", a2.version, b"3"),
        ("app/a", "delete", a2.version, None),
        ("app/b", "expire", b1.version, None),
    ]
    revisions = [c.revision for c in changes]
    assert revisions == sorted(set(revisions))
    assert revisions[-1] == s.kv.revision()  # the expiry took its own revision
    assert all(isinstance(c, Change) for c in changes)
    assert s.kv.changes("app/", revisions[2]) == changes[3:]
    # pages of ``limit`` (one change per revision here: nothing to keep whole),
    # never empty while more remain, together the whole feed
    paged: list[Change] = []
    while page := s.kv.changes("app/", paged[-1].revision if paged else 0, limit=2):
        assert len(page) == min(2, len(changes) - len(paged))
        paged.extend(page)
    assert paged == changes
    assert s.kv.changes("app/", revisions[-1]) == []
    assert [c.key for c in s.kv.changes("", 0)].count("other") == 1
    assert s.kv.changes("nothing/", 0) == []


def _pages(store, prefix: str, limit: int) -> list[list[Change]]:
    """Every page of ``changes(prefix, ...)``, each resumed from the last
    change's revision of the page before, until an empty one."""
    pages: list[list[Change]] = []
    after = 0
    while page := store.kv.changes(prefix, after, limit=limit):
        pages.append(page)
        after = page[-1].revision
        assert len(pages) < 100, "paging does not advance"
    return pages


def _greedy_pages(feed: list[Change], limit: int) -> list[list[Change]]:
    """``feed`` cut as every backend pages it: whole revisions, as many as fit in
    ``limit`` changes, or the first revision alone when it has more."""
    revs: list[list[Change]] = []
    for c in feed:
        if revs and revs[-1][0].revision == c.revision:
            revs[-1].append(c)
        else:
            revs.append([c])
    pages: list[list[Change]] = []
    for rev in revs:
        if pages and len(pages[-1]) + len(rev) <= limit:
            pages[-1].extend(rev)
        else:
            pages.append(list(rev))
    return pages


def test_pages_of_changes_never_split_a_txn(store):
    """Txns of 3 keys paged with limit 2 (a revision larger than the page: it
    comes whole) and limit 4 (one txn fits, two do not), resuming from the last
    change's revision: every change exactly once, in order, none skipped."""
    kv = store.kv
    revs = [
        kv.txn([], [Put("p/a", b"1"), Put("p/b", b"1"), Put("p/c", b"1")]).revision,
        kv.put("p/d", b"1").revision,
        kv.txn([], [Put("p/e", b"1"), Delete("p/a"), Put("x/1", b"1")]).revision,
        kv.txn([], [Put("p/f", b"1"), Put("p/g", b"1"), Put("p/h", b"1")]).revision,
        kv.put("x/2", b"1").revision,
        kv.txn([], [Put("p/b", b"2"), Put("p/c", b"2"), Put("p/i", b"1")]).revision,
        kv.put("p/j", b"1").revision,
        kv.txn([], [Put("p/k", b"1"), Put("p/l", b"1"), Put("p/m", b"1")]).revision,
    ]
    assert revs == sorted(set(revs))
    for prefix, total in [("p/", 16), ("", 18)]:
        feed = kv.changes(prefix, 0, limit=100)
        assert len(feed) == total
        assert len({(c.revision, c.key) for c in feed}) == total
        with_prefix = revs if prefix == "" else [r for r in revs if r != revs[4]]  # x/2
        assert sorted({c.revision for c in feed}) == with_prefix
        for limit in (2, 4):
            pages = _pages(store, prefix, limit)
            assert [c for page in pages for c in page] == feed, (prefix, limit)
            for page in pages:  # at most limit, unless one revision alone has more
                assert len(page) <= limit or {c.revision for c in page} == {page[0].revision}
            assert pages == _greedy_pages(feed, limit), (prefix, limit)
    # a limit falling between two revisions ends the page there, not earlier:
    # p/d, then the two p/ changes of the third txn (3), then a txn of 3
    # (sorted: the order within a revision is the backend's)
    page = kv.changes("p/", revs[0], limit=3)
    assert sorted((c.revision, c.key) for c in page) == [
        (revs[1], "p/d"),
        (revs[2], "p/a"),
        (revs[2], "p/e"),
    ]


def test_expiry_is_recorded_by_a_write_or_reap_without_reading_the_key(timed):
    s = timed.store
    w = s.kv.put("e/1", b"x", ttl=TTL)
    s.kv.put("e/2", b"y", ttl=TTL)
    timed.advance(PAST)
    s.kv.put("unrelated", b"z")  # any write records due expiries
    s.kv.reap()
    expired = [c for c in s.kv.changes("e/", w.revision) if c.kind == "expire"]
    assert sorted(c.key for c in expired) == ["e/1", "e/2"]
    assert len(s.kv.changes("e/", 0)) == 4  # each expiry recorded once


def test_reap_deletes_expired_keys_and_counts_them(timed):
    s = timed.store
    s.kv.put("gone", b"1", ttl=TTL)
    s.kv.incr("gone-too", 1, ttl=TTL)
    s.kv.put("stays", b"2", ttl=3600.0)
    s.kv.put("forever", b"3")
    timed.advance(PAST)
    assert s.kv.reap(limit=1) == 1
    assert s.kv.reap() == 1
    assert s.kv.reap() == 0
    assert [k for k, _ in s.kv.scan("")] == ["forever", "stays"]
    kinds = [(c.key, c.kind) for c in s.kv.changes("gone", 0)]
    assert sorted(kinds) == [("gone", "expire"), ("gone", "put"), ("gone-too", "expire"),
                             ("gone-too", "put")]  # fmt: skip


def _patch_keep(monkeypatch: pytest.MonkeyPatch, store, keep: int) -> int:
    """Make ``reap`` keep only ``keep`` changes: patch the constant where the
    backend reads it at call time; otherwise return the real one (the test
    then writes that many changes)."""
    module = sys.modules[type(store.kv).__module__]
    if getattr(module, "KV_CHANGES_KEEP", None) == KV_CHANGES_KEEP:
        monkeypatch.setattr(module, "KV_CHANGES_KEEP", keep)
        return keep
    return KV_CHANGES_KEEP


def test_changes_below_the_compaction_point_raise_compacted(store, monkeypatch):
    keep = _patch_keep(monkeypatch, store, 5)
    writes = [store.kv.put(f"k{i % 3}", b"%d" % i) for i in range(keep + 7)]
    assert store.kv.changes("", 0, limit=1)[0].revision == writes[0].revision  # nothing dropped
    store.kv.reap()
    kept = [w.revision for w in writes[-keep:]]
    newest_dropped = writes[-keep - 1].revision
    with pytest.raises(Compacted) as err:
        store.kv.changes("", 0)
    assert err.value.revision == store.kv.revision() == writes[-1].revision
    assert err.value.compacted == newest_dropped
    with pytest.raises(Compacted):
        store.kv.changes("k1", newest_dropped - 1)  # also through a prefix
    got = store.kv.changes("", newest_dropped, limit=keep + 10)
    assert [c.revision for c in got] == kept
    # re-list, then resume from the current revision
    assert sorted(k for k, _ in store.kv.scan("")) == ["k0", "k1", "k2"]
    assert store.kv.changes("", err.value.revision) == []
    assert isinstance(err.value, LookupError)


def test_reap_keeps_at_least_the_newest_changes(store, monkeypatch):
    keep = _patch_keep(monkeypatch, store, 5)
    writes = [store.kv.put("k", b"%d" % i) for i in range(keep)]
    store.kv.reap()
    assert [c.revision for c in store.kv.changes("", 0, limit=keep)] == [w.revision for w in writes]


# -- wait --------------------------------------------------------------------------------


def test_wait_returns_after_a_put(store):
    rev = store.kv.revision()
    t = threading.Timer(0.1, store.kv.put, ("cfg/x", b"1"))
    start = time.monotonic()
    t.start()
    store.kv.wait("cfg/", rev, 10.0)
    elapsed = time.monotonic() - start
    t.join()
    assert elapsed < 2.0
    assert [c.key for c in store.kv.changes("cfg/", rev)] == ["cfg/x"]


def test_wait_returns_after_a_put_by_another_client(peers):
    a, b = peers
    rev = a.kv.revision()
    t = threading.Timer(0.1, b.kv.put, ("cfg/x", b"1"))
    start = time.monotonic()
    t.start()
    a.kv.wait("cfg/", rev, 10.0)
    elapsed = time.monotonic() - start
    t.join()
    assert elapsed < 2.0


def test_wait_returns_at_once_when_a_change_exists(store):
    rev = store.kv.revision()
    store.kv.put("cfg/x", b"1")
    start = time.monotonic()
    store.kv.wait("cfg/", rev, 10.0)
    assert time.monotonic() - start < 1.0


def test_wait_times_out(store):
    store.kv.put("other/x", b"1")
    start = time.monotonic()
    store.kv.wait("cfg/", store.kv.revision(), 0.2)
    assert time.monotonic() - start < 1.5


def test_wait_returns_when_a_key_of_the_prefix_expires(store):
    w = store.kv.put("cfg/x", b"1", ttl=0.3)
    start = time.monotonic()
    while not [c for c in store.kv.changes("cfg/", w.revision) if c.kind == "expire"]:
        assert time.monotonic() - start < 3.0
        store.kv.wait("cfg/", store.kv.revision(), 10.0)
    assert time.monotonic() - start < 3.0
