"""QueueStore conformance for contract v2: follow-ups pushed with accepted finishes
only, retried finishes, get_many, one token counter per space shared with lease
grants, claim request ids, and which clock each time is on."""

from __future__ import annotations

import itertools
import time
import uuid

import pytest

from taskspace.backends.base import Lease, Outcome, TaskSpec
from tests.conformance.conftest import LONG

ERR = {"type": "ValueError", "message": "boom", "traceback": "tb"}


def spec(queue: str = "default", **kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    kw.setdefault("name", "job")
    kw.setdefault("payload", b"{}")
    return TaskSpec(queue=queue, **kw)  # type: ignore[arg-type]


# -- follow-ups ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["succeeded", "failed", "cancelled", "retry"])
def test_followups_are_pushed_with_an_accepted_finish(store, kind):
    store.queue.push([spec(max_attempts=2)])
    (rec,) = store.queue.claim(["default"], "w", 1)
    nxt = spec("next", id="next", priority=3, dedup_key="chain")
    comp = spec("next", id="compensate")
    outcome = Outcome(kind, error=ERR if kind != "succeeded" else None, followups=(nxt, comp))
    assert store.queue.finish([(rec.lease, outcome)]) == [True]
    pushed = store.queue.get("next")
    assert pushed is not None
    assert (pushed.state, pushed.queue, pushed.priority, pushed.dedup_key) == (
        "queued", "next", 3, "chain",
    )  # fmt: skip
    assert store.queue.state("compensate") == "queued"
    assert [r.id for r in store.queue.claim(["next"], "w", 5)] == ["next", "compensate"]


def test_followups_are_never_pushed_with_a_refused_finish(store):
    store.queue.push([spec(id="t", max_attempts=3)])
    (old,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(old.lease, Outcome("release"))]) == [True]
    (current,) = store.queue.claim(["default"], "w", 1)
    stale = Outcome("succeeded", result=b"x", followups=(spec("next", id="never"),))
    assert store.queue.finish([(old.lease, stale)]) == [False]
    assert store.queue.finish([(Lease("missing", 1), stale)]) == [False]
    assert store.queue.get("never") is None
    assert store.queue.stats().total("queued", ["next"]) == 0
    assert store.queue.stats().stale_finishes == 2
    # in one batch, each item's follow-ups go with that item only
    ok = Outcome("succeeded", followups=(spec("next", id="yes"),))
    assert store.queue.finish([(old.lease, stale), (current.lease, ok)]) == [False, True]
    assert store.queue.get("never") is None
    assert store.queue.state("yes") == "queued"


def test_followups_dedup_like_push(store):
    (live,) = store.queue.push([spec("next", dedup_key="k")])
    store.queue.push([spec()])
    (rec,) = store.queue.claim(["default"], "w", 1)
    outcome = Outcome("succeeded", followups=(spec("next", id="dup", dedup_key="k"),))
    assert store.queue.finish([(rec.lease, outcome)]) == [True]
    assert store.queue.get("dup") is None
    assert [r.id for r in store.queue.list(queue="next")] == [live]


@pytest.mark.parametrize("order", ["holder_last", "holder_first"])
def test_followups_are_pushed_after_every_item_of_the_finish_is_settled(store, order):
    # B holds dedup key "D"; A's follow-up F asks for "D". One finish ends both:
    # follow-ups go in after every item is settled, so F is created (wherever
    # B sits in the call) instead of being folded into B, which just ended.
    store.queue.push([spec(id="A"), spec(id="B", dedup_key="D")])
    a, b = store.queue.claim(["default"], "w", 2)
    follow = Outcome("succeeded", followups=(spec("next", id="F", dedup_key="D"),))
    items = [(a.lease, follow), (b.lease, Outcome("succeeded"))]
    if order == "holder_first":
        items.reverse()
    assert store.queue.finish(items) == [True, True]
    assert store.queue.state("B") == "succeeded"
    assert store.queue.state("F") == "queued"
    # F holds "D" now
    assert store.queue.push([spec("next", id="G", dedup_key="D")]) == ["F"]


# -- retried finish -------------------------------------------------------------------


def test_retried_finish_of_an_accepted_lease_is_true_without_effect(store):
    store.queue.push([spec(id="t")])
    (rec,) = store.queue.claim(["default"], "w", 1)
    first = Outcome("succeeded", result=b"A", followups=(spec("next", id="f1"),))
    assert store.queue.finish([(rec.lease, first)]) == [True]
    done = store.queue.get("t")
    again = Outcome("failed", error=ERR, followups=(spec("next", id="f2"),))
    assert store.queue.finish([(rec.lease, first)]) == [True]
    assert store.queue.finish([(rec.lease, again)]) == [True]
    assert store.queue.get("t") == done
    assert store.queue.get("f2") is None  # no second effect: no follow-ups either
    assert store.queue.stats().total("queued", ["next"]) == 1
    assert store.queue.stats().stale_finishes == 0


