"""Leader election in one process, on every backend: one leader among threads,
terms strictly increasing across failovers, a lost term inactive before the
store lets it go, stale terms' fenced writes refused, leader() and observe()
(through an outage and across a compacted change feed), and bad input."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from taskspace import BackendError, ConfigError, LeaseLost, LockTimeout, Space
from taskspace.backends.base import Grant, GrantHeld, Put
from taskspace.coordination.election import Election, LeaderChange, Term
from taskspace.errors import Compacted

TTL = 1.0


class Observer:
    """observe() on a thread of its own until closed; changes arrive on a queue.
    It observes in rounds of ``idle_timeout``, each resuming with ``since=``
    where the last one ended (so that it can stop)."""

    def __init__(self, election: Election) -> None:
        self.changes: queue.Queue[LeaderChange] = queue.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(election,), daemon=True)
        self.thread.start()

    def _run(self, election: Election) -> None:
        since: int | None = None
        while not self.stopped.is_set():
            if since is None:
                since = election.space.store.kv.revision()
                for change in election.observe(idle_timeout=0.1):  # the snapshot first
                    self.changes.put(change)
                    since = change.revision
                continue
            for change in election.observe(since, idle_timeout=0.1):
                self.changes.put(change)
                since = change.revision

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def next(self, timeout: float = 5.0) -> tuple[str | None, int | None]:
        change = self.changes.get(timeout=timeout)
        return change.identity, change.term


@pytest.fixture
def observer() -> Iterator[Any]:
    """Start an Observer on an election; every one is closed after the test."""
    started: list[Observer] = []

    def start(election: Election) -> Observer:
        watcher = Observer(election)
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.close()


def cut_renewals(space: Space, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every renewal of ``space`` fails until the returned event is set."""
    healed = threading.Event()
    real = space.store.leases.renew

    def renew(grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        if healed.is_set():
            return real(grants, ttl)
        raise BackendError("renewals cut off by the test")

    monkeypatch.setattr(space.store.leases, "renew", renew)
    return healed


def test_campaign_leads_until_resigned(space: Space) -> None:
    election = space.election("solo")
    assert election.leader() is None
    with election.campaign(identity="host-a:1", ttl=TTL) as term:
        assert isinstance(term, Term) and term.active and term.identity == "host-a:1"
        assert election.leader() == ("host-a:1", term.number)
        assert election.try_campaign(identity="host-b:2", ttl=TTL) is None
        time.sleep(2.5 * TTL)  # renewed in the background, record kept alive
        assert term.active and election.leader() == ("host-a:1", term.number)
        record = space.kv.get("taskspace/elections/solo")
        assert record == {"identity": "host-a:1", "term": term.number}
    assert not term.active
    assert election.leader() is None
    assert space.kv.get("taskspace/elections/solo") is None
    assert term.resign() is False  # idempotent


def test_one_leader_among_threads_and_terms_increase(space: Space) -> None:
    """4 threads x 3 terms each: never two active terms at once, and term
    numbers strictly increase in the order the terms were won."""
    election = space.election("crowd")
    inside: list[str] = []
    won: list[int] = []
    overlaps: list[tuple[str, ...]] = []
    guard = threading.Lock()
    errors: list[BaseException] = []

    def candidate(i: int) -> None:
        try:
            for _ in range(3):
                with election.campaign(identity=f"t{i}", ttl=TTL, wait=15) as term:
                    with guard:
                        inside.append(term.identity)
                        won.append(term.number)
                        if len(inside) > 1:
                            overlaps.append(tuple(inside))
                    assert term.active
                    time.sleep(0.01)
                    with guard:
                        inside.remove(term.identity)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=candidate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert overlaps == []
    assert len(won) == 12 and won == sorted(set(won))


def test_failover_lost_term_inactive_before_the_store_expires_it(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's renewals fail: its term turns inactive (on_lost fires) while
    the store still holds the lease, so no successor can act yet; then a
    successor wins with a larger term, and the stale term's fenced writes are
    refused."""
    election = space.election("failover")
    lost: list[tuple[Term, bool]] = []
    fired = threading.Event()

    def on_lost(term: Term) -> None:
        # Before the store's TTL ran out? (A lost lease is also given back in the
        # background at once, so the store may already have let it go.)
        lost.append((term, space.store.clock.now() < term.lease.grant.expires))
        fired.set()

    # A longer term than the file's: the check runs on the on_lost thread, which
    # must run within the last third of the TTL even on a busy host.
    ttl = 3 * TTL
    old = election.campaign(identity="old", ttl=ttl, on_lost=on_lost)
    assert space.kv.put("resource", "by old", fence=old.lease) > 0
    healed = cut_renewals(space, monkeypatch)
    assert fired.wait(5 * ttl)
    assert lost[0][0] is old and not old.active
    assert lost[0][1], "the term was lost only after the store let the lease go"
    healed.set()
    new = election.campaign(identity="new", ttl=TTL, wait=5 * ttl)
    assert new.number > old.number
    assert election.leader() == ("new", new.number)
    # the stale leader's fenced writes change nothing
    with pytest.raises(LeaseLost):
        space.kv.put("resource", "by old, stale", fence=old.lease)
    stale = space.store.kv.txn([GrantHeld(old.grant)], [Put("resource2", b"x")])
    assert not stale.ok and space.store.kv.get("resource2") is None
    assert space.kv.put("resource", "by new", fence=new.lease) > 0
    assert space.kv.get("resource") == "by new"
    assert old.resign() is False  # resigning a lost term touches nobody else's record
    assert space.kv.get("taskspace/elections/failover") == {"identity": "new", "term": new.number}
    new.resign()


def test_campaign_wait_bounds_and_wakes_on_resign(space: Space) -> None:
    election = space.election("waiting")
    first = election.campaign(identity="first", ttl=TTL)
    began = time.monotonic()
    with pytest.raises(LockTimeout):
        election.campaign(identity="second", ttl=TTL, wait=0.3)
    assert 0.25 <= time.monotonic() - began < 2.0
    threading.Timer(0.3, first.resign).start()
    began = time.monotonic()
    second = election.campaign(identity="second", ttl=TTL, wait=5)
    assert time.monotonic() - began < 0.3 + 0.7  # woken by the release, well before any expiry
    assert second.number > first.number
    second.resign()


def test_leader_record_rewritten_if_it_vanishes(space: Space) -> None:
    election = space.election("record")
    term = election.campaign(identity="me", ttl=TTL)
    space.store.kv.delete(election.key)
    deadline = time.monotonic() + 3 * TTL
    while space.store.kv.get(election.key) is None:
        assert time.monotonic() < deadline, "the heartbeat never wrote the record again"
        time.sleep(0.05)
    assert space.kv.get(election.key) == {"identity": "me", "term": term.number}
    term.resign()


def test_observe_sees_every_change(space: Space, observer: Any) -> None:
    election = space.election("watched")
    watcher = observer(election)
    assert watcher.next() == (None, None)
    a = election.campaign(identity="a", ttl=TTL)
    assert watcher.next() == ("a", a.number)
    a.resign()
    assert watcher.next() == (None, None)
    b = election.campaign(identity="b", ttl=TTL)
    assert watcher.next() == ("b", b.number)
    # another election's record under a longer name is not this one's
    other = space.election("watched-too").campaign(identity="x", ttl=TTL)
    b.resign()
    assert watcher.next() == (None, None)
    other.resign()
    with pytest.raises(queue.Empty):
        watcher.next(timeout=0.3)


def test_observe_since_resumes_after_a_revision(space: Space) -> None:
    election = space.election("since")
    a = election.campaign(identity="a", ttl=TTL)
    revision = space.store.kv.revision()
    a.resign()
    b = election.campaign(identity="b", ttl=TTL)
    changes = election.observe(since=revision)
    assert (next(changes).identity, next(changes).identity) == (None, "b")
    b.resign()
    assert next(changes).identity is None


def test_leader_record_expires_when_the_leader_dies(
    space: Space, monkeypatch: pytest.MonkeyPatch, observer: Any
) -> None:
    """A leader that stops renewing (as if killed): observe reports nobody once
    its record's TTL has passed, without anyone reading the key."""
    election = space.election("dies")
    watcher = observer(election)
    assert watcher.next() == (None, None)
    term = election.campaign(identity="doomed", ttl=TTL)
    assert watcher.next() == ("doomed", term.number)
    cut_renewals(space, monkeypatch)
    assert watcher.next(timeout=5 * TTL) == (None, None)
    assert election.leader() is None


def _patch_keep(monkeypatch: pytest.MonkeyPatch, space: Space, keep: int) -> None:
    """Make the store's change feed keep only ``keep`` changes (the backend
    module reads KV_CHANGES_KEEP at each reap)."""
    module = sys.modules[type(space.store.kv).__module__]
    assert hasattr(module, "KV_CHANGES_KEEP"), module
    monkeypatch.setattr(module, "KV_CHANGES_KEEP", keep)


def test_observe_resumes_after_compacted_with_the_latest_state(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The observer stops reading; meanwhile three terms come and go and the
    feed is compacted past them. observe re-reads the record and reports the
    latest leader (the intermediate ones collapse), then follows the feed again."""
    _patch_keep(monkeypatch, space, 3)
    election = space.election("compacted")
    kv = space.store.kv
    first = election.campaign(identity="first", ttl=TTL)
    changes = election.observe()
    assert next(changes).identity == "first"
    start = kv.revision()
    first.resign()
    middle = election.campaign(identity="middle", ttl=TTL)
    middle.resign()
    last = election.campaign(identity="last", ttl=TTL)
    for i in range(6):
        kv.put(f"churn/{i}", b"x")
    kv.reap()
    with pytest.raises(Compacted):  # the fault bites: the feed lost these changes
        kv.changes(election.key, start)
    resumed = next(changes)
    assert (resumed.identity, resumed.term) == ("last", last.number)
    last.resign()
    assert next(changes).identity is None


def test_observe_rides_out_backend_errors(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    election = space.election("flaky")
    kv = space.store.kv
    real = kv.changes
    failures = {"left": 3}

    def changes(prefix: str, after_revision: int, limit: int = 1000) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise BackendError("connection reset by the test")
        return real(prefix, after_revision, limit)

    monkeypatch.setattr(kv, "changes", changes)
    observed = election.observe()
    assert next(observed).identity is None
    term = election.campaign(identity="after-outage", ttl=TTL)
    assert next(observed).identity == "after-outage"
    assert failures["left"] == 0
    term.resign()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.campaign(ttl=-1), "ttl"),
        (lambda e: e.campaign(ttl=0), "ttl"),
        (lambda e: e.try_campaign(ttl="10"), "ttl"),
        (lambda e: e.campaign(identity="", ttl=1), "identity"),
        (lambda e: e.campaign(identity=5, ttl=1), "identity"),
        (lambda e: e.campaign(wait=-1), "wait"),
        (lambda e: next(e.observe(idle_timeout=-1)), "idle_timeout"),
        (lambda e: Election(e.space, "bad", ttl=-1), "ttl"),
        (lambda e: Election(e.space, "bad", identity=""), "identity"),
    ],
)
def test_bad_input_is_one_clear_config_error(space: Space, call: Any, message: str) -> None:
    election = space.election("bad")
    with pytest.raises(ConfigError, match=message):
        call(election)
    assert election.leader() is None


def test_election_defaults_apply_to_its_campaigns(space: Space) -> None:
    election = space.election("defaults", identity="svc-1", ttl=0.5)
    term = election.campaign()
    assert (term.identity, term.ttl, term.lease.ttl) == ("svc-1", 0.5, 0.5)
    assert election.leader() == ("svc-1", term.number)
    term.resign()
    plain = space.election("plain").try_campaign()
    assert plain is not None and plain.ttl == 10.0 and plain.identity.count(":") == 1
    plain.resign()


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_election_name(space: Space, name: Any) -> None:
    with pytest.raises(ConfigError, match="election name"):
        space.election(name)


def test_a_slow_record_heartbeat_never_holds_up_the_spaces_renewals(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader record's touch runs off the lease renewer: while it hangs in
    the store (1.5 s, past the renew deadline of a 0.3 s lease), another lease
    of the same Space and the term itself stay renewed."""
    election = space.election("slow-record")
    term = election.campaign(identity="me", ttl=0.3)
    other = space.lock("neighbour", ttl=0.3).acquire(wait=1)
    assert other is not None
    real_touch = space.store.kv.touch
    hung = threading.Event()
    threads: list[str] = []

    def touch(key: str, ttl: float) -> Any:
        if key == election.key and not hung.is_set():
            threads.append(threading.current_thread().name)
            hung.set()
            time.sleep(1.5)
        return real_touch(key, ttl)

    monkeypatch.setattr(space.store.kv, "touch", touch)
    assert hung.wait(3), "the record was never touched"
    time.sleep(1.0)  # the touch still hangs: renewals must go on meanwhile
    assert other.held and term.active
    assert threads == ["taskspace-election-heartbeat"]
    other.release()
    term.resign()
