"""KVStore against a reference model: random puts, cas, deletes, incr, touch,
txns (fenced by a lease grant too) and time moving on a ManualClock must leave
every key, and every key's history in the change feed (puts, deletes,
expiries), exactly where the model says; revisions only grow and the writes of
one txn share one.

Runs where time can be injected (memory, SQLite); Redis runs the same rules
through test_kv.py and test_kv_txn.py on real time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from taskspace.backends import open_store
from taskspace.backends.base import (
    Compare,
    Delete,
    Exists,
    Grant,
    GrantHeld,
    Put,
    ValueIs,
    Versioned,
    VersionIs,
)
from taskspace.backends.memory import ManualClock
from taskspace.errors import NotAnInteger
from tests.conformance.conftest import CAPABILITIES, manual_url

KEYS = st.sampled_from(["a", "b", "c/1"])
VALUES = st.sampled_from([b"1", b"-7", b"x", b""])
# TTLs end on .5 and time moves by whole seconds: no key expires exactly "now".
TTLS = st.sampled_from([None, None, 0.5, 2.5])
STEPS = st.sampled_from([1.0, 2.0])


@dataclass
class Key:
    value: bytes | None = None  # None: absent
    version: int = 0
    expires: float | None = None
    old_versions: list[int] = field(default_factory=list)
    history: list[tuple[str, int, bytes | None]] = field(default_factory=list)


def _is_int(value: bytes) -> bool:
    try:
        int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return value.strip() == value and b"_" not in value


class KVMachine(RuleBasedStateMachine):
    def url(self) -> str:
        raise NotImplementedError  # the test supplies a fresh store URL per backend

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = open_store(self.url(), clock=self.clock)
        self.keys: dict[str, Key] = defaultdict(Key)
        self.revision = 0  # highest revision seen
        self.grants: list[Grant] = []  # of the lease "fence": the last may be current
        self.released = False

    def teardown(self) -> None:
        self.store.close()

    # -- the model ----------------------------------------------------------------------

    def _expire_due(self) -> None:
        now = self.clock.now()
        for k in self.keys.values():
            if k.value is not None and k.expires is not None and k.expires <= now:
                k.history.append(("expire", k.version, None))
                k.old_versions.append(k.version)
                k.value, k.expires = None, None

    def _in(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.clock.now() + ttl

    def _wrote(self, key: str, w: Versioned, expires: float | None) -> None:
        assert w.version == w.revision > self.revision
        self.revision = w.revision
        k = self.keys[key]
        if k.value is not None:
            k.old_versions.append(k.version)
        k.value, k.version, k.expires = w.value, w.version, expires
        assert w.expires == expires
        k.history.append(("put", w.version, w.value))

    def _deleted(self, key: str) -> None:
        k = self.keys[key]
        k.history.append(("delete", k.version, None))
        k.old_versions.append(k.version)
        k.value, k.expires = None, None

    def _version_choice(self, key: str) -> st.SearchStrategy[int | None]:
        k = self.keys[key]
        choices: list[int | None] = [None, *k.old_versions[-2:], k.version + 1]
        if k.value is not None:
            choices += [k.version, k.version]
        return st.sampled_from(choices)

    # -- rules ------------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        self._expire_due()
        self._wrote(key, self.store.kv.put(key, value, ttl), self._in(ttl))

    @rule(key=KEYS, value=VALUES, ttl=TTLS, data=st.data())
    def cas(self, key: str, value: bytes, ttl: float | None, data: st.DataObject) -> None:
        self._expire_due()
        expected = data.draw(self._version_choice(key))
        k = self.keys[key]
        live = k.version if k.value is not None else None
        got = self.store.kv.cas(key, expected, value, ttl)
        if expected != live:
            assert got is None
        else:
            assert got is not None and got.value == value
            self._wrote(key, got, self._in(ttl))

    @rule(key=KEYS, data=st.data())
    def delete(self, key: str, data: st.DataObject) -> None:
        self._expire_due()
        expected = data.draw(self._version_choice(key))
        k = self.keys[key]
        ok = k.value is not None and expected in (None, k.version)
        assert self.store.kv.delete(key, expected) is ok
        if ok:
            self._deleted(key)

    @rule(key=KEYS, delta=st.integers(-3, 3), ttl=TTLS)
    def incr(self, key: str, delta: int, ttl: float | None) -> None:
        self._expire_due()
        k = self.keys[key]
        if k.value is not None and not _is_int(k.value):
            with pytest.raises(NotAnInteger):
                self.store.kv.incr(key, delta, ttl)
            return
        created = k.value is None
        result = self.store.kv.incr(key, delta, ttl)
        assert result == (0 if created else int(k.value)) + delta  # type: ignore[arg-type]
        w = self.store.kv.get(key)
        assert w is not None and w.value == b"%d" % result
        # ttl applies only when the key is created
        self._wrote(key, w, self._in(ttl) if created else k.expires)

    @rule(key=KEYS, ttl=TTLS)
    def touch(self, key: str, ttl: float | None) -> None:
        self._expire_due()
        k = self.keys[key]
        got = self.store.kv.touch(key, ttl)
        if k.value is None:
            assert got is None
            return
        k.expires = self._in(ttl)
        assert got == Versioned(k.value, k.version, k.version, k.expires)

    @rule(ttl=st.sampled_from([1.5, 3.5]))
    def lease_acquire(self, ttl: float) -> None:
        got = self.store.leases.acquire("fence", "me", ttl)
        assert (got is None) is (self._grant_held() is not None)
        if got is not None:
            self.grants.append(got)
            self.released = False

    @rule()
    def lease_release(self) -> None:
        current = self._grant_held()
        if self.grants:
            assert self.store.leases.release(self.grants[-1]) is (current is not None)
        self.released = True

    def _grant_held(self) -> Grant | None:
        if not self.grants or self.released or self.grants[-1].expires <= self.clock.now():
            return None
        return self.grants[-1]

    @rule(data=st.data())
    def txn(self, data: st.DataObject) -> None:
        self._expire_due()
        compares: list[Compare] = []
        if self.grants and data.draw(st.booleans()):
            compares.append(GrantHeld(data.draw(st.sampled_from(self.grants[-2:]))))
        for key in data.draw(st.lists(KEYS, max_size=2)):
            k = self.keys[key]
            kind = data.draw(st.sampled_from(["version", "value", "exists"]))
            if kind == "version":
                compares.append(VersionIs(key, data.draw(self._version_choice(key))))
            elif kind == "value":
                vals = [v for v in (k.value, b"1", b"x") if v is not None]
                compares.append(ValueIs(key, data.draw(st.sampled_from(vals))))
            else:
                compares.append(Exists(key, data.draw(st.booleans())))
        write_keys = data.draw(st.lists(KEYS, max_size=3, unique=True))
        writes: list[Put | Delete] = []
        for key in write_keys:
            if data.draw(st.booleans()):
                writes.append(Put(key, data.draw(VALUES), data.draw(TTLS)))
            else:
                writes.append(Delete(key))

        failed = next((i for i, c in enumerate(compares) if not self._holds(c)), None)
        r = self.store.kv.txn(compares, writes)
        assert r.ok is (failed is None)
        assert r.failed == failed
        if failed is not None:
            assert r.versions == ()
            return
        puts = [w for w in writes if isinstance(w, Put)]
        assert r.versions == tuple(r.revision for _ in puts)
        changed = False
        for w in writes:
            if isinstance(w, Put):
                expires = self._in(w.ttl)
                self._wrote(w.key, Versioned(w.value, r.revision, r.revision, expires), expires)
                changed = True
                self.revision = r.revision - 1  # every put of the txn shares it
            elif self.keys[w.key].value is not None:
                self._deleted(w.key)
                changed = True
        if changed:
            assert r.revision > self.revision
            self.revision = r.revision

    def _holds(self, c: Compare) -> bool:
        if isinstance(c, GrantHeld):
            return c.grant == self._grant_held()
        k = self.keys[c.key]
        if isinstance(c, VersionIs):
            return c.version == (k.version if k.value is not None else None)
        if isinstance(c, ValueIs):
            return k.value == c.value
        return (k.value is not None) is c.exists

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def reap(self) -> None:
        assert self.store.kv.reap() >= 0

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def keys_match(self) -> None:
        self._expire_due()
        names = sorted(self.keys)
        got = self.store.kv.get_many(names)
        for name, w in zip(names, got, strict=True):
            k = self.keys[name]
            if k.value is None:
                assert w is None, name
            else:
                assert w == Versioned(k.value, k.version, k.version, k.expires), name
        live = sorted(n for n in names if self.keys[n].value is not None)
        assert [n for n, _ in self.store.kv.scan("")] == live

    @invariant()
    def feed_matches(self) -> None:
        self._expire_due()
        changes = self.store.kv.changes("", 0, limit=10_000)
        revisions = [c.revision for c in changes]
        assert revisions == sorted(revisions)
        history: dict[str, list[tuple[str, int, bytes | None]]] = defaultdict(list)
        for c in changes:
            history[c.key].append((c.kind, c.version, c.value))
            if c.kind == "put":
                assert c.version == c.revision
        for name, k in self.keys.items():
            assert history.get(name, []) == k.history, name
        if changes:
            # (an accepted txn that changed nothing may or may not take a revision)
            assert self.store.kv.revision() >= revisions[-1]
            self.revision = max(self.revision, revisions[-1])
        assert [c for c in changes if c.key.startswith("c/")] == self.store.kv.changes(
            "c/", 0, limit=10_000
        )


@pytest.mark.parametrize("kind", [b for b, c in CAPABILITIES.items() if c.manual_time])
def test_kv_matches_reference_model(kind: str, tmp_path: Path) -> None:
    class Machine(KVMachine):
        def url(self) -> str:
            return manual_url(kind, tmp_path)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
