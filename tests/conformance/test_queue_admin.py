"""QueueStore conformance for the extended contract: claim by names, state, list,
retry, purge, reap with result_ttl, cancel with terminate, progress of released
tasks, and bounded errors under thousands of lost leases — on every backend."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from taskspace.backends.base import ERROR_HISTORY_MAX, Outcome, TaskSpec
from taskspace.errors import ConfigError
from tests.conformance.conftest import PAST, TTL

ERR = {"type": "ValueError", "message": "boom", "traceback": "tb"}
SUCCEEDED = Outcome("succeeded", result=b"ok")


def spec(name: str = "job", queue: str = "default", **kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    kw.setdefault("payload", b"[1]")
    return TaskSpec(name=name, queue=queue, **kw)  # type: ignore[arg-type]


def ids(records) -> list[str]:
    return [r.id for r in records]


def run_to(store, task_id: str, kind: str, **kw: object) -> None:
    """Claim ``task_id`` (the only ready task of its queue) and end it with ``kind``."""
    (rec,) = store.queue.claim([store.queue.get(task_id).queue], "w", 1)
    assert rec.id == task_id
    assert store.queue.finish([(rec.lease, Outcome(kind, **kw))]) == [True]  # type: ignore[arg-type]


# -- claim(names=...) -------------------------------------------------------------


def test_claim_by_names_leaves_other_names_queued_in_order(store):
    store.queue.push(
        [spec("b", id="b1"), spec("a", id="a1"), spec("b", id="b2"), spec("a", id="a2")]
    )
    assert ids(store.queue.claim(["default"], "w", 10, names={"a"})) == ["a1", "a2"]
    assert store.queue.claim(["default"], "w", 10, names=["a", "c"]) == []
    assert store.queue.state("b1") == "queued"
    assert ids(store.queue.claim(["default"], "w", 10)) == ["b1", "b2"]


def test_claim_by_names_orders_by_queue_then_priority_then_fifo_across_names(store):
    store.queue.push([
        spec("a", "q2", id="q2-a", priority=9),
        spec("x", "q1", id="q1-x-high", priority=5),
        spec("a", "q1", id="q1-a-low", priority=-3),
        spec("b", "q1", id="q1-b-1", priority=1),
        spec("a", "q1", id="q1-a-1", priority=1),
        spec("b", "q1", id="q1-b-2", priority=1),
        spec("b", "q1", id="q1-b-high", priority=4),
    ])  # fmt: skip
    got = store.queue.claim(["q1", "q2"], "w", 10, names=["a", "b"])
    assert ids(got) == ["q1-b-high", "q1-b-1", "q1-a-1", "q1-b-2", "q1-a-low", "q2-a"]
    assert store.queue.state("q1-x-high") == "queued"


def test_claim_by_names_one_at_a_time_behind_many_other_names(store):
    store.queue.push([spec("other") for _ in range(3000)])
    store.queue.push([spec("mine", id=f"m{i}") for i in range(3)])
    store.queue.push([spec("other") for _ in range(3000)])
    for i in range(3):
        assert ids(store.queue.claim(["default"], "w", 1, names=["mine"])) == [f"m{i}"]
    assert store.queue.claim(["default"], "w", 5, names=["mine"]) == []
    assert store.queue.stats().counts["default"] == {"queued": 6000, "running": 3}


def test_claim_by_names_sees_delayed_tasks_when_due(timed):
    s = timed.store
    s.queue.push([spec("a", id="late", delay=TTL), spec("b", id="other")])
    assert s.queue.claim(["default"], "w", 5, names=["a"]) == []
    timed.advance(PAST)
    s.queue.promote_due()
    assert ids(s.queue.claim(["default"], "w", 5, names=["a"])) == ["late"]


# -- state ----------------------------------------------------------------------------


def test_state_follows_the_task(store):
    (task_id,) = store.queue.push([spec(max_attempts=2)])
    assert store.queue.state(task_id) == "queued"
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.state(task_id) == "running"
    store.queue.finish([(rec.lease, SUCCEEDED)])
    assert store.queue.state(task_id) == "succeeded"
    assert store.queue.state("missing") is None


# -- list -------------------------------------------------------------------------------


def test_list_pages_in_submission_order_without_payload_or_result(store):
    pushed = store.queue.push([spec(id=f"t{i:02d}", priority=i % 3) for i in range(25)])
    run_to(store, "t02", "succeeded", result=b"big result")  # claimed first (priority 2)
    page1 = store.queue.list(limit=10)
    assert ids(page1) == pushed[:10]
    page2 = store.queue.list(limit=10, after=page1[-1].id)
    page3 = store.queue.list(limit=10, after=page2[-1].id)
    assert ids(page2) == pushed[10:20]
    assert ids(page3) == pushed[20:]
    assert store.queue.list(after=pushed[-1]) == []
    with pytest.raises(ConfigError, match="no such task"):
        store.queue.list(after="never-there")  # paging restarts, never ends silently
    assert all(r.payload == b"" and r.result is None for r in page1 + page2 + page3)
    done = next(r for r in page1 if r.id == "t02")
    assert (done.state, done.attempts, done.name, done.priority) == ("succeeded", 1, "job", 2)
    assert store.queue.get("t02").result == b"big result"


def test_list_filters_combine(store):
    store.queue.push([
        spec("a", "q1", id="a-q1"), spec("b", "q1", id="b-q1"), spec("a", "q2", id="a-q2"),
        spec("a", "q1", id="a-q1-2", max_attempts=1),
    ])  # fmt: skip
    run_to(store, "a-q1", "failed", error=ERR)
    assert ids(store.queue.list(queue="q1")) == ["a-q1", "b-q1", "a-q1-2"]
    assert ids(store.queue.list(name="a")) == ["a-q1", "a-q2", "a-q1-2"]
    assert ids(store.queue.list(state="queued", queue="q1", name="a")) == ["a-q1-2"]
    assert ids(store.queue.list(state="failed")) == ["a-q1"]
    assert store.queue.list(state="dead") == []
    assert ids(store.queue.list(name="a", limit=2)) == ["a-q1", "a-q2"]
    assert ids(store.queue.list(name="a", limit=2, after="a-q2")) == ["a-q1-2"]
    assert store.queue.list(queue="nope") == []
    with pytest.raises(ConfigError, match="state"):
        store.queue.list(state="bogus")


# -- retry -----------------------------------------------------------------------------


def test_retry_requeues_failed_task_with_fresh_attempts(store):
    (task_id,) = store.queue.push([spec(max_attempts=2)])
    run_to(store, task_id, "failed", error=ERR)
    assert store.queue.retry(task_id) == "queued"
    rec = store.queue.get(task_id)
    assert (rec.state, rec.attempts, rec.lost, rec.finished) == ("queued", 0, 0, None)
    assert rec.error == ERR  # the last error is kept
    run_to(store, task_id, "retry", error=ERR)  # attempt 1 of 2: back to the queue
    run_to(store, task_id, "succeeded", result=b"r")
    assert store.queue.get(task_id).state == "succeeded"


def test_retry_requeues_dead_task(timed):
    s = timed.store
    (task_id,) = s.queue.push([spec(lease_s=TTL, max_attempts=1)])
    s.queue.claim(["default"], "w", 1)
    timed.advance(PAST)
    assert s.queue.requeue_expired() == 1
    assert s.queue.state(task_id) == "dead"
    assert s.queue.retry(task_id) == "queued"
    rec = s.queue.get(task_id)
    assert (rec.attempts, rec.lost, rec.error["type"]) == (0, 0, "WorkerLost")
    (again,) = s.queue.claim(["default"], "w", 1)
    assert again.id == task_id and again.attempts == 1


def test_retry_changes_nothing_for_other_states(store):
    queued, running, done = store.queue.push([spec("q", "q1"), spec("r", "q2"), spec("s", "q3")])
    run_to(store, done, "succeeded", result=b"x")
    store.queue.claim(["q2"], "w", 1)
    before = [store.queue.get(i) for i in (queued, running, done)]
    assert [store.queue.retry(i) for i in (queued, running, done)] == [
        "queued",
        "running",
        "succeeded",
    ]
    assert [store.queue.get(i) for i in (queued, running, done)] == before
    assert store.queue.retry("missing") is None


# -- purge -----------------------------------------------------------------------------


def test_purge_deletes_only_the_given_states_of_the_given_queue(store):
    store.queue.push([spec(queue="q1", id="r1", dedup_key="k"), spec(queue="q1", id="r2")])
    running = store.queue.claim(["q1"], "w", 2)
    store.queue.push([spec(queue="q1", id="f"), spec(queue="q2", id="other")])
    assert store.queue.purge("q1", ["queued", "failed"]) == 1  # only "f": the others run
    assert store.queue.get("f") is None
    assert store.queue.state("other") == "queued"
    store.queue.finish([(rec.lease, Outcome("failed", error=ERR)) for rec in running])
    assert store.queue.purge("q1", {"failed"}) == 2
    assert store.queue.list(queue="q1") == []
    assert store.queue.push([spec(queue="q1", dedup_key="k", id="new")]) == ["new"]
    assert store.queue.purge("q2", []) == 0
    assert store.queue.stats().counts.get("q2") == {"queued": 1}


def test_purged_queued_tasks_are_never_claimed(store):
    store.queue.push([spec(id=f"t{i}") for i in range(5)])
    assert store.queue.purge("default", ["queued"]) == 5
    assert store.queue.claim(["default"], "w", 10) == []
    assert store.queue.stats().total("queued") == 0


def test_purge_refuses_running(store):
    store.queue.push([spec()])
    store.queue.claim(["default"], "w", 1)
    with pytest.raises(ConfigError, match="running"):
        store.queue.purge("default", ["queued", "running"])
    assert store.queue.stats().total("running") == 1
    with pytest.raises(ConfigError, match="bogus"):
        store.queue.purge("default", ["bogus"])


# -- reap and result_ttl ------------------------------------------------------------


def test_reap_deletes_finished_tasks_past_their_result_ttl(timed):
    s = timed.store
    s.queue.push([
        spec(id="short", result_ttl=TTL), spec(id="forever", result_ttl=None),
        spec(id="long", result_ttl=3600.0), spec(id="live", result_ttl=TTL),
        spec(id="cancelled", result_ttl=TTL),
    ])  # fmt: skip
    assert s.queue.get("short").result_ttl == TTL
    assert s.queue.get("forever").result_ttl is None
    assert s.queue.cancel("cancelled") == "cancelled"
    for task_id in ("short", "forever", "long"):
        (rec,) = s.queue.claim(["default"], "w", 1)
        assert rec.id == task_id
        s.queue.finish([(rec.lease, SUCCEEDED)])
    assert s.queue.reap() == 0  # nothing has expired yet
    timed.advance(PAST)
    assert s.queue.reap() == 2
    assert s.queue.get("short") is None and s.queue.state("cancelled") is None
    assert s.queue.state("forever") == "succeeded"
    assert s.queue.state("long") == "succeeded"
    assert s.queue.state("live") == "queued"  # a live task is never reaped
    assert s.queue.reap() == 0
    assert s.queue.stats().counts["default"] == {"succeeded": 2, "queued": 1}


def test_reap_honours_its_limit(timed):
    s = timed.store
    pushed = s.queue.push([spec(result_ttl=TTL) for _ in range(5)])
    for rec in s.queue.claim(["default"], "w", 5):
        s.queue.finish([(rec.lease, Outcome("failed", error=ERR))])
    timed.advance(PAST)
    assert s.queue.reap(limit=2) == 2
    assert s.queue.reap(limit=2) == 2
    assert s.queue.reap(limit=2) == 1
    assert [s.queue.get(i) for i in pushed] == [None] * 5


def test_reap_deletes_expired_kv_entries(timed):
    s = timed.store
    s.kv.put("gone", b"1", ttl=TTL)
    s.kv.incr("gone-too", 1, ttl=TTL)
    s.kv.put("stays", b"2", ttl=3600.0)
    s.kv.put("forever", b"3")
    timed.advance(PAST)
    assert s.kv.reap() == 2
    assert s.kv.reap() == 0
    assert [k for k, _ in s.kv.scan("")] == ["forever", "stays"]
    assert s.kv.cas("gone", None, b"back") is not None  # absent, as expected


def test_retried_task_is_not_reaped_and_its_ttl_counts_from_its_new_finish(timed):
    s = timed.store
    (task_id,) = s.queue.push([spec(result_ttl=TTL, max_attempts=1)])
    run_to(s, task_id, "failed", error=ERR)
    timed.advance(PAST)
    assert s.queue.retry(task_id) == "queued"
    assert s.queue.reap() == 0
    run_to(s, task_id, "succeeded", result=b"x")
    assert s.queue.reap() == 0  # finished just now
    timed.advance(PAST)
    assert s.queue.reap() == 1
    assert s.queue.get(task_id) is None


# -- cancel(terminate=...) ------------------------------------------------------------


def test_cancel_with_terminate_is_reported_on_renew_and_never_downgraded(store):
    a, b = store.queue.push([spec(id="a"), spec(id="b")])
    la, lb = (r.lease for r in store.queue.claim(["default"], "w", 2))
    assert store.queue.cancel(a, terminate=True) == "running"
    assert store.queue.renew([la]) == {a: "terminate_requested"}
    assert store.queue.cancel(a) == "running"  # a plain cancel later keeps terminate
    assert store.queue.renew([la]) == {a: "terminate_requested"}
    assert store.queue.get(a).cancel_requested is True
    assert store.queue.cancel(b) == "running"
    assert store.queue.renew([lb]) == {b: "cancel_requested"}
    assert store.queue.cancel(b, terminate=True) == "running"  # an upgrade is honoured
    assert store.queue.renew([lb]) == {b: "terminate_requested"}
    assert store.queue.finish([(la, Outcome("retry"))]) == [True]
    assert store.queue.state(a) == "cancelled"


def test_cancel_with_terminate_of_queued_task_cancels_it(store):
    (task_id,) = store.queue.push([spec()])
    assert store.queue.cancel(task_id, terminate=True) == "cancelled"
    assert store.queue.claim(["default"], "w", 1) == []


# -- release ---------------------------------------------------------------------------


def test_released_task_has_its_progress_reset(store):
    (task_id,) = store.queue.push([spec(max_attempts=2)])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.progress(rec.lease, 3, 10) is True
    assert store.queue.finish([(rec.lease, Outcome("release"))]) == [True]
    assert store.queue.get(task_id).progress is None
    (again,) = store.queue.claim(["default"], "w", 1)
    assert again.progress is None and again.attempts == 1


# -- thousands of lost leases (issue item 7) -----------------------------------------

LOSSES = 2000


def test_a_task_lost_2000_times_keeps_a_bounded_error_and_maintenance_working(timed):
    s = timed.store
    lease_s = 0.002
    s.queue.push([spec(id="poison", queue="hot", lease_s=lease_s, max_attempts=LOSSES)])
    s.queue.push([spec(id="normal", queue="calm", lease_s=lease_s, max_attempts=3)])
    for i in range(LOSSES):
        (rec,) = s.queue.claim(["hot"], f"w{i}", 1)
        assert rec.lease_expires is not None
        timed.pass_time_until(rec.lease_expires)
        assert s.queue.requeue_expired() == 1, i
    poison = s.queue.get("poison")
    assert (poison.state, poison.lost, poison.attempts) == ("dead", LOSSES, LOSSES)
    assert poison.error["type"] == "WorkerLost"
    assert len(poison.error["history"]) == ERROR_HISTORY_MAX
    assert all("history" not in e for e in poison.error["history"])
    assert len(orjson.dumps(poison.error)) < 4096
    # Maintenance still works for everybody else.
    (rec,) = s.queue.claim(["calm"], "w", 1)
    timed.pass_time_until(rec.lease_expires)
    assert s.queue.requeue_expired() == 1
    assert (s.queue.state("normal"), s.queue.get("normal").lost) == ("queued", 1)
    (rec,) = s.queue.claim(["calm"], "w", 1)
    assert s.queue.finish([(rec.lease, SUCCEEDED)]) == [True]
    assert s.queue.state("normal") == "succeeded"


# -- wait_for_tasks(names=...) -------------------


def test_wait_for_tasks_by_names_ignores_other_names(store):
    store.queue.push([spec("other")])
    start = time.monotonic()
    store.queue.wait_for_tasks(["default"], 0.3, names=["mine"])
    assert time.monotonic() - start >= 0.25  # nothing it may claim: it waited
    store.queue.push([spec("mine")])
    start = time.monotonic()
    store.queue.wait_for_tasks(["default"], 5.0, names=["mine"])
    assert time.monotonic() - start < 1.0
