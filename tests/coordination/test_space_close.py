"""Space.close() gives up what the Space holds in the background: its leases are
released (like a ZooKeeper session that closes) and their threads stop, so a
closed Space never reopens its store behind the caller's back."""

from __future__ import annotations

import time
from pathlib import Path

from taskspace import Space
from tests.conftest import backend_url


def test_close_releases_held_locks_and_stops_renewing(backend: str, tmp_path: Path) -> None:
    url = backend_url(backend, tmp_path)
    if backend == "memory":
        url = "memory://close-test"  # a named store outlives the Space
    space = Space(url)
    lease = space.lock("gpu-0", ttl=5).acquire(wait=0)
    assert lease is not None and lease.held
    keeper = space._facades["lease_keeper"]
    space.close()
    assert space._store is None
    for thread in keeper._threads.values():
        thread.join(timeout=2)
        assert not thread.is_alive(), f"{thread.name} still runs after close"
    time.sleep(0.1)
    assert space._store is None, "a renewal reopened the closed Space's store"
    other = Space(url)
    try:
        again = other.lock("gpu-0", ttl=5).acquire(wait=0)
        assert again is not None, "the closed Space still held the lock"
        assert again.token > lease.token
        again.release()
    finally:
        other.close()
