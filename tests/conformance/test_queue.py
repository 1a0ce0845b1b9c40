"""QueueStore conformance: push, dedup, claim order, ETA and renew, on every backend."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskspace.backends.base import (
    FINAL_STATES,
    Lease,
    Outcome,
    TaskSpec,
)
from tests.conformance.conftest import PAST, TTL
from tests.conformance.queue_helpers import (
    ERR_A,
    RELEASE,
    SUCCEEDED,
    claim_one,
    push_one,
    retry,
    spec,
)

# -- push / get ---------------------------------------------------------------


def test_push_get_round_trip_every_field(store):
    full = TaskSpec(
        id="task-full", name="pkg.mod:fn", payload=b"\x00\xff\x80binary", codec="msgpack",
        queue="q-full", priority=7, max_attempts=4, lease_s=12.5, timeout=3.25,
        dedup_key="dedup-full", delay=0.0,
    )  # fmt: skip
    bare = TaskSpec(id="task-bare", name="n", payload=b"")
    before, wall_before = store.clock.now(), time.time()
    assert store.queue.push([full, bare]) == ["task-full", "task-bare"]
    after, wall_after = store.clock.now(), time.time()

    rec = store.queue.get("task-full")
    assert rec is not None
    assert (rec.id, rec.name, rec.payload, rec.codec) == (
        "task-full", "pkg.mod:fn", b"\x00\xff\x80binary", "msgpack",
    )  # fmt: skip
    assert (rec.queue, rec.priority, rec.max_attempts) == ("q-full", 7, 4)
    assert rec.lease_s == 12.5
    assert rec.timeout == 3.25
    assert rec.dedup_key == "dedup-full"
    assert rec.state == "queued"
    assert (rec.attempts, rec.lost) == (0, 0)
    assert rec.worker is None
    assert rec.lease_expires is None
    assert rec.result is None
    assert rec.error is None
    assert rec.progress is None
    assert rec.cancel_requested is False
    # created is the wall clock (epoch seconds); ready_at is on the lease clock
    assert wall_before - 1.0 <= rec.created <= wall_after + 1.0
    assert before <= rec.ready_at <= after
    assert rec.started is None
    assert rec.finished is None

    b = store.queue.get("task-bare")
    assert b is not None
    assert (b.payload, b.codec, b.queue, b.priority) == (b"", "json", "default", 0)
    assert (b.max_attempts, b.lease_s, b.timeout, b.dedup_key) == (1, 30.0, None, None)
    assert store.queue.get("no-such-task") is None


def test_push_returns_ids_in_spec_order(store):
    specs = [spec(id=f"t{i}") for i in range(20)]
    assert store.queue.push(specs) == [f"t{i}" for i in range(20)]
    assert store.queue.push([]) == []
    assert all(store.queue.get(f"t{i}") is not None for i in range(20))


def test_push_delay_sets_ready_at(store):
    before = store.clock.now()
    task_id = push_one(store, delay=60.0)
    after = store.clock.now()
    rec = store.queue.get(task_id)
    assert before + 60.0 <= rec.ready_at <= after + 60.0


# -- dedup --------------------------------------------------------------------


def test_dedup_returns_live_task_id(store):
    first = push_one(store, dedup_key="k")
    dup = spec(dedup_key="k")
    assert store.queue.push([dup]) == [first]
    assert store.queue.get(dup.id) is None
    # also within one batch, and next to an unrelated spec
    other = spec(dedup_key="other")
    a, b = spec(dedup_key="k2"), spec(dedup_key="k2")
    assert store.queue.push([a, other, b]) == [a.id, other.id, a.id]
    assert store.queue.get(b.id) is None
    assert store.queue.stats().total("queued") == 3


def test_dedup_holds_while_running_and_requeued(store):
    first = push_one(store, dedup_key="k", max_attempts=3)
    rec = claim_one(store)
    assert store.queue.push([spec(dedup_key="k")]) == [first]
    assert store.queue.finish([(rec.lease, retry())]) == [True]
    assert store.queue.push([spec(dedup_key="k")]) == [first]
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, RELEASE)]) == [True]
    assert store.queue.push([spec(dedup_key="k")]) == [first]
    assert store.queue.stats().total("queued") == 1


@pytest.mark.parametrize("ending", ["succeeded", "failed", "cancelled", "retry-exhausted"])
def test_dedup_key_freed_when_task_ends(store, ending):
    first = push_one(store, dedup_key="k")
    rec = claim_one(store)
    outcome = {
        "succeeded": SUCCEEDED,
        "failed": Outcome("failed", error=ERR_A),
        "cancelled": Outcome("cancelled"),
        "retry-exhausted": retry(error=ERR_A),
    }[ending]
    assert store.queue.finish([(rec.lease, outcome)]) == [True]
    assert store.queue.get(first).state in FINAL_STATES
    new = spec(dedup_key="k")
    assert store.queue.push([new]) == [new.id]
    assert new.id != first
    assert store.queue.push([spec(dedup_key="k")]) == [new.id]


def test_dedup_key_freed_when_queued_task_cancelled(store):
    first = push_one(store, dedup_key="k")
    assert store.queue.cancel(first) == "cancelled"
    new = spec(dedup_key="k")
    assert store.queue.push([new]) == [new.id]
    assert claim_one(store).id == new.id


def test_concurrent_pushes_with_one_dedup_key_create_one_task(store):
    barrier = threading.Barrier(4)

    def pusher(_: int) -> set[str]:
        barrier.wait()
        return {store.queue.push([spec(dedup_key="shared")])[0] for _ in range(25)}

    with ThreadPoolExecutor(4) as pool:
        ids = set().union(*pool.map(pusher, range(4)))
    assert len(ids) == 1
    assert store.queue.stats().total("queued") == 1


# -- claim ----------------------------------------------------------------------


def test_claim_order_queue_then_priority_then_fifo(store):
    store.queue.push([spec("a", id="a-low", priority=-1)])
    store.queue.push([spec("a", id="a-p0-1"), spec("a", id="a-p5-1", priority=5)])
    store.queue.push([spec("a", id="a-p0-2")])
    store.queue.push([spec("a", id="a-p5-2", priority=5), spec("a", id="a-p9", priority=9)])
    store.queue.push([spec("b", id="b-p0"), spec("b", id="b-p1", priority=1)])
    store.queue.push([spec("c", id="c-p100", priority=100)])

    got = [r.id for r in store.queue.claim(["b", "a"], "w", 100)]
    assert got == ["b-p1", "b-p0", "a-p9", "a-p5-1", "a-p5-2", "a-p0-1", "a-p0-2", "a-low"]
    assert store.queue.claim(["b", "a"], "w", 100) == []
    assert claim_one(store, "c").id == "c-p100"


def test_claim_one_at_a_time_follows_the_same_order(store):
    store.queue.push([spec("a", id="a1"), spec("b", id="b1", priority=-5)])
    store.queue.push([spec("a", id="a2", priority=3), spec("b", id="b2")])
    got = []
    while records := store.queue.claim(["b", "a"], "w", 1):
        got.append(records[0].id)
    assert got == ["b2", "b1", "a2", "a1"]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tasks=st.lists(st.tuples(st.integers(0, 2), st.integers(-2, 2)), min_size=1, max_size=15),
    order=st.permutations([0, 1, 2]),
    n=st.integers(1, 6),
)
def test_claim_order_property(store, tasks, order, n):
    run = uuid.uuid4().hex  # fresh queues per example: the store is shared
    queues = [f"{run}-{q}" for q in range(3)]
    specs = [spec(queues[q], id=f"{run}-{i}", priority=p) for i, (q, p) in enumerate(tasks)]
    store.queue.push(specs)
    rank = {q: order.index(i) for i, q in enumerate(queues)}
    expected = [
        s.id
        for _, s in sorted(enumerate(specs), key=lambda x: (rank[x[1].queue], -x[1].priority, x[0]))
    ]
    claim_queues = [queues[i] for i in order]
    got: list[str] = []
    while records := store.queue.claim(claim_queues, "w", n):
        assert len(records) <= n
        got.extend(r.id for r in records)
    assert got == expected


def test_claim_respects_n(store):
    store.queue.push([spec("a") for _ in range(2)] + [spec("b") for _ in range(2)] + [spec("c")])
    assert store.queue.claim(["a", "b"], "w", 0) == []
    first = store.queue.claim(["a", "b"], "w", 3)
    assert [r.queue for r in first] == ["a", "a", "b"]
    assert len(store.queue.claim(["a", "b", "c"], "w", 1)) == 1
    assert [r.queue for r in store.queue.claim(["a", "b", "c"], "w", 10)] == ["c"]
    assert store.queue.claim(["a", "b", "c"], "w", 10) == []


def test_claim_ignores_other_queues_and_unknown_queues(store):
    push_one(store, queue="other")
    assert store.queue.claim(["default"], "w", 10) == []
    assert store.queue.claim([], "w", 10) == []
    assert store.queue.claim(["nope"], "w", 10) == []
    assert len(store.queue.claim(["other"], "w", 10)) == 1


def test_claim_listing_a_queue_twice_claims_each_task_once(store):
    store.queue.push([spec("a") for _ in range(3)])
    records = store.queue.claim(["a", "a"], "w", 10)
    assert len(records) == 3
    assert len({r.id for r in records}) == 3


def test_claim_sets_lease_fields(store):
    task_id = push_one(store, lease_s=17.0)
    before, wall_before = store.clock.now(), time.time()
    rec = claim_one(store, worker="worker-1")
    after, wall_after = store.clock.now(), time.time()
    assert rec.id == task_id
    assert rec.state == "running"
    assert rec.worker == "worker-1"
    assert rec.attempts == 1
    assert rec.token > 0
    assert rec.lease == Lease(task_id, rec.token)
    assert wall_before - 1.0 <= rec.started <= wall_after + 1.0  # wall clock
    assert before + 17.0 <= rec.lease_expires <= after + 17.0  # lease clock
    assert store.queue.get(task_id) == rec


def test_claim_increments_attempts_with_strictly_increasing_tokens(store):
    task_id = push_one(store, max_attempts=10)
    tokens = []
    attempts = []
    for outcome in [retry(), retry(), RELEASE, retry(), None]:
        rec = claim_one(store)
        assert rec.id == task_id
        tokens.append(rec.token)
        attempts.append(rec.attempts)
        if outcome is not None:
            assert store.queue.finish([(rec.lease, outcome)]) == [True]
    assert all(a < b for a, b in itertools.pairwise(tokens))
    # release hands back the attempt, so the 4th claim is again attempt 3
    assert attempts == [1, 2, 3, 3, 4]


def test_tokens_distinct_within_one_claim(store):
    store.queue.push([spec() for _ in range(5)])
    records = store.queue.claim(["default"], "w", 5)
    assert len({r.token for r in records}) == 5


# -- ETA / delay ---------------------------------------------------------------


def test_delayed_task_not_claimable_until_due(timed):
    s = timed.store
    late = push_one(s, delay=TTL, priority=10)
    assert s.queue.claim(["default"], "w", 10) == []
    now_id = push_one(s)
    assert [r.id for r in s.queue.claim(["default"], "w", 10)] == [now_id]
    assert s.queue.get(late).state == "queued"
    timed.advance(PAST)
    s.queue.promote_due()
    assert [r.id for r in s.queue.claim(["default"], "w", 10)] == [late]


def test_retry_delay_postpones_next_claim(timed):
    s = timed.store
    task_id = push_one(s, max_attempts=2)
    rec = claim_one(s)
    before = s.clock.now()
    assert s.queue.finish([(rec.lease, retry(delay=TTL, error=ERR_A))]) == [True]
    after = s.queue.get(task_id)
    assert after.state == "queued"
    assert after.ready_at >= before + TTL
    assert s.queue.claim(["default"], "w", 1) == []
    timed.advance(PAST)
    s.queue.promote_due()
    again = claim_one(s)
    assert (again.id, again.attempts) == (task_id, 2)


def test_promote_due_returns_a_count(store):
    push_one(store, delay=60.0)
    assert store.queue.promote_due() == 0


# -- renew ----------------------------------------------------------------------


def test_renew_extends_lease(timed):
    s = timed.store
    push_one(s, lease_s=TTL)
    rec = claim_one(s)
    timed.advance(TTL * 0.6)
    assert s.queue.renew([rec.lease]) == {rec.id: "held"}
    renewed = s.queue.get(rec.id)
    assert renewed.lease_expires > rec.lease_expires
    assert renewed.lease_expires == pytest.approx(s.clock.now() + TTL, abs=0.1)
    timed.advance(TTL * 0.6)  # past the first expiry, within the renewed one
    assert s.queue.requeue_expired() == 0
    assert s.queue.renew([rec.lease]) == {rec.id: "held"}
    assert s.queue.get(rec.id).state == "running"


def test_renew_reports_lost_after_expiry(timed):
    s = timed.store
    push_one(s, lease_s=TTL, max_attempts=2)
    rec = claim_one(s)
    timed.advance(PAST)
    assert s.queue.renew([rec.lease]) == {rec.id: "lost"}
    assert s.queue.requeue_expired() == 1
    assert s.queue.renew([rec.lease]) == {rec.id: "lost"}
    again = claim_one(s)
    assert again.id == rec.id
    # the old lease stays lost while the new one is held
    assert s.queue.renew([rec.lease]) == {rec.id: "lost"}
    assert s.queue.renew([again.lease]) == {again.id: "held"}


def test_renew_reports_each_lease(store):
    store.queue.push([spec(id="a"), spec(id="b"), spec(id="c")])
    a, b, c = store.queue.claim(["default"], "w", 3)
    assert store.queue.cancel(b.id) == "running"
    assert store.queue.finish([(c.lease, SUCCEEDED)]) == [True]
    stale = Lease(a.id, a.token - 1)
    assert store.queue.renew([a.lease, b.lease, c.lease]) == {
        "a": "held", "b": "cancel_requested", "c": "lost",
    }  # fmt: skip
    assert store.queue.renew([stale]) == {"a": "lost"}
    assert store.queue.renew([Lease("missing", 1)]) == {"missing": "lost"}
    assert store.queue.renew([]) == {}
    assert store.queue.get("a").state == "running"
