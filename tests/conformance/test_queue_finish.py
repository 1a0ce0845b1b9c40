"""QueueStore conformance: finish and outcomes, stale leases, requeue_expired,
cancel, progress and stats, on every backend."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from taskspace.backends.base import (
    Lease,
    Outcome,
)
from tests.conformance.conftest import PAST, TTL
from tests.conformance.queue_helpers import (
    ERR_A,
    ERR_B,
    RELEASE,
    SUCCEEDED,
    claim_one,
    push_one,
    retry,
    spec,
)

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
