"""QueueStore conformance: every guarantee of base.QueueStore, on every backend."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskspace.backends.base import (
    FINAL_STATES,
    Lease,
    Outcome,
    TaskRecord,
    TaskSpec,
)
from tests.conformance.conftest import PAST, TTL

ERR_A = {"type": "ValueError", "message": "first", "traceback": "tb-a"}
ERR_B = {"type": "KeyError", "message": "second", "traceback": "tb-b", "detail": [1, 2]}


def spec(queue: str = "default", **kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    kw.setdefault("name", "job")
    kw.setdefault("payload", b"{}")
    return TaskSpec(queue=queue, **kw)  # type: ignore[arg-type]


def claim_one(store, queue: str = "default", worker: str = "w") -> TaskRecord:
    records = store.queue.claim([queue], worker, 1)
    assert len(records) == 1, records
    return records[0]


def push_one(store, **kw: object) -> str:
    (task_id,) = store.queue.push([spec(**kw)])
    return task_id


SUCCEEDED = Outcome("succeeded", result=b"ok")
RELEASE = Outcome("release")


def retry(delay: float = 0.0, error: dict | None = None) -> Outcome:
    return Outcome("retry", error=error, delay=delay)


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


# -- finish -------------------------------------------------------------------


def test_finish_with_stale_token_changes_nothing_and_is_counted(store):
    task_id = push_one(store, max_attempts=3)
    old = claim_one(store)
    assert store.queue.finish([(old.lease, RELEASE)]) == [True]
    current = claim_one(store)
    assert current.token > old.token
    before = store.queue.get(task_id)
    assert store.queue.stats().stale_finishes == 0

    assert store.queue.finish([(old.lease, SUCCEEDED)]) == [False]
    assert store.queue.finish([(old.lease, Outcome("failed", error=ERR_A))]) == [False]
    assert store.queue.get(task_id) == before
    assert store.queue.stats().stale_finishes == 2
    assert store.queue.progress(old.lease, 1, 2) is False
    assert store.queue.renew([current.lease]) == {task_id: "held"}

    assert store.queue.finish([(current.lease, SUCCEEDED)]) == [True]
    done = store.queue.get(task_id)
    # a finish repeated with the accepted token is a retry after a lost reply:
    # answered True, with no effect, and not counted stale
    assert store.queue.finish([(current.lease, Outcome("failed", error=ERR_A))]) == [True]
    assert store.queue.get(task_id) == done
    assert store.queue.stats().stale_finishes == 2
    # the older token stays stale
    assert store.queue.finish([(old.lease, SUCCEEDED)]) == [False]
    assert store.queue.stats().stale_finishes == 3


def test_finish_refuses_unknown_and_unclaimed_tasks(store):
    queued = push_one(store)
    before = store.queue.get(queued)
    items = [(Lease(queued, 0), SUCCEEDED), (Lease("missing", 1), SUCCEEDED)]
    assert store.queue.finish(items) == [False, False]
    assert store.queue.get(queued) == before
    assert store.queue.get("missing") is None
    assert store.queue.stats().stale_finishes == 2
    assert store.queue.finish([]) == []


def test_finish_batch_accepts_each_item_on_its_own(store):
    store.queue.push([spec(id="a"), spec(id="b")])
    a, b = store.queue.claim(["default"], "w", 2)
    result = store.queue.finish([
        (Lease(a.id, a.token + 1000), SUCCEEDED),
        (b.lease, Outcome("succeeded", result=b"B")),
        (a.lease, Outcome("succeeded", result=b"A")),
    ])  # fmt: skip
    assert result == [False, True, True]
    assert store.queue.get("a").result == b"A"
    assert store.queue.get("b").result == b"B"
    assert store.queue.stats().stale_finishes == 1


def test_outcome_succeeded(store):
    task_id = push_one(store)
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, Outcome("succeeded", result=b"\x00value"))]) == [True]
    done = store.queue.get(task_id)
    assert done.state == "succeeded"
    assert done.result == b"\x00value"
    assert done.error is None
    assert done.lease_expires is None
    assert done.finished is not None and done.finished >= rec.started
    assert done.attempts == 1
    assert store.queue.claim(["default"], "w", 1) == []


def test_outcome_failed_is_final_even_with_attempts_left(store):
    task_id = push_one(store, max_attempts=5)
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, Outcome("failed", error=ERR_B))]) == [True]
    done = store.queue.get(task_id)
    assert done.state == "failed"
    assert done.error == ERR_B
    assert done.finished is not None
    assert done.lease_expires is None
    assert store.queue.claim(["default"], "w", 1) == []


def test_outcome_retry_until_max_attempts_then_failed(store):
    task_id = push_one(store, max_attempts=3)
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, retry(error=ERR_A))]) == [True]
    r = store.queue.get(task_id)
    assert (r.state, r.attempts, r.error, r.worker, r.lease_expires) == (
        "queued", 1, ERR_A, None, None,
    )  # fmt: skip
    assert r.finished is None

    rec = claim_one(store)
    assert rec.attempts == 2
    assert rec.error == ERR_A
    assert store.queue.finish([(rec.lease, retry())]) == [True]
    assert store.queue.get(task_id).error == ERR_A  # a retry without error keeps the last one

    rec = claim_one(store)
    assert rec.attempts == 3
    assert store.queue.finish([(rec.lease, retry(error=ERR_B))]) == [True]
    done = store.queue.get(task_id)
    assert (done.state, done.attempts, done.error) == ("failed", 3, ERR_B)
    assert done.finished is not None
    assert store.queue.claim(["default"], "w", 1) == []


def test_outcome_retry_with_one_attempt_fails(store):
    task_id = push_one(store)
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, retry(delay=0.0, error=ERR_A))]) == [True]
    assert store.queue.get(task_id).state == "failed"
    assert store.queue.get(task_id).error == ERR_A


def test_outcome_cancelled(store):
    task_id = push_one(store, max_attempts=3)
    rec = claim_one(store)
    assert store.queue.finish([(rec.lease, Outcome("cancelled"))]) == [True]
    done = store.queue.get(task_id)
    assert done.state == "cancelled"
    assert done.finished is not None
    assert store.queue.claim(["default"], "w", 1) == []


def test_outcome_release_does_not_consume_an_attempt(store):
    task_id = push_one(store, max_attempts=1)
    for _ in range(3):
        rec = claim_one(store)
        assert rec.attempts == 1
        assert store.queue.finish([(rec.lease, RELEASE)]) == [True]
        r = store.queue.get(task_id)
        assert (r.state, r.attempts, r.worker, r.lease_expires) == ("queued", 0, None, None)
    rec = claim_one(store)
    # the single attempt is still available: a retry now fails rather than re-queues
    assert store.queue.finish([(rec.lease, retry())]) == [True]
    assert store.queue.get(task_id).state == "failed"


# -- requeue_expired ---------------------------------------------------------


def test_requeue_expired_returns_task_to_queue_then_dead(timed):
    s = timed.store
    task_id = push_one(s, lease_s=TTL, max_attempts=3)
    rec = claim_one(s, worker="w1")
    assert s.queue.finish([(rec.lease, retry(error=ERR_A))]) == [True]
    rec = claim_one(s, worker="w2")
    assert s.queue.requeue_expired() == 0  # not expired yet
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    assert s.queue.requeue_expired() == 0
    r = s.queue.get(task_id)
    assert (r.state, r.attempts, r.lost, r.worker, r.lease_expires) == (
        "queued", 2, 1, None, None,
    )  # fmt: skip
    assert r.finished is None
    assert r.error["type"] == "WorkerLost"
    assert r.error["history"] == [ERR_A]  # flat: earlier errors, newest first
    assert s.queue.finish([(rec.lease, SUCCEEDED)]) == [False]  # the lost lease is stale
    assert s.queue.stats().stale_finishes == 1

    rec = claim_one(s, worker="w3")
    assert rec.attempts == 3
    assert rec.token > 0
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    dead = s.queue.get(task_id)
    assert (dead.state, dead.attempts, dead.lost) == ("dead", 3, 2)
    assert dead.lease_expires is None
    assert dead.finished is not None
    assert dead.error["type"] == "WorkerLost"
    assert [e["type"] for e in dead.error["history"]] == ["WorkerLost", "ValueError"]
    assert dead.error["history"][1] == ERR_A
    assert all("history" not in e for e in dead.error["history"])
    assert s.queue.claim(["default"], "w", 1) == []
    assert s.queue.renew([rec.lease]) == {task_id: "lost"}
    assert s.queue.finish([(rec.lease, SUCCEEDED)]) == [False]
    assert s.queue.get(task_id) == dead


def test_requeue_expired_only_touches_expired_leases(timed):
    s = timed.store
    s.queue.push([spec(id="short", lease_s=TTL, max_attempts=2), spec(id="long", lease_s=60.0)])
    _short, long = s.queue.claim(["default"], "w", 2)
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    assert s.queue.get("short").state == "queued"
    assert s.queue.get("long").state == "running"
    assert s.queue.renew([long.lease]) == {"long": "held"}


def test_dead_task_frees_dedup_key(timed):
    s = timed.store
    first = push_one(s, lease_s=TTL, dedup_key="k")
    claim_one(s)
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    assert s.queue.get(first).state == "dead"
    assert s.queue.get(first).error.get("previous") is None
    new = spec(dedup_key="k")
    assert s.queue.push([new]) == [new.id]


def test_requeue_expired_concurrently_handles_each_task_once(timed):
    s = timed.store
    s.queue.push([spec(lease_s=TTL, max_attempts=2) for _ in range(40)])
    assert len(s.queue.claim(["default"], "w", 40)) == 40
    timed.advance(PAST)
    barrier = threading.Barrier(4)

    def sweep(_: int) -> int:
        barrier.wait()
        return sum(s.queue.requeue_expired() for _ in range(3))

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(sweep, range(4))) == 40
    records = s.queue.claim(["default"], "w", 100)
    assert len(records) == 40
    assert all(r.lost == 1 and r.attempts == 2 for r in records)


# -- cancel ---------------------------------------------------------------------


def test_cancel_queued_task_never_runs(timed):
    s = timed.store
    task_id = push_one(s, max_attempts=3)
    delayed = push_one(s, delay=TTL)
    assert s.queue.cancel(task_id) == "cancelled"
    assert s.queue.cancel(delayed) == "cancelled"
    rec = s.queue.get(task_id)
    assert rec.state == "cancelled"
    assert rec.finished is not None
    timed.advance(PAST)
    s.queue.promote_due()
    assert s.queue.claim(["default"], "w", 10) == []
    assert s.queue.cancel(task_id) == "cancelled"  # idempotent
    assert s.queue.stats().total("cancelled") == 2


def test_cancel_unknown_task(store):
    assert store.queue.cancel("missing") is None


def test_cancel_final_task_changes_nothing(store):
    task_id = push_one(store)
    rec = claim_one(store)
    store.queue.finish([(rec.lease, SUCCEEDED)])
    done = store.queue.get(task_id)
    assert store.queue.cancel(task_id) == "succeeded"
    assert store.queue.get(task_id) == done


def test_cancel_running_task_requests_cancel(store):
    task_id = push_one(store, max_attempts=3)
    rec = claim_one(store)
    assert store.queue.cancel(task_id) == "running"
    r = store.queue.get(task_id)
    assert (r.state, r.cancel_requested) == ("running", True)
    assert store.queue.renew([rec.lease]) == {task_id: "cancel_requested"}
    assert store.queue.progress(rec.lease, 1, 2) is True


@pytest.mark.parametrize("kind", ["retry", "release"])
def test_cancel_requested_task_ends_cancelled_on_retry_or_release(store, kind):
    task_id = push_one(store, max_attempts=3)
    rec = claim_one(store)
    store.queue.cancel(task_id)
    assert store.queue.finish([(rec.lease, Outcome(kind))]) == [True]  # type: ignore[arg-type]
    done = store.queue.get(task_id)
    assert done.state == "cancelled"
    assert done.finished is not None
    assert store.queue.claim(["default"], "w", 1) == []


def test_cancel_requested_task_may_still_succeed(store):
    task_id = push_one(store)
    rec = claim_one(store)
    store.queue.cancel(task_id)
    assert store.queue.finish([(rec.lease, SUCCEEDED)]) == [True]
    assert store.queue.get(task_id).state == "succeeded"


def test_cancel_requested_task_ends_cancelled_on_expiry(timed):
    s = timed.store
    task_id = push_one(s, lease_s=TTL, max_attempts=3)
    claim_one(s)
    assert s.queue.cancel(task_id) == "running"
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    done = s.queue.get(task_id)
    assert done.state == "cancelled"
    assert done.lost == 1
    assert s.queue.claim(["default"], "w", 1) == []


# -- progress -------------------------------------------------------------------


def test_progress(store):
    task_id = push_one(store, max_attempts=2)
    rec = claim_one(store)
    assert store.queue.progress(rec.lease, 3, 10) is True
    assert store.queue.get(task_id).progress == (3.0, 10.0)
    assert store.queue.progress(rec.lease, 0.5, 1.5) is True
    assert store.queue.get(task_id).progress == (0.5, 1.5)
    assert store.queue.progress(Lease(task_id, rec.token + 1), 9, 10) is False
    assert store.queue.progress(Lease("missing", 1), 1, 1) is False
    assert store.queue.get(task_id).progress == (0.5, 1.5)

    assert store.queue.finish([(rec.lease, RELEASE)]) == [True]
    assert store.queue.progress(rec.lease, 9, 10) is False  # no longer running
    again = claim_one(store)
    assert store.queue.progress(rec.lease, 9, 10) is False  # stale token
    assert store.queue.progress(again.lease, 2, 10) is True
    assert store.queue.get(task_id).progress == (2.0, 10.0)
    store.queue.finish([(again.lease, SUCCEEDED)])
    assert store.queue.progress(again.lease, 10, 10) is False
    assert store.queue.get(task_id).progress == (2.0, 10.0)
    assert store.queue.stats().stale_finishes == 0  # refused progress is not a finish


# -- stats ----------------------------------------------------------------------


def test_stats_counts(store):
    assert store.queue.stats().total("queued") == 0
    store.queue.push([spec("a", max_attempts=2) for _ in range(6)] + [spec("b") for _ in range(3)])
    a = store.queue.claim(["a"], "w", 5)
    b = store.queue.claim(["b"], "w", 1)
    store.queue.finish([
        (a[0].lease, SUCCEEDED), (a[1].lease, SUCCEEDED), (a[2].lease, Outcome("failed")),
        (a[3].lease, retry()), (b[0].lease, Outcome("cancelled")),
    ])  # fmt: skip
    store.queue.cancel(store.queue.push([spec("b")])[0])
    store.queue.finish([(Lease("missing", 1), SUCCEEDED)])

    stats = store.queue.stats()
    c = stats.counts
    assert {s: c["a"].get(s, 0) for s in ("queued", "running", "succeeded", "failed")} == {
        "queued": 2, "running": 1, "succeeded": 2, "failed": 1,
    }  # fmt: skip
    assert {s: c["b"].get(s, 0) for s in ("queued", "running", "cancelled")} == {
        "queued": 2, "running": 0, "cancelled": 2,
    }  # fmt: skip
    assert stats.total("queued") == 4
    assert stats.total("queued", ["b"]) == 2
    assert stats.total("running", ["a", "b"]) == 1
    assert stats.total("dead") == 0
    assert stats.stale_finishes == 1


# -- waiting ----------------------------------------------------------------------


def _later(delay: float, fn) -> threading.Thread:
    errors: list[BaseException] = []

    def run() -> None:
        time.sleep(delay)
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - any failure in the thread is re-raised by _join_ok
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def _join_ok(t: threading.Thread) -> None:
    t.join(10)
    assert not t.is_alive()
    assert not t.errors  # type: ignore[attr-defined]


def test_wait_for_tasks_wakes_on_push(store):
    t = _later(0.1, lambda: store.queue.push([spec("q")]))
    start = time.monotonic()
    store.queue.wait_for_tasks(["q"], 5.0)
    elapsed = time.monotonic() - start
    _join_ok(t)
    assert elapsed < 2.5
    assert len(store.queue.claim(["q"], "w", 1)) == 1


def test_wait_for_tasks_wakes_on_push_by_another_client(peers):
    a, b = peers
    b.queue.stats()  # connect
    t = _later(0.1, lambda: b.queue.push([spec("q")]))
    start = time.monotonic()
    a.queue.wait_for_tasks(["q"], 5.0)
    elapsed = time.monotonic() - start
    _join_ok(t)
    assert elapsed < 2.5
    assert len(a.queue.claim(["q"], "w", 1)) == 1


def test_wait_for_tasks_returns_at_once_when_a_task_is_ready(store):
    push_one(store, queue="q")
    start = time.monotonic()
    store.queue.wait_for_tasks(["q"], 5.0)
    assert time.monotonic() - start < 1.0


def test_wait_for_tasks_returns_when_a_delayed_task_becomes_due(store):
    push_one(store, queue="q", delay=0.2)
    start = time.monotonic()
    while not store.queue.claim(["q"], "w", 1):
        assert time.monotonic() - start < 2.5
        store.queue.wait_for_tasks(["q"], 5.0)
    assert time.monotonic() - start < 2.5


def test_wait_for_tasks_times_out(store):
    start = time.monotonic()
    store.queue.wait_for_tasks(["q"], 0.2)
    assert time.monotonic() - start < 1.0


def test_wait_for_finish_wakes_on_finish(store):
    task_id = push_one(store)
    rec = claim_one(store)
    t = _later(0.1, lambda: store.queue.finish([(rec.lease, SUCCEEDED)]))
    start = time.monotonic()
    store.queue.wait_for_finish([task_id], 5.0)
    elapsed = time.monotonic() - start
    _join_ok(t)
    assert elapsed < 2.5
    assert store.queue.get(task_id).state == "succeeded"


def test_wait_for_finish_wakes_on_finish_by_another_client(peers):
    a, b = peers
    task_id = push_one(a)
    rec = claim_one(b)
    t = _later(0.1, lambda: b.queue.finish([(rec.lease, SUCCEEDED)]))
    start = time.monotonic()
    a.queue.wait_for_finish([task_id], 5.0)
    elapsed = time.monotonic() - start
    _join_ok(t)
    assert elapsed < 2.5
    assert a.queue.get(task_id).state == "succeeded"


def test_wait_for_finish_wakes_on_cancel_of_queued_task(store):
    task_id = push_one(store)
    t = _later(0.1, lambda: store.queue.cancel(task_id))
    start = time.monotonic()
    store.queue.wait_for_finish([task_id], 5.0)
    _join_ok(t)
    assert time.monotonic() - start < 2.5


def test_wait_for_finish_returns_at_once_when_a_task_has_ended(store):
    store.queue.push([spec(id="live"), spec(id="done")])
    rec = store.queue.claim(["default"], "w", 2)[1]
    assert rec.id == "done"
    store.queue.finish([(rec.lease, SUCCEEDED)])
    start = time.monotonic()
    store.queue.wait_for_finish(["live", "done"], 5.0)
    assert time.monotonic() - start < 1.0


def test_wait_for_finish_times_out(store):
    task_id = push_one(store)
    claim_one(store)
    start = time.monotonic()
    store.queue.wait_for_finish([task_id], 0.2)
    assert time.monotonic() - start < 1.0
    assert store.queue.get(task_id).state == "running"


# -- concurrency ------------------------------------------------------------------


def test_concurrent_claims_never_share_a_task(store):
    total, threads = 500, 4
    store.queue.push([spec(id=f"t{i:03d}", max_attempts=1) for i in range(total)])
    barrier = threading.Barrier(threads)

    def worker(k: int) -> list[str]:
        got: list[str] = []
        barrier.wait()
        while records := store.queue.claim(["default"], f"w{k}", 1 + k % 3):
            got.extend(r.id for r in records)
            assert store.queue.finish([(r.lease, SUCCEEDED) for r in records]) == [True] * len(
                records
            )
        return got

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    claimed = Counter(i for got in results for i in got)
    assert sum(claimed.values()) == total
    assert set(claimed) == {f"t{i:03d}" for i in range(total)}
    assert max(claimed.values()) == 1
    stats = store.queue.stats()
    assert stats.total("succeeded") == total
    assert stats.stale_finishes == 0
