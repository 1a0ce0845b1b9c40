"""Store shape conformance: one object per protocol, the space identity, the
two clocks."""

from __future__ import annotations

import time

PROTOCOLS = ("queue", "leases", "kv", "streams", "pubsub", "clock")
# Verbs of v1 that lived on the store itself; v2 keeps them on the protocol objects.
OLD_VERBS = ("push", "claim", "finish", "acquire", "renew_grant", "kv_get", "kv_put",
             "append", "read", "publish", "subscribe", "now")  # fmt: skip


def test_one_object_per_protocol(store):
    objects = [getattr(store, name) for name in PROTOCOLS]
    assert all(o is not None and o is not store for o in objects)
    assert len({id(o) for o in objects}) == len(PROTOCOLS)
    assert all(getattr(store, name) is o for name, o in zip(PROTOCOLS, objects, strict=True))
    for verb in OLD_VERBS:
        assert not hasattr(store, verb), verb


def test_space_identity(peers):
    a, b = peers
    assert isinstance(a.space_id, str) and a.space_id
    assert a.space_id == b.space_id  # two clients of one space
    a.check_space()
    b.check_space()
    assert isinstance(a.url, str) and a.url


def test_fresh_spaces_have_distinct_identities(store, backend, tmp_path):
    from taskspace.backends import open_store
    from tests.conftest import backend_url

    other = open_store(backend_url(backend, tmp_path / "other"))
    try:
        assert other.space_id != store.space_id
    finally:
        other.close()


def test_clocks(store):
    assert abs(store.clock.wall() - time.time()) < 1.0
    readings = [store.clock.now() for _ in range(100)]
    assert readings == sorted(readings)
    start, t0 = store.clock.now(), time.monotonic()
    time.sleep(0.05)
    moved, took = store.clock.now() - start, time.monotonic() - t0
    assert 0.03 <= moved <= took + 0.05  # seconds, moving with real time
