"""The task state machine, row by row, on every backend.

Every row of ``outcomes.RUNNING_TRANSITIONS`` is driven through a real store
with and without a cancel request and with attempts left or exhausted, and the
state the store reaches is compared with ``outcomes.running_transition``;
``retry`` and ``cancel`` are applied to a task in every state and compared with
RETRYABLE_STATES and CANCEL_AT_ONCE_STATES. This is the test that fails when a
backend's copy of the rules (the Redis Lua prelude included) drifts.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from taskspace.backends.base import FINAL_STATES, TASK_STATES, Outcome, TaskRecord, TaskSpec
from taskspace.backends.outcomes import (
    CANCEL_AT_ONCE_STATES,
    RETRYABLE_STATES,
    RUNNING_TRANSITIONS,
    running_transition,
)
from tests.conformance.conftest import TTL, TimedStore

ERR = {"type": "ValueError", "message": "boom", "traceback": "tb"}
# Every event the table knows, and how a test makes it happen. A new row
# without a driver here fails test_every_event_has_a_driver.
EVENTS = ["succeeded", "failed", "cancelled", "retry", "release", "expired"]


def test_every_event_has_a_driver():
    assert set(RUNNING_TRANSITIONS) == set(EVENTS)


def _claimed(timed: TimedStore, max_attempts: int, cancel: bool) -> TaskRecord:
    """A fresh task, claimed once (attempt 1 of ``max_attempts``), with a
    cancel request when ``cancel``; alone in its own queue."""
    s = timed.store
    queue = uuid.uuid4().hex
    spec = TaskSpec(uuid.uuid4().hex, "job", b"{}", queue=queue, max_attempts=max_attempts,
                    lease_s=TTL)  # fmt: skip
    s.queue.push([spec])
    (rec,) = s.queue.claim([queue], "w", 1)
    assert rec.attempts == 1
    if cancel:
        assert s.queue.cancel(rec.id) == "running"
        assert s.queue.get(rec.id).cancel_requested is True  # type: ignore[union-attr]
    return rec


def _apply(timed: TimedStore, rec: TaskRecord, event: str) -> None:
    s = timed.store
    if event == "expired":
        assert rec.lease_expires is not None
        timed.pass_time_until(rec.lease_expires)
        assert s.queue.requeue_expired() == 1
        return
    outcome = Outcome(
        event,  # type: ignore[arg-type]
        result=b"r" if event == "succeeded" else None,
        error=ERR if event in ("failed", "retry") else None,
    )
    assert s.queue.finish([(rec.lease, outcome)]) == [True]


@pytest.mark.parametrize("exhausted", [False, True], ids=["attempts-left", "exhausted"])
@pytest.mark.parametrize("cancel", [False, True], ids=["no-cancel", "cancel-requested"])
@pytest.mark.parametrize("event", EVENTS)
def test_running_transition(timed, event, cancel, exhausted):
    s = timed.store
    max_attempts = 1 if exhausted else 2
    rec = _claimed(timed, max_attempts, cancel)
    expected = running_transition(event, cancel, rec.attempts, max_attempts)  # type: ignore[arg-type]
    _apply(timed, rec, event)

    after = s.queue.get(rec.id)
    assert after is not None
    assert after.state == expected, (event, cancel, exhausted)
    assert s.queue.state(rec.id) == expected
    assert (after.finished is not None) == (expected in FINAL_STATES)
    assert after.lease_expires is None
    assert after.lost == (1 if event == "expired" else 0)
    if event == "release" and expected == "queued":
        assert after.attempts == 0  # a release gives the attempt back
    elif event != "release":
        assert after.attempts == 1
    if event in ("failed", "retry"):
        assert after.error == ERR
    if event == "expired":
        assert after.error is not None and after.error["type"] == "WorkerLost"
    if event == "succeeded":
        assert after.result == b"r"
    # the old lease is spent whatever happened
    assert s.queue.renew([rec.lease]) == {rec.id: "lost"}
    claimable = s.queue.claim([rec.queue], "w", 1)
    assert [r.id for r in claimable] == ([rec.id] if expected == "queued" else [])


def _task_in(timed: TimedStore, state: str) -> str:
    """A fresh task in ``state``, alone in its own queue."""
    s = timed.store
    queue = uuid.uuid4().hex
    spec = TaskSpec(uuid.uuid4().hex, "job", b"{}", queue=queue, lease_s=TTL)
    (task_id,) = s.queue.push([spec])
    if state == "queued":
        return task_id
    (rec,) = s.queue.claim([queue], "w", 1)
    if state == "dead":
        assert rec.lease_expires is not None
        timed.pass_time_until(rec.lease_expires)
        assert s.queue.requeue_expired() == 1
    elif state != "running":
        assert s.queue.finish([(rec.lease, Outcome(state, error=ERR))]) == [True]  # type: ignore[arg-type]
    assert s.queue.state(task_id) == state
    return task_id


def _dead_and_others(timed: TimedStore) -> dict[str, str]:
    """One task in every state. The ``dead`` one is made first, while nothing
    else has a lease that time passing could expire."""
    ids = {"dead": _task_in(timed, "dead")}
    for state in TASK_STATES:
        if state != "dead":
            ids[state] = _task_in(timed, state)
    return ids


def test_retry_on_every_state(timed):
    s = timed.store
    ids = _dead_and_others(timed)
    before = {state: s.queue.get(task_id) for state, task_id in ids.items()}
    for state, task_id in ids.items():
        got = s.queue.retry(task_id)
        after = s.queue.get(task_id)
        assert after is not None
        if state in RETRYABLE_STATES:
            assert got == "queued", state
            assert (after.state, after.attempts, after.lost, after.finished) == (
                "queued", 0, 0, None,
            ), state  # fmt: skip
            assert after.error == before[state].error  # type: ignore[union-attr]
            (again,) = s.queue.claim([after.queue], "w", 1)
            assert (again.id, again.attempts) == (task_id, 1)
        else:
            assert got == state
            assert after == before[state], state
    assert s.queue.retry("no-such-task") is None


def test_cancel_on_every_state(timed):
    s = timed.store
    ids = _dead_and_others(timed)
    before = {state: s.queue.get(task_id) for state, task_id in ids.items()}
    for state, task_id in ids.items():
        got = s.queue.cancel(task_id)
        after = s.queue.get(task_id)
        assert after is not None
        if state in CANCEL_AT_ONCE_STATES:
            assert got == "cancelled", state
            assert after.state == "cancelled"
            assert after.finished is not None
            assert s.queue.claim([after.queue], "w", 1) == []
        elif state == "running":
            assert got == "running"
            expected = replace(before[state], cancel_requested=True)  # type: ignore[type-var]
            assert after == expected
        else:
            assert got == state
            assert after == before[state], state
    assert s.queue.cancel("no-such-task") is None
