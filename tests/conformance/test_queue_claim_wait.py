"""QueueStore conformance: claim with a ``wait`` (a wake-up carries the claim)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from taskspace.backends.base import Store
from taskspace.errors import BackendError, ConfigError
from tests.conformance.queue_helpers import push_one, spec


def _later(delay: float, fn: Callable[[], object]) -> threading.Thread:
    """Run ``fn`` in a thread after ``delay`` s (while the caller is blocked in a
    claim: there is no event to await for that); ``_join_ok`` re-raises its error."""
    errors: list[BaseException] = []

    def run() -> None:
        time.sleep(delay)
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by _join_ok
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


def _join_ok(t: threading.Thread) -> None:
    t.join(10)
    assert not t.is_alive()
    assert not t.errors  # type: ignore[attr-defined]


def test_claim_wait_returns_at_once_when_a_task_is_ready(store: Store) -> None:
    task_id = push_one(store, queue="q")
    start = time.monotonic()
    (rec,) = store.queue.claim(["q"], "w", 5, wait=5.0)
    assert time.monotonic() - start < 1.0
    assert (rec.id, rec.state, rec.attempts) == (task_id, "running", 1)


def test_claim_wait_returns_what_another_client_pushes_meanwhile(
    peers: tuple[Store, Store],
) -> None:
    a, b = peers
    b.queue.stats()  # connect
    pushed: list[str] = []
    t = _later(0.2, lambda: pushed.extend(b.queue.push([spec("q")])))
    start = time.monotonic()
    records = a.queue.claim(["q"], "w", 1, wait=5.0)
    elapsed = time.monotonic() - start
    _join_ok(t)
    assert [r.id for r in records] == pushed
    assert records[0].state == "running" and records[0].worker == "w"
    assert 0.1 <= elapsed < 2.5  # it waited for the push, and not its whole wait


def test_claim_wait_with_a_request_id_still_leases_what_comes_during_the_wait(store: Store) -> None:
    pushed: list[str] = []
    t = _later(0.2, lambda: pushed.extend(store.queue.push([spec("q")])))
    records = store.queue.claim(["q"], "w", 1, request_id="req-wait", wait=5.0)
    _join_ok(t)
    assert [r.id for r in records] == pushed


def test_claim_wait_returns_nothing_after_about_its_wait(store: Store) -> None:
    start = time.monotonic()
    assert store.queue.claim(["q"], "w", 1, wait=0.3) == []
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 1.5


def test_claim_wait_claims_a_delayed_task_once_due(store: Store) -> None:
    task_id = push_one(store, queue="q", delay=0.2)
    start = time.monotonic()
    records = store.queue.claim(["q"], "w", 1, wait=5.0)
    assert time.monotonic() - start < 2.5
    assert [r.id for r in records] == [task_id]


def test_claim_wait_ignores_tasks_of_other_names(store: Store) -> None:
    other = push_one(store, queue="q", name="other")
    t = _later(0.1, lambda: store.queue.push([spec("q", name="other")]))
    start = time.monotonic()
    assert store.queue.claim(["q"], "w", 1, names=["mine"], wait=0.4) == []
    assert time.monotonic() - start >= 0.35  # tasks it may not claim never ended the wait
    _join_ok(t)
    assert store.queue.state(other) == "queued"
    mine: list[str] = []
    t = _later(0.1, lambda: mine.extend(store.queue.push([spec("q", name="mine")])))
    records = store.queue.claim(["q"], "w", 5, names=["mine"], wait=5.0)
    _join_ok(t)
    assert [r.id for r in records] == mine
    assert store.queue.stats().counts["q"]["queued"] == 2  # both "other" tasks stay queued


@pytest.mark.parametrize("wait", [-1.0, float("nan"), True])
def test_claim_wait_out_of_range_is_a_config_error(store: Store, wait: object) -> None:
    with pytest.raises(ConfigError):
        store.queue.claim(["q"], "w", 1, wait=wait)  # type: ignore[arg-type]


def test_claim_wait_repeated_after_a_lost_reply_returns_what_it_leased(
    store: Store, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply lost after a wake-up's claim ran: the repeat (same request id,
    even with no wait) returns that task at once, and leases nothing more."""
    if backend != "redis":
        pytest.skip("replies cannot be lost")
    conn = store.conn  # type: ignore[attr-defined]
    real = conn.block_then_run

    def lossy(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise BackendError("the reply was lost")

    monkeypatch.setattr(conn, "block_then_run", lossy)
    pushed: list[str] = []
    t = _later(0.2, lambda: pushed.extend(store.queue.push([spec("q"), spec("q")])))
    with pytest.raises(BackendError):
        store.queue.claim(["q"], "w", 1, request_id="lost", wait=5.0)
    _join_ok(t)
    monkeypatch.undo()
    start = time.monotonic()
    records = store.queue.claim(["q"], "w", 1, request_id="lost")  # even with no wait
    assert time.monotonic() - start < 1.0
    assert [r.id for r in records] == pushed[:1]
    assert store.queue.state(pushed[1]) == "queued"
