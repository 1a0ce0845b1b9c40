"""Bad arguments read the same on every backend: ConfigError before anything
is written (the checks of ``taskspace.backends.checks``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from taskspace.backends.base import MAX_DURATION_S, Store
from taskspace.errors import ConfigError

TOO_LONG = MAX_DURATION_S * 2

# (what, call): each call must raise ConfigError and change nothing.
BAD_CALLS: list[tuple[str, Callable[[Store], object]]] = [
    ("queue.reap(0)", lambda s: s.queue.reap(0)),
    ("queue.reap(-1)", lambda s: s.queue.reap(-1)),
    ("kv.reap(0)", lambda s: s.kv.reap(0)),
    ("kv.reap(-5)", lambda s: s.kv.reap(-5)),
    ("streams.append('')", lambda s: s.streams.append("", b"x")),
    ("streams.append_many('')", lambda s: s.streams.append_many("", [b"x"])),
    ("streams.read('')", lambda s: s.streams.read("")),
    ("streams.trim('')", lambda s: s.streams.trim("", maxlen=1)),
    ("streams.read(limit=0)", lambda s: s.streams.read("st", limit=0)),
    ("streams.read(wait=-1)", lambda s: s.streams.read("st", wait=-1.0)),
    ("streams.read(wait=nan)", lambda s: s.streams.read("st", wait=float("nan"))),
    ("streams.read(wait=too long)", lambda s: s.streams.read("st", wait=TOO_LONG)),
    ("streams.read(wait=True)", lambda s: s.streams.read("st", wait=True)),
    ("streams.trim(max_age=-1)", lambda s: s.streams.trim("st", max_age=-1.0)),
    ("streams.trim(max_age=nan)", lambda s: s.streams.trim("st", max_age=float("nan"))),
    ("streams.trim(max_age=too long)", lambda s: s.streams.trim("st", max_age=TOO_LONG)),
    ("streams.trim(maxlen=0)", lambda s: s.streams.trim("st", maxlen=0)),
    ("leases.acquire('')", lambda s: s.leases.acquire("", "h", 5.0)),
    ("leases.acquire(grant_id='')", lambda s: s.leases.acquire("L", "h", 5.0, grant_id="")),
    ("leases.acquire(ttl=too long)", lambda s: s.leases.acquire("L", "h", TOO_LONG)),
    ("kv.put(ttl=too long)", lambda s: s.kv.put("k", b"v", ttl=TOO_LONG)),
]


@pytest.mark.parametrize(("what", "call"), BAD_CALLS, ids=[what for what, _ in BAD_CALLS])
def test_a_bad_argument_is_a_config_error_and_writes_nothing(
    store: Store, what: str, call: Callable[[Store], object]
) -> None:
    store.streams.append("st", b"kept")
    store.kv.put("kept", b"v")
    revision = store.kv.revision()
    with pytest.raises(ConfigError):
        call(store)
    assert [e.data for e in store.streams.read("st")] == [b"kept"]
    assert store.kv.revision() == revision
    assert store.leases.holders("L") == []


def test_edge_values_that_are_allowed(store: Store) -> None:
    # wait=0 (no wait) and a max_age of ten years are valid
    store.streams.append("st", b"x")
    assert [e.data for e in store.streams.read("st", wait=0)] == [b"x"]
    assert store.streams.trim("st", max_age=MAX_DURATION_S) == 0
    assert [e.data for e in store.streams.read("st")] == [b"x"]
    assert store.queue.reap(1) == 0
    assert store.kv.reap(1) == 0
