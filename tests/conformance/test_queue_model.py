"""QueueStore against a reference model: random sequences of push, claim, renew,
progress, finish (with current and stale leases) and cancel must leave every
task exactly where the contract says, on every backend.

Time does not move here (leases are long); expiry is covered in test_queue.py
and test_transitions.py.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from taskspace.backends import open_store
from taskspace.backends.base import (
    FINAL_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Lease,
    Outcome,
    TaskSpec,
)
from tests.conftest import backend_url

QUEUES = ["q0", "q1"]
KINDS = ["succeeded", "failed", "retry", "cancelled", "release"]
# The whole bounded range: its extremes and their neighbours often (so ties, and
# hence FIFO within a priority, are common there), anything in between sometimes.
EDGES = [PRIORITY_MIN, PRIORITY_MIN + 1, -1, 0, 1, PRIORITY_MAX - 1, PRIORITY_MAX]
PRIORITIES = st.one_of(st.sampled_from(EDGES), st.integers(PRIORITY_MIN, PRIORITY_MAX))


@dataclass
class Model:
    queue: str
    priority: int
    max_attempts: int
    dedup_key: str | None
    seq: int  # submission order
    state: str = "queued"
    attempts: int = 0
    token: int = 0
    old_tokens: list[int] = field(default_factory=list)
    accepted_token: int = 0  # token of the last accepted finish, until the next claim
    cancel_requested: bool = False
    fresh: bool = True  # never claimed: FIFO among these is exact on every backend


def _expected_state(task: Model, kind: str) -> str:
    if kind in ("succeeded", "failed", "cancelled"):
        return kind
    if task.cancel_requested:
        return "cancelled"
    if kind == "release":
        return "queued"
    return "queued" if task.attempts < task.max_attempts else "failed"


def _url(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return "memory://"
    return backend_url(backend, tmp_path / uuid.uuid4().hex)


class QueueMachine(RuleBasedStateMachine):
    def url(self) -> str:
        raise NotImplementedError  # the test supplies a fresh store URL per backend

    def __init__(self) -> None:
        super().__init__()
        self.store = open_store(self.url())
        self.tasks: dict[str, Model] = {}
        self.stale = 0
        self.pushed = 0  # task ids are deterministic, so draws replay exactly

    def teardown(self) -> None:
        self.store.close()

    def _live_with(self, key: str | None) -> str | None:
        for task_id, t in self.tasks.items():
            if key is not None and t.dedup_key == key and t.state in ("queued", "running"):
                return task_id
        return None

    @rule(
        specs=st.lists(
            st.tuples(
                st.sampled_from(QUEUES),
                PRIORITIES,
                st.integers(1, 3),
                st.sampled_from([None, None, "k1", "k2"]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def push(self, specs):
        self.pushed += len(specs)
        first = self.pushed - len(specs)
        batch = [
            TaskSpec(f"t{first + i}", "job", b"{}", queue=q, priority=p, max_attempts=m,
                     dedup_key=k, lease_s=300.0)
            for i, (q, p, m, k) in enumerate(specs)
        ]  # fmt: skip
        ids = self.store.queue.push(batch)
        for s, got in zip(batch, ids, strict=True):
            live = self._live_with(s.dedup_key)
            if live is not None:
                assert got == live
            else:
                assert got == s.id
                seq = len(self.tasks)
                self.tasks[s.id] = Model(s.queue, s.priority, s.max_attempts, s.dedup_key, seq)

    @rule(queues=st.permutations(QUEUES).flatmap(lambda p: st.sampled_from([p, p[:1]])),
          n=st.integers(1, 4))  # fmt: skip
    def claim(self, queues, n):
        queued = [t for t in self.tasks.values() if t.state == "queued" and t.queue in queues]
        expected = sorted((queues.index(t.queue), -t.priority) for t in queued)[:n]
        records = self.store.queue.claim(list(queues), "w", n)
        assert [(queues.index(r.queue), -r.priority) for r in records] == expected
        assert len({r.id for r in records}) == len(records)
        self._check_fifo(records)
        for r in records:
            t = self.tasks[r.id]
            assert t.state == "queued"
            assert r.token > t.token
            if t.token:
                t.old_tokens.append(t.token)
            t.state, t.attempts, t.token = "running", t.attempts + 1, r.token
            t.accepted_token = 0
            assert r.attempts == t.attempts

    def _check_fifo(self, records) -> None:
        """Within a queue and priority, no fresh task was passed over for a later one."""
        got = {r.id for r in records}
        for r in records:
            t = self.tasks[r.id]
            if not t.fresh:
                continue  # a requeued task's place among equals is backend-defined
            skipped = [
                task_id
                for task_id, o in self.tasks.items()
                if o.fresh and o.state == "queued" and task_id not in got
                and (o.queue, o.priority) == (t.queue, t.priority) and o.seq < t.seq
            ]  # fmt: skip
            assert not skipped, (r.id, skipped)
        for r in records:
            self.tasks[r.id].fresh = False

    def _lease(self, data) -> tuple[str, Lease, bool]:
        task_id = data.draw(st.sampled_from(list(self.tasks)))
        t = self.tasks[task_id]
        choices = [*t.old_tokens, t.token, t.token + 1]
        token = data.draw(st.sampled_from(choices))
        current = t.state == "running" and token == t.token
        return task_id, Lease(task_id, token), current

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), kind=st.sampled_from(KINDS), error=st.booleans())
    def finish(self, data, kind, error):
        task_id, lease, current = self._lease(data)
        err = {"type": "E", "message": "m", "traceback": ""} if error else None
        result = b"r" if kind == "succeeded" else None
        accepted = self.store.queue.finish([(lease, Outcome(kind, result=result, error=err))])
        t = self.tasks[task_id]
        # a finish repeating the accepted token is a retry: True, no effect, not stale
        retried = not current and t.accepted_token != 0 and lease.token == t.accepted_token
        assert accepted == [current or retried]
        if retried:
            return
        if not current:
            self.stale += 1
            return
        t.accepted_token = lease.token
        t.state = _expected_state(t, kind)
        if kind == "release" and t.state == "queued":
            t.attempts -= 1

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def renew(self, data):
        task_id, lease, current = self._lease(data)
        t = self.tasks[task_id]
        expected = ("cancel_requested" if t.cancel_requested else "held") if current else "lost"
        assert self.store.queue.renew([lease]) == {task_id: expected}

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def progress(self, data):
        _, lease, current = self._lease(data)
        assert self.store.queue.progress(lease, 1, 2) is current

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def cancel(self, data):
        task_id = data.draw(st.sampled_from(list(self.tasks)))
        t = self.tasks[task_id]
        if t.state == "queued":
            t.state = "cancelled"
        elif t.state == "running":
            t.cancel_requested = True
        assert self.store.queue.cancel(task_id) == t.state

    @invariant()
    def matches(self):
        for task_id, t in self.tasks.items():
            rec = self.store.queue.get(task_id)
            assert rec is not None
            assert (rec.state, rec.attempts, rec.cancel_requested) == (
                t.state, t.attempts, t.cancel_requested,
            ), task_id  # fmt: skip
            assert (rec.finished is not None) == (t.state in FINAL_STATES)
        stats = self.store.queue.stats()
        assert stats.stale_finishes == self.stale
        for q in QUEUES:
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                n = sum(1 for t in self.tasks.values() if t.queue == q and t.state == state)
                assert stats.counts.get(q, {}).get(state, 0) == n, (q, state)


def test_queue_matches_reference_model(backend, tmp_path):
    class Machine(QueueMachine):
        def url(self) -> str:
            return _url(backend, tmp_path)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
