"""SQLite specifics: the reboot-safe clock, durability settings, many processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

from taskspace.backends import open_store
from taskspace.backends.base import TaskSpec
from taskspace.backends.sqlite import SQLiteStore


def spec(task_id: str, lease_s: float = 600.0) -> TaskSpec:
    return TaskSpec(id=task_id, name="t", payload=b"[[]]", lease_s=lease_s, max_attempts=3)


def test_reboot_expires_every_lease_and_clock_moves_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    store.push([spec("a")])
    (claimed,) = store.claim(["default"], "w", 1)
    grant = store.acquire("lock", "holder", 1, ttl=600)
    assert grant is not None
    before = store.now()
    store.close()
    # Simulate a reboot: the file says it was last opened under another boot id.
    with sqlite3.connect(tmp_path / "s.db") as db:
        db.execute("UPDATE meta SET value = 'some-other-boot' WHERE key = 'boot'")
    store = open_store(url)
    assert store.now() > claimed.lease_expires  # type: ignore[operator]
    assert store.now() >= before
    assert store.holders("lock") == []
    assert store.requeue_expired() == 1
    record = store.get("a")
    assert record is not None and record.state == "queued" and record.lost == 1
    (again,) = store.claim(["default"], "w2", 1)
    assert again.token > claimed.token
    store.close()


def test_synchronous_setting_applies(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db?synchronous=full")
    assert isinstance(store, SQLiteStore)
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()


def _claim_all(url: str, worker: str, out: multiprocessing.Queue[list[str]]) -> None:
    store = open_store(url)
    got: list[str] = []
    while batch := store.claim(["default"], worker, 7):
        got.extend(r.id for r in batch)
    out.put(got)
    store.close()


def test_processes_claiming_concurrently_never_share_a_task(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    store.push([spec(f"t{i}") for i in range(2000)])
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, f"w{i}", out)) for i in range(4)]
    for proc in procs:
        proc.start()
    claimed = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    ids = [task_id for batch in claimed for task_id in batch]
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    assert store.stats().counts["default"] == {"running": 2000}
    store.close()
