"""QueueStore conformance: waiting for tasks and finishes, and concurrent claims."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from tests.conformance.queue_helpers import (
    SUCCEEDED,
    claim_one,
    push_one,
    spec,
)

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