def test_retried_finish_after_requeue_counts_until_the_next_claim(store):
    store.queue.push([spec(id="t", max_attempts=3)])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(rec.lease, Outcome("retry", error=ERR))]) == [True]
    queued = store.queue.get("t")
    assert store.queue.finish([(rec.lease, Outcome("retry", error=ERR))]) == [True]
    assert store.queue.get("t") == queued  # not a second attempt used up
    assert store.queue.stats().stale_finishes == 0
    (again,) = store.queue.claim(["default"], "w", 1)
    assert again.attempts == 2
    # claimed again: the earlier token is stale now
    assert store.queue.finish([(rec.lease, Outcome("succeeded"))]) == [False]
    assert store.queue.stats().stale_finishes == 1
    assert store.queue.finish([(again.lease, Outcome("succeeded"))]) == [True]


# -- get_many -------------------------------------------------------------------------


def test_get_many_in_the_order_asked(store):
    store.queue.push([spec(id="a", payload=b"A"), spec(id="b", payload=b"B")])
    (rec,) = store.queue.claim(["default"], "w", 1)
    got = store.queue.get_many(["b", "missing", "a", "b"])
    assert [r.id if r else None for r in got] == ["b", None, "a", "b"]
    assert got[0] == store.queue.get("b")
    assert got[2] == store.queue.get("a") == rec
    assert got[2].payload == b"A"  # full records, payload included
    assert store.queue.get_many([]) == []


# -- one token counter per space -------------------------------------------------------


def test_tokens_strictly_increase_across_claims_and_grants(store):
    store.queue.push([spec() for _ in range(6)])
    tokens: list[int] = []
    for i in range(6):
        if i % 2:
            grant = store.leases.acquire(f"lock-{i}", "h", LONG)
            assert grant is not None
            tokens.append(grant.token)
        records = store.queue.claim(["default"], "w", 1 + i % 2)
        tokens.extend(r.token for r in records)
    last = store.leases.acquire("other", "h2", LONG, capacity=2)
    assert last is not None
    tokens.append(last.token)
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
    # tokens start at the wall clock in microseconds (base.next_token)
    assert tokens[0] >= int((time.time() - 3600) * 1_000_000)


def test_claim_tokens_in_one_batch_increase_in_claim_order(store):
    store.queue.push([spec(priority=-i) for i in range(5)])
    records = store.queue.claim(["default"], "w", 5)
    tokens = [r.token for r in records]
    assert len(set(tokens)) == 5
    grant = store.leases.acquire("x", "h", LONG)
    assert grant is not None and grant.token > max(tokens)


# -- clocks ------------------------------------------------------------------------------


def test_person_times_are_epoch_seconds_and_expiries_are_on_the_lease_clock(store):
    wall0, now0 = time.time(), store.clock.now()
    store.queue.push([spec(id="t", lease_s=40.0, delay=0.0)])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(rec.lease, Outcome("succeeded"))]) == [True]
    entry_id = store.streams.append("s", b"x")
    wall1, now1 = time.time(), store.clock.now()
    done = store.queue.get("t")
    for t in (done.created, done.started, done.finished):
        assert wall0 - 1.0 <= t <= wall1 + 1.0
    assert done.created <= done.started <= done.finished
    (entry,) = store.streams.read("s")
    assert entry.id == entry_id
    assert wall0 - 1.0 <= entry.time <= wall1 + 1.0
    assert now0 <= done.ready_at <= now1
    assert now0 + 40.0 <= rec.lease_expires <= now1 + 40.0
    assert abs(store.clock.wall() - time.time()) < 1.0
    grant = store.leases.acquire("g", "h", 30.0)
    kv = store.kv.put("k", b"v", ttl=30.0)
    now2 = store.clock.now()
    assert now1 + 30.0 <= grant.expires <= now2 + 30.0
    assert now1 + 30.0 <= kv.expires <= now2 + 30.0


def test_lease_clock_never_goes_backwards(store):
    readings = [store.clock.now() for _ in range(200)]
    assert readings == sorted(readings)


# -- claim request ids -------------------------------------------------------------------


def test_claim_request_id_returns_the_first_claim(store, caps):
    if not caps.lost_replies:
        pytest.skip("replies cannot be lost: request ids may be ignored")
    store.queue.push([spec(id=f"t{i}") for i in range(4)])
    first = store.queue.claim(["default"], "w", 2, request_id="r1")
    assert [r.id for r in first] == ["t0", "t1"]
    again = store.queue.claim(["default"], "w", 2, request_id="r1")
    assert [(r.id, r.token) for r in again] == [(r.id, r.token) for r in first]
    assert store.queue.stats().total("running") == 2
    assert [r.id for r in store.queue.claim(["default"], "w", 5, request_id="r2")] == ["t2", "t3"]


def test_claim_request_id_seen_before_leases_nothing_new(store, caps):
    if not caps.lost_replies:
        pytest.skip("replies cannot be lost: request ids may be ignored")
    assert store.queue.claim(["default"], "w", 2, request_id="early") == []
    store.queue.push([spec()])
    assert store.queue.claim(["default"], "w", 2, request_id="early") == []
    assert store.queue.stats().total("queued") == 1
