"""Storage stays bounded: finished tasks past their result_ttl and expired KV
entries are reaped, and the footprint stops growing from round to round."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from taskspace import Space, Worker, WorkerConfig
from tests.services import RedisServer

ROUNDS = 4
TASKS = 1500
TTL = 0.3


def _reap_all(space: Space) -> int:
    """Reap every finished task past its result_ttl and every expired KV key."""
    total = 0
    for reap in (space.store.queue.reap, space.store.kv.reap):
        while n := reap(1000):
            total += n
    return total


# What the contract keeps on purpose for a bounded while, whatever the reaping:
# the KV change feed (its newest KV_CHANGES_KEEP changes) and claim/KV request
# ids (REQUEST_ID_TTL_S, 10 minutes). Rounds of a few seconds never reach those
# bounds, so each measure drops them first (white box), as their bounds will:
# what is left must stop growing.
# Bounded by retentions of their own, tested where they are made: the KV change
# feed and request ids (tests/conformance), the task events and log streams
# (length and age; tests/observability/test_events.py and test_logs.py).
SQLITE_KEPT_TABLES = ("kv_changes", "request_ids", "stream_entries")
REDIS_KEPT_KEYS = ("kvlog", "kvreq", "kvreqexp", "claimreq", "claimreqexp",
                   "s:taskspace/events", "s:taskspace/logs", "sreq", "sreqexp")  # fmt: skip


def _sqlite_footprint(path: Path) -> Callable[[], int]:
    def measure() -> int:
        with sqlite3.connect(path) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            for table in tables.intersection(SQLITE_KEPT_TABLES):
                conn.execute(f"DELETE FROM {table}")
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            rows = conn.execute("SELECT (SELECT COUNT(*) FROM tasks) + (SELECT COUNT(*) FROM kv)")
            assert rows.fetchone()[0] <= 64  # only what is still live (worker registry)
        return path.stat().st_size

    return measure


def _redis_footprint(space: Space) -> Callable[[], int]:
    conn = space.store.conn  # type: ignore[attr-defined]
    client = conn.client

    def measure() -> int:
        client.delete(*(conn.prefix + key for key in REDIS_KEPT_KEYS))
        keys = client.dbsize()
        assert keys <= 64, keys
        return int(client.info("memory")["used_memory"])

    return measure


def _rounds(space: Space, measure: Callable[[], int]) -> list[int]:
    space.task(name="noop", result_ttl=TTL)(lambda i: i)
    noop = space.get_task("noop")
    sizes = []
    for r in range(ROUNDS):
        noop.submit_many([(i,) for i in range(TASKS)])
        for i in range(200):
            space.store.kv.put(f"cache/{r}/{i}", b"x" * 100, ttl=TTL)
        space.run_worker(burst=True, concurrency=16, install_signal_handlers=False)
        time.sleep(TTL + 0.1)
        _reap_all(space)
        # Every finished task and every expired key is gone (an expiry may also be
        # recorded by a write or by the worker's maintenance: not only by this reap).
        assert space.stats().total("succeeded") == 0
        assert space.store.kv.scan("cache/") == []
        sizes.append(measure())
    return sizes


def test_sqlite_footprint_stops_growing(tmp_path: Path) -> None:
    path = tmp_path / "space.db"
    space = Space(f"sqlite:///{path}")
    sizes = _rounds(space, _sqlite_footprint(path))
    # Free pages are reused: later rounds fit in what the first one allocated.
    assert sizes[-1] <= sizes[0] * 1.1, sizes


def test_redis_footprint_stops_growing() -> None:
    server = RedisServer().start()
    try:
        space = Space(server.namespaced_url())
        sizes = _rounds(space, _redis_footprint(space))
        assert sizes[-1] <= sizes[0] * 1.1 + 200_000, sizes
    finally:
        server.close()


def test_result_ttl_none_keeps_forever(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db", result_ttl=0.1)
    kept = space.task(name="kept", result_ttl=None)(lambda: 1)
    dropped = space.task(name="dropped")(lambda: 2)
    h_kept, h_dropped = kept.submit(), dropped.submit()
    space.run_worker(burst=True, install_signal_handlers=False)
    time.sleep(0.2)
    _reap_all(space)
    assert h_kept.result(timeout=1) == 1
    assert space.store.queue.state(h_dropped.id) is None


def test_worker_maintenance_reaps_expired_results(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db", result_ttl=0.2)
    noop = space.task(name="noop")(lambda i: i)
    handles = noop.submit_many([(i,) for i in range(50)])
    config = WorkerConfig(maintenance_interval=0.05, install_signal_handlers=False)
    worker = Worker(space, config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while any(space.store.queue.state(h.id) is not None for h in handles):
            assert time.monotonic() < deadline, "finished tasks were never reaped"
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(timeout=10)
    assert worker.report.succeeded == 50
