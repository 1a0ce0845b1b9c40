"""LeaseStore against a reference model: random acquires (fresh and retried
grant ids), renewals, releases and time moving on a ManualClock must leave
exactly the live grants the model predicts; never more than ``capacity`` live
grants, and every new grant's token above every earlier token.

Runs where time can be injected (memory, SQLite); Redis runs the same rules
through test_leases.py on real time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
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
from taskspace.backends.base import Grant
from taskspace.backends.memory import ManualClock
from tests.conformance.conftest import CAPABILITIES, manual_url

NAMES = {"mutex": 1, "pool": 2}
# TTLs end on .5 and time moves by whole seconds, so no grant ever expires
# exactly "now" (the one instant where backends may round differently).
TTLS = st.sampled_from([0.5, 1.5, 3.5])
STEPS = st.sampled_from([1.0, 2.0])


@dataclass
class Model:
    grant: Grant
    released: bool = False


class LeaseMachine(RuleBasedStateMachine):
    def url(self) -> str:
        raise NotImplementedError  # the test supplies a fresh store URL per backend

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = open_store(self.url(), clock=self.clock)
        self.grants: list[Model] = []
        self.max_token = 0
        self.count = 0

    def teardown(self) -> None:
        self.store.close()

    def _live(self, name: str | None = None) -> list[Model]:
        now = self.clock.now()
        return [
            m
            for m in self.grants
            if not m.released and m.grant.expires > now and name in (None, m.grant.name)
        ]

    def _current(self, grant: Grant) -> Model | None:
        for m in self._live():
            if m.grant.id == grant.id and m.grant.token == grant.token:
                return m
        return None

    @rule(name=st.sampled_from(sorted(NAMES)), ttl=TTLS, data=st.binary(max_size=4))
    def acquire(self, name: str, ttl: float, data: bytes) -> None:
        self.count += 1
        grant_id = f"g{self.count}"
        got = self.store.leases.acquire(
            name, f"h{self.count % 2}", ttl, NAMES[name], data, grant_id
        )
        if len(self._live(name)) >= NAMES[name]:
            assert got is None
            return
        assert got is not None
        assert (got.name, got.id, got.data) == (name, grant_id, data)
        assert got.expires == self.clock.now() + ttl
        assert got.token > self.max_token
        self.max_token = got.token
        self.grants.append(Model(got))

    @precondition(lambda self: self.grants)
    @rule(data=st.data(), ttl=TTLS)
    def acquire_again(self, data: st.DataObject, ttl: float) -> None:
        """A retry with a grant id used before: the live grant unchanged, or
        (once that grant is gone) a fresh one if a slot is free."""
        m = data.draw(st.sampled_from(self.grants))
        g = m.grant
        got = self.store.leases.acquire(g.name, g.holder, ttl, NAMES[g.name], g.data, g.id)
        current = self._live(g.name)
        same = [c for c in current if c.grant.id == g.id]
        if same:
            assert got == same[0].grant
        elif len(current) >= NAMES[g.name]:
            assert got is None
        else:
            assert got is not None and got.id == g.id and got.token > self.max_token
            self.max_token = got.token
            self.grants.append(Model(got))

    @precondition(lambda self: self.grants)
    @rule(data=st.data(), ttl=TTLS)
    def renew(self, data: st.DataObject, ttl: float) -> None:
        picked = data.draw(st.lists(st.sampled_from(self.grants), min_size=1, max_size=3))
        got = self.store.leases.renew([m.grant for m in picked], ttl)
        assert len(got) == len(picked)
        for m, new in zip(picked, got, strict=True):
            current = self._current(m.grant)
            if current is None:
                assert new is None
                continue
            assert new is not None
            assert (new.id, new.token, new.data) == (m.grant.id, m.grant.token, m.grant.data)
            assert new.expires == self.clock.now() + ttl
            current.grant = new

    @precondition(lambda self: self.grants)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(self.grants))
        current = self._current(m.grant)
        assert self.store.leases.release(m.grant) is (current is not None)
        if current is not None:
            current.released = True

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def holders_match(self) -> None:
        for name, capacity in NAMES.items():
            live = sorted((m.grant for m in self._live(name)), key=lambda g: g.token)
            assert len(live) <= capacity
            assert self.store.leases.holders(name) == live


@pytest.mark.parametrize("kind", [b for b, c in CAPABILITIES.items() if c.manual_time])
def test_leases_match_reference_model(kind: str, tmp_path: Path) -> None:
    class Machine(LeaseMachine):
        def url(self) -> str:
            return manual_url(kind, tmp_path)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
