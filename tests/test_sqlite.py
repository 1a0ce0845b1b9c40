"""SQLite specifics: the reboot-safe clock, durability settings, many processes,
flat claims behind delayed tasks, driver faults, bounded storage, opening a
space without creating it."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskspace.backends import open_store
from taskspace.backends.base import Gap, Message, Outcome, TaskSpec
from taskspace.backends.sqlite import SQLiteStore, boot_id
from taskspace.backends.sqlite.schema import SCHEMA_VERSION
from taskspace.errors import BackendError, ConfigError, SpaceLost, SpaceNotFound

DAY = 24 * 3600.0
SUCCEEDED = Outcome("succeeded", result=b"1")


def spec(task_id: str, lease_s: float = 600.0, **kw: Any) -> TaskSpec:
    return TaskSpec(id=task_id, name="t", payload=b"[[]]", lease_s=lease_s, max_attempts=3, **kw)


def sqlite_store(url: str) -> SQLiteStore:
    store = open_store(url)
    assert isinstance(store, SQLiteStore)
    return store


def simulate_reboot(path: Path) -> None:
    """Make the file look last opened under another boot, with a stale clock offset
    (after a real reboot CLOCK_MONOTONIC restarts near zero, so the old offset is
    meaningless)."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'some-other-boot' WHERE key = 'boot'")
        db.execute("UPDATE meta SET value = -1e9 WHERE key = 'offset'")


# -- the clock across a reboot (issue item 2) ----------------------------------------


def test_reboot_keeps_delays_and_ttls_and_expires_every_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    store.queue.push([spec("week", delay=7 * DAY), spec("now")])
    (claimed,) = store.queue.claim(["default"], "w", 5)
    assert claimed.id == "now"
    store.kv.put("month", b"v", ttl=30 * DAY)
    assert store.leases.acquire("lock", "holder", ttl=600) is not None
    before = store.clock.now()
    store.close()
    simulate_reboot(tmp_path / "s.db")

    store = open_store(url)
    now = store.clock.now()
    assert before <= now <= before + 5  # restarted from the high-water mark
    week = store.queue.get("week")
    assert week is not None and 7 * DAY - 10 < week.ready_at - now <= 7 * DAY
    month = store.kv.get("month")
    assert month is not None and month.expires is not None
    assert 30 * DAY - 10 < month.expires - now <= 30 * DAY
    assert store.leases.holders("lock") == []
    assert store.queue.renew([claimed.lease]) == {"now": "lost"}
    assert store.queue.claim(["default"], "w", 5) == []  # the delayed task is still delayed
    assert store.queue.requeue_expired() == 1
    (again,) = store.queue.claim(["default"], "w2", 5)
    assert (again.id, again.lost) == ("now", 1)
    assert again.token > claimed.token
    store.close()

    store = open_store(url)  # the same boot again: the clock just carries on
    assert store.clock.now() >= now
    store.close()


# The layout of every file before contract v2 (schema 1, no version row); the
# first release lacked the tasks columns waiting, result_ttl and reap_at.
V1_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    payload BLOB NOT NULL, codec TEXT NOT NULL, queue TEXT NOT NULL,
    priority INTEGER NOT NULL, max_attempts INTEGER NOT NULL, lease_s REAL NOT NULL,
    timeout REAL, dedup_key TEXT, state TEXT NOT NULL, ready_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, lost INTEGER NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0, worker TEXT, lease_expires REAL, result BLOB,
    error BLOB, progress_done REAL, progress_total REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL,
    finished REAL
);
CREATE TABLE grants (
    name TEXT NOT NULL, holder TEXT NOT NULL, token INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (name, holder)
) WITHOUT ROWID;
CREATE TABLE grant_tokens (name TEXT PRIMARY KEY, token INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires REAL
) WITHOUT ROWID;
CREATE TABLE stream_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX stream_entries_by_stream ON stream_entries(stream, id);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, data BLOB NOT NULL,
    time REAL NOT NULL
);
"""


def test_file_from_before_the_high_water_mark_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the first release's layout, without new columns
        db.executescript(V1_TABLES)
        db.execute("CREATE INDEX tasks_ready ON tasks(queue, priority DESC, seq)")
        db.execute("INSERT INTO meta VALUES ('boot', 'old-boot'), ('offset', 0.0)")
        for task_id, ready_at in (("due", 4.0), ("later", 1e12)):
            db.execute(
                "INSERT INTO tasks (id, name, payload, codec, queue, priority, max_attempts,"
                " lease_s, state, ready_at, created) VALUES (?, 't', x'', 'json', 'default',"
                " 0, 1, 30, 'queued', ?, 5.0)",
                (task_id, ready_at),
            )
    store = open_store(f"sqlite:///{path}")
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["due"]
    assert store.queue.get("later").result_ttl is None  # type: ignore[union-attr]
    store.close()


def _last_v1_file(path: Path, lease_now: float) -> None:
    """A file as the last release before contract v2 left it: every table in use,
    times a person reads on the lease clock (``lease_now`` is that clock's now)."""
    with sqlite3.connect(path) as db:
        db.executescript(V1_TABLES)
        for column in ("waiting INTEGER NOT NULL DEFAULT 0", "result_ttl REAL", "reap_at REAL"):
            db.execute(f"ALTER TABLE tasks ADD COLUMN {column}")
        db.execute(
            "INSERT INTO meta VALUES ('boot', ?), ('offset', 0.0), ('hwm', ?), ('token', 7),"
            " ('kv_version', 12)",
            (boot_id(), lease_now + 1),
        )
        insert = (
            "INSERT INTO tasks (id, name, payload, codec, queue, priority, max_attempts,"
            " lease_s, state, ready_at, created, started, finished, token, result, result_ttl,"
            " reap_at, attempts) VALUES (?, 't', x'5b5d', 'json', 'default', 0, 1, 30, ?, ?, ?, ?,"
            " ?, ?, ?, 3600, ?, ?)"
        )
        done = lease_now - 10
        db.execute(insert, ("old-done", "succeeded", done - 2, done - 2, done - 1, done, 7,
                            b"1", done + 3600, 1))  # fmt: skip
        db.execute(insert, ("old-queued", "queued", lease_now, lease_now - 5, None, None, 0,
                            None, None, 0))  # fmt: skip
        db.execute("INSERT INTO grants VALUES ('lock', 'old-holder', 3, ?)", (lease_now + 600,))
        db.execute("INSERT INTO grant_tokens VALUES ('lock', 3)")
        db.execute("INSERT INTO kv VALUES ('k', x'76', 12, NULL)")
        db.execute(
            "INSERT INTO stream_entries (stream, data, time) VALUES ('s', x'31', ?)",
            (lease_now - 20,),
        )


def test_a_file_of_the_previous_schema_is_migrated_in_place_once(tmp_path: Path) -> None:
    import time

    path = tmp_path / "v1.db"
    lease_now = time.monotonic()
    _last_v1_file(path, lease_now)
    url = f"sqlite:///{path}"
    store = sqlite_store(url)
    wall = time.time()
    done = store.queue.get("old-done")
    assert done is not None and done.state == "succeeded" and done.result == b"1"
    # Lease-clock times became wall-clock times (epoch seconds), once.
    assert abs(done.finished - (wall - 10)) < 5, (done.finished, wall)  # type: ignore[operator]
    assert abs(done.created - (wall - 12)) < 5
    (entry,) = store.streams.read("s")
    assert abs(entry.time - (wall - 20)) < 5
    # The old grant is still held, and counts against the capacity.
    (held,) = store.leases.holders("lock")
    assert (held.holder, held.token) == ("old-holder", 3)
    assert store.leases.acquire("lock", "new", ttl=60) is None
    # KV versions carry on above the old counter; tokens above every old one.
    old = store.kv.get("k")
    assert old is not None and (old.value, old.version) == (b"v", 12)
    assert store.kv.put("k2", b"w").version == 13
    (claimed,) = store.queue.claim(["default"], "w", 1)
    assert claimed.id == "old-queued" and claimed.token > 7
    space_id = store.space_id
    store.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        schema = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    assert "grants" not in tables and "grant_tokens" not in tables
    assert schema == SCHEMA_VERSION
    store = sqlite_store(url)  # opening again changes nothing
    assert store.space_id == space_id
    again = store.queue.get("old-done")
    assert again is not None and again.finished == done.finished
    assert store.streams.read("s")[0].time == entry.time
    store.close()


def test_a_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    sqlite_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
        open_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:  # nothing was written
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    assert row[0] == SCHEMA_VERSION + 1


def test_synchronous_setting_applies(tmp_path: Path) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db?synchronous=full")
    assert store.conn.conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.conn.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    assert store.conn.conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()


def _claim_all(url: str, worker: str, out: multiprocessing.Queue[list[str]]) -> None:
    store = open_store(url)
    got: list[str] = []
    while batch := store.queue.claim(["default"], worker, 7):
        got.extend(r.id for r in batch)
    out.put(got)
    store.close()


def test_processes_claiming_concurrently_never_share_a_task(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    store.queue.push([spec(f"t{i}") for i in range(2000)])
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
    assert store.queue.stats().counts["default"] == {"running": 2000}
    store.close()


# -- claims stay flat (issue item 13) --------------------------------------------------


def _traced(store: SQLiteStore, fn: Callable[[], object]) -> tuple[list[str], int]:
    """The statements ``fn`` ran on this thread's connection, and its VM steps."""
    conn = store.conn.conn()
    statements: list[str] = []
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0

    conn.set_trace_callback(statements.append)
    conn.set_progress_handler(step, 1)
    try:
        fn()
    finally:
        conn.set_trace_callback(None)
        conn.set_progress_handler(None, 1)
    return statements, steps[0]


def _plans(store: SQLiteStore, statements: list[str], *, keyword: str) -> list[str]:
    conn = store.conn.conn()
    return [
        " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        for sql in statements
        if keyword in sql
    ]


@pytest.mark.parametrize("names", [None, ["mine"]])
def test_claim_reads_only_ready_rows_however_many_are_delayed(
    tmp_path: Path, names: list[str] | None
) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")

    def claim_one() -> object:
        (rec,) = store.queue.claim(["default"], "w", 1, names=names)
        return store.queue.finish([(rec.lease, SUCCEEDED)])

    store.queue.push([TaskSpec(f"a{i}", "mine", b"[]") for i in range(5)])
    _, steps_empty = _traced(store, claim_one)
    store.queue.push([TaskSpec(f"d{i}", "mine", b"[]", delay=DAY) for i in range(20_000)])
    store.queue.push([TaskSpec(f"o{i}", "other", b"[]") for i in range(20_000)])
    statements, steps_full = _traced(store, claim_one)
    assert steps_full < steps_empty * 1.5 + 50, (steps_empty, steps_full)
    plans = _plans(store, statements, keyword="FROM tasks WHERE state = 'queued'")
    index = "tasks_ready_by_name"
    assert plans and all(index in plan for plan in plans), plans
    promote = _plans(store, statements, keyword="SET waiting = 0")
    assert promote and all("tasks_waiting" in plan for plan in promote), promote
    store.close()


# -- driver faults (issue items 3 and 10) ---------------------------------------------


def test_locked_database_raises_backend_error_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = open_store(f"sqlite:///{path}?busy_timeout=0.05")
    store.queue.push([spec("before")])
    (running,) = store.queue.claim(["default"], "w", 1)
    store.queue.push([spec("queued")])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for attempt in (
            lambda: store.queue.push([spec("during")]),
            lambda: store.queue.claim(["default"], "w", 1),
            lambda: store.queue.finish([(running.lease, SUCCEEDED)]),
            lambda: store.kv.put("k", b"v"),
            store.queue.requeue_expired,
            store.queue.reap,
        ):
            with pytest.raises(BackendError, match="locked") as info:
                attempt()
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.queue.finish([(running.lease, SUCCEEDED)]) == [True]
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["queued"]
    assert store.queue.get("during") is None
    assert store.queue.stats().counts["default"] == {"succeeded": 1, "running": 1}
    store.close()


def _fill(store: SQLiteStore, limit: int = 10_000) -> int:
    """Push 64 KiB tasks until the disk is full; return how many were accepted."""
    for i in range(limit):
        try:
            store.queue.push([TaskSpec(f"fill{i}", "t", b"x" * 65_536, queue="fill")])
        except BackendError as exc:
            assert "full" in str(exc), exc
            return i
    raise AssertionError("the disk never filled up")


def _check_full_then_recover(
    store: SQLiteStore, make_full: Callable[[], object], free: Callable[[], object]
) -> None:
    store.queue.push([spec("a-running"), spec("b-queued")])
    (running,) = store.queue.claim(["default"], "w", 1)
    for i in range(3):
        make_full()
        with pytest.raises(BackendError, match="full") as info:
            store.queue.push([TaskSpec(f"big{i}", "t", b"y" * 1_000_000)])
        assert isinstance(info.value.__cause__, sqlite3.Error)
        assert "cannot rollback" not in str(info.value)
    free()
    assert store.queue.finish([(running.lease, SUCCEEDED)]) == [True]
    store.queue.push([spec("after")])
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["b-queued", "after"]
    assert [store.queue.get(f"big{i}") for i in range(3)] == [None] * 3
    assert store.queue.state("a-running") == "succeeded"
    store.close()


def test_database_full_raises_backend_error_and_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL injected with SQLite's own page limit on the store's connection
    (set again before each call: the store replaces a connection after an error)."""
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")

    def make_full() -> None:
        conn = store.conn.conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    def free() -> None:
        store.conn.conn().execute("PRAGMA max_page_count = 1000000")

    _check_full_then_recover(store, make_full, free)


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:  # type: ignore[misc]
    """A 2 MiB tmpfs (needs root; skipped where it cannot be mounted)."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_raises_backend_error_and_recovers_when_space_returns(small_disk: Path) -> None:
    import subprocess

    store = sqlite_store(f"sqlite:///{small_disk}/s.db")
    filled: list[int] = []

    def make_full() -> None:
        if not filled:
            filled.append(_fill(store))

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)

    _check_full_then_recover(store, make_full, grow)
    store = sqlite_store(f"sqlite:///{small_disk}/s.db")
    assert store.queue.stats().counts["fill"] == {"queued": filled[0]}  # every accepted push kept
    store.close()


def test_a_broken_connection_raises_backend_error_and_is_replaced(tmp_path: Path) -> None:
    """Every entry point, including reads, kv_get and the wait loops, maps a driver
    error and works again on the next call (the connection is closed under it)."""
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    store.queue.push([spec("a")])
    store.kv.put("k", b"v")
    calls: list[Callable[[], object]] = [
        lambda: store.queue.get("a"),
        lambda: store.queue.state("a"),
        lambda: store.kv.get("k"),
        lambda: store.kv.scan("k"),
        lambda: store.queue.list(),
        store.queue.stats,
        lambda: store.queue.wait_for_tasks(["empty"], 0.01),
        lambda: store.queue.wait_for_finish(["a"], 0.01),
        lambda: store.queue.push([spec("b")]),
        store.queue.requeue_expired,
        lambda: store.kv.changes("", 0),
        lambda: store.kv.wait("k", 10**9, 0.01),
        lambda: store.leases.holders("x"),
        lambda: store.leases.wait("x", 0.01),
        lambda: store.streams.read("s", wait=0.01),
        lambda: store.kv.revision(),
    ]
    for call in calls:
        store.conn.conn().close()  # injected: the driver's connection is broken
        with pytest.raises(BackendError) as info:
            call()
        assert isinstance(info.value.__cause__, sqlite3.Error)
        call()
    assert store.kv.get("k") is not None
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["a", "b"]
    store.close()


def test_a_subscription_that_lost_its_connection_reports_a_gap_and_carries_on(
    tmp_path: Path,
) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    sub = store.pubsub.subscribe(["c"])
    store.pubsub.publish("c", b"1")
    assert sub.get(1.0) == Message("c", b"1")
    assert sub._conn is not None
    sub._conn.close()  # injected
    store.pubsub.publish("c", b"2")
    assert sub.get(0.01) == Gap("reconnect")  # once
    assert sub.get(1.0) == Message("c", b"2")  # reconnected: nothing published meanwhile lost
    assert sub.get(0.01) is None
    sub.close()
    store.close()


def test_a_subscription_reports_an_overflow_with_the_number_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskspace.backends.sqlite import pubsub

    monkeypatch.setattr(pubsub, "SUBSCRIPTION_BUFFER", 3)
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    with store.pubsub.subscribe(prefixes=["p."]) as sub:
        for i in range(5):
            store.pubsub.publish(f"p.{i}", b"x")
        store.pubsub.publish("other", b"x")
        assert sub.get(1.0) == Gap("overflow", missed=2)
        got = [sub.get(1.0) for _ in range(3)]
        assert got == [Message(f"p.{i}", b"x", "p.") for i in (2, 3, 4)]
        assert sub.get(0.01) is None
    store.close()


# -- bounded storage (issue "Storage stays bounded") ------------------------------------


def test_reap_keeps_the_file_bounded_and_uses_its_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskspace.backends.sqlite import kv

    monkeypatch.setattr(kv, "KV_CHANGES_KEEP", 100)
    path = tmp_path / "s.db"
    store = sqlite_store(f"sqlite:///{path}")
    sizes = []
    for rnd in range(6):
        store.queue.push(
            [TaskSpec(f"{rnd}-{i}", "t", b"p" * 2000, result_ttl=0.0) for i in range(500)]
        )
        for rec in store.queue.claim(["default"], "w", 500):
            store.queue.finish([(rec.lease, SUCCEEDED)])
        for i in range(200):
            store.kv.put(f"{rnd}-{i}", b"v" * 1000, ttl=0.0001)
        while store.queue.reap(limit=300):
            pass
        while store.kv.reap(limit=300):
            pass
        store.conn.conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append(path.stat().st_size)
    assert store.queue.stats().counts == {}
    # Each round writes about 1.2 MB; what stays is B-tree slack of a few pages.
    assert sizes[-1] - sizes[1] < 64 * 1024, sizes
    rows = store.conn.read("SELECT COUNT(*) FROM kv_changes")[0][0]
    assert rows <= 100, rows  # compacted
    statements, _ = _traced(store, store.queue.reap)
    plans = _plans(store, statements, keyword="DELETE")
    assert any("tasks_reap" in p for p in plans), plans
    store.kv.put("late", b"v", ttl=0.0001)
    statements, _ = _traced(store, store.kv.reap)
    plans = _plans(store, statements, keyword="expires <=")
    assert plans and all("kv_expires" in p for p in plans), plans
    store.close()


# -- opening without creating (read-only commands) ---------------------------------------


def test_open_store_without_create_never_creates_a_space(tmp_path: Path) -> None:
    missing_dir = tmp_path / "nonexistent" / "dir"
    for path in (tmp_path / "missing.db", missing_dir / "space.db"):
        url = f"sqlite:///{path}"
        with pytest.raises(SpaceNotFound, match=f"no space at {url}: file .* does not exist"):
            open_store(url, create=False)
        assert not path.exists()
    assert not missing_dir.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    url = f"sqlite:///{tmp_path}/made.db"
    open_store(url).close()  # create=True is the default
    store = open_store(url, create=False)
    assert store.queue.stats().counts == {}
    store.close()


def test_a_number_beyond_64_bits_is_a_config_error_not_an_overflow(tmp_path: Path) -> None:
    from taskspace.errors import ConfigError

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(ConfigError, match="64-bit"):
        store.queue.push([TaskSpec("huge", "t", b"[]", priority=2**63)])
    assert store.queue.get("huge") is None
    store.queue.push([spec("fine")])
    assert store.queue.state("fine") == "queued"
    store.close()


# -- identity: check_space ------------------------------------------------------------


def test_check_space_notices_a_deleted_or_replaced_file_and_never_creates_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    store = sqlite_store(url)
    store.check_space()  # the file it opened
    store.queue.push([spec("a")])
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(SpaceLost, match=f"the space at {url} was wiped or replaced"):
        store.check_space()
    assert not path.exists()  # check_space created nothing
    other = sqlite_store(url)  # a new, empty space at the same path
    assert other.space_id != store.space_id
    other.check_space()
    with pytest.raises(SpaceLost):
        store.check_space()
    other.close()
    with sqlite3.connect(path) as db:  # the identity row wiped
        db.execute("DELETE FROM meta WHERE key = 'space_id'")
    with pytest.raises(SpaceLost):
        store.check_space()
    path.unlink()
    path.write_bytes(b"")  # an empty file: no tables at all
    with pytest.raises(SpaceLost):
        store.check_space()
    store.close()


def test_the_space_id_is_kept_across_opens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    first = sqlite_store(url)
    second = sqlite_store(url)
    assert first.space_id == second.space_id and len(first.space_id) == 32
    second.check_space()
    first.close()
    second.close()


# -- an injected clock -------------------------------------------------------------------


def test_an_injected_clock_drives_leases_ttls_and_delays_without_sleeping(
    tmp_path: Path,
) -> None:
    import time

    from taskspace.backends.memory import ManualClock

    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path}/s.db", clock=clock)
    assert store.clock is clock
    store.queue.push([spec("now", lease_s=30), spec("later", delay=3600)])
    (task,) = store.queue.claim(["default"], "w", 5)
    grant = store.leases.acquire("lock", "me", ttl=10)
    assert grant is not None and grant.expires == clock.now() + 10
    store.kv.put("session", b"v", ttl=20)
    revision = store.kv.revision()
    started = time.monotonic()

    clock.advance(10)  # the grant expired exactly now; nothing else
    assert store.leases.holders("lock") == []
    assert store.leases.renew([grant], 10) == [None]
    assert store.kv.get("session") is not None
    assert store.queue.renew([task.lease]) == {"now": "held"}  # to now + 30

    clock.advance(20)
    assert store.kv.get("session") is None
    (expired,) = store.kv.changes("", revision)
    assert (expired.kind, expired.key) == ("expire", "session")
    assert store.queue.requeue_expired() == 0
    clock.advance(10)
    assert store.queue.requeue_expired() == 1
    assert store.queue.claim(["default"], "w", 5)[0].id == "now"
    clock.advance(3600)
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["later"]
    assert time.monotonic() - started < 2  # nothing slept
    store.close()


# -- times a person reads are wall-clock --------------------------------------------------


def test_stream_entry_and_task_times_are_epoch_seconds(tmp_path: Path) -> None:
    import time

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    before = time.time()
    store.streams.append("s", b"1")
    store.queue.push([spec("a")])
    (rec,) = store.queue.claim(["default"], "w", 1)
    store.queue.finish([(rec.lease, SUCCEEDED)])
    after = time.time()
    (entry,) = store.streams.read("s")
    done = store.queue.get("a")
    assert done is not None and done.started is not None and done.finished is not None
    for t in (entry.time, done.created, done.started, done.finished):
        assert before <= t <= after
    store.close()


def test_trim_by_age_follows_the_wall_clock(tmp_path: Path) -> None:
    from taskspace.backends.memory import ManualClock

    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path}/s.db", clock=clock)
    store.streams.append("s", b"old")
    clock.advance(60)
    store.streams.append("s", b"new")
    assert store.streams.trim("s", max_age=30) == 1
    assert [e.data for e in store.streams.read("s")] == [b"new"]
    store.close()


# -- the token counter, the change feed, the key index ------------------------------------


def test_claims_and_grants_share_one_strictly_increasing_token_counter(tmp_path: Path) -> None:
    import time

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.queue.push([spec(f"t{i}") for i in range(3)])
    tokens = []
    for i in range(3):
        (rec,) = store.queue.claim(["default"], "w", 1)
        grant = store.leases.acquire(f"l{i}", "me", ttl=60)
        assert grant is not None
        tokens += [rec.token, grant.token]
    assert tokens == sorted(set(tokens))
    assert tokens[0] >= int((time.time() - 5) * 1_000_000)  # next_token: at least wall micros
    store.close()


def test_the_change_feed_is_compacted_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskspace.backends.sqlite import kv
    from taskspace.errors import Compacted

    monkeypatch.setattr(kv, "KV_CHANGES_KEEP", 5)
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    for i in range(10):
        store.kv.put(f"k{i}", b"v")
    assert len(store.kv.changes("", 0)) == 10
    store.kv.reap()
    with pytest.raises(Compacted) as info:
        store.kv.changes("", 0)
    assert (info.value.revision, info.value.compacted) == (10, 5)
    assert [c.revision for c in store.kv.changes("", 5)] == [6, 7, 8, 9, 10]
    store.kv.wait("", 0, 5.0)  # returns at once: changes() would raise
    store.close()


def test_scan_and_changes_use_the_key_index(tmp_path: Path) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    for i in range(50):
        store.kv.put(f"a/{i:02}", b"v")
        store.kv.put(f"b/{i:02}", b"v")
    page = store.kv.scan("a/", after_key="a/10", limit=3)
    assert [k for k, _ in page] == ["a/11", "a/12", "a/13"]
    statements, _ = _traced(store, lambda: store.kv.scan("a/", limit=3))
    plans = _plans(store, statements, keyword="FROM kv")
    assert plans and all("PRIMARY KEY (key>? AND key<?)" in p for p in plans), plans
    store.close()


def test_a_key_that_expires_wakes_a_watcher_and_is_recorded_once(tmp_path: Path) -> None:
    import time

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.kv.put("w/k", b"v", ttl=0.2)
    revision = store.kv.revision()
    started = time.monotonic()
    store.kv.wait("w/", revision, 5.0)
    waited = time.monotonic() - started
    assert 0.15 <= waited < 1.0, waited
    changes = store.kv.changes("w/", revision)
    assert [(c.kind, c.version) for c in changes] == [("expire", revision)]
    assert store.kv.changes("w/", revision) == changes  # recorded once
    store.close()


# -- wake-ups across processes ------------------------------------------------------------


def _hold_then_release(url: str, ready: object, go: object, out: object) -> None:
    import time

    store = open_store(url)
    grant = store.leases.acquire("lock", "child", ttl=60)
    assert grant is not None
    ready.set()  # type: ignore[attr-defined]
    go.wait(30)  # type: ignore[attr-defined]
    time.sleep(0.2)  # the parent is waiting by now
    released_at = time.time()
    store.leases.release(grant)
    store.streams.append("s", b"after")
    out.put(released_at)  # type: ignore[attr-defined]
    store.close()


def test_a_release_in_another_process_wakes_a_waiter_within_milliseconds(
    tmp_path: Path,
) -> None:
    import time

    url = f"sqlite:///{tmp_path}/s.db"
    store = open_store(url)
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_hold_then_release, args=(url, ready, go, out))
    proc.start()
    assert ready.wait(30)
    assert store.leases.acquire("lock", "parent", ttl=60) is None
    go.set()
    store.leases.wait("lock", 10.0)
    woke = time.time()
    released_at = out.get(timeout=10)
    proc.join(10)
    latency = woke - released_at
    assert latency < 0.05, latency  # poll_ms=2: a few ms
    assert store.leases.acquire("lock", "parent", ttl=60) is not None
    assert [e.data for e in store.streams.read("s", wait=1.0)] == [b"after"]
    store.close()


def test_a_page_of_changes_never_splits_a_txn(tmp_path: Path) -> None:
    from taskspace.backends.base import Put

    store = open_store(f"sqlite:///{tmp_path}/s.db")
    store.kv.put("a", b"1")
    store.kv.txn([], [Put(k, b"2") for k in ("b", "c", "d")])
    store.kv.put("e", b"3")
    page = store.kv.changes("", 0, limit=2)  # would end inside the txn
    assert [c.key for c in page] == ["a"]
    page = store.kv.changes("", 1, limit=2)  # the txn alone is larger than a page
    assert [(c.revision, c.key) for c in page] == [(2, "b"), (2, "c"), (2, "d")]
    assert [c.key for c in store.kv.changes("", 2, limit=2)] == ["e"]
    store.close()


def test_a_write_over_an_expired_key_records_the_expiry_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskspace.backends.memory import ManualClock
    from taskspace.backends.sqlite import kv

    monkeypatch.setattr(kv, "EXPIRE_BATCH", 0)  # only the written key's own expiry
    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path}/s.db", clock=clock)
    store.kv.put("k", b"1", ttl=1)
    store.kv.put("other", b"1", ttl=1)
    clock.advance(2)
    assert store.kv.put("k", b"2").version == 4
    kinds = [(c.revision, c.key, c.kind) for c in store.kv.changes("k", 0)]
    assert kinds == [(1, "k", "put"), (3, "k", "expire"), (4, "k", "put")]
    store.close()


def test_advancing_an_injected_clock_ends_a_wait_on_an_expiry(tmp_path: Path) -> None:
    import threading
    import time

    from taskspace.backends.memory import ManualClock

    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path}/s.db", clock=clock)
    grant = store.leases.acquire("lock", "me", ttl=5)
    assert grant is not None
    done = threading.Event()

    def wait() -> None:
        store.leases.wait("lock", 30.0)
        done.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert not done.wait(0.2)  # 5 manual seconds never pass by themselves
    started = time.monotonic()
    clock.advance(5)
    assert done.wait(5.0)
    assert time.monotonic() - started < 1.0
    thread.join()
    store.close()


# -- a wait never queues for the write lock; pub/sub retention is reported ------------------


def test_a_kv_wait_over_an_expired_key_never_waits_for_the_write_lock(tmp_path: Path) -> None:
    import time

    from taskspace.backends.memory import ManualClock

    clock = ManualClock()
    path = tmp_path / "s.db"
    # Before the fix a wait took the write lock to record the expiry: with this
    # busy_timeout it raised BackendError after 3 s (30 s by default).
    store = open_store(f"sqlite:///{path}?busy_timeout=3", clock=clock)
    store.kv.put("k/1", b"v", ttl=1.0)
    revision = store.kv.revision()
    clock.advance(2.0)  # k/1 expired, unrecorded
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock meanwhile
    try:
        started = time.monotonic()
        store.kv.wait("other/", revision, 0.2)  # nothing of this prefix: times out
        assert time.monotonic() - started < 0.5
        started = time.monotonic()
        store.kv.wait("k/", revision, 5.0)  # k/1's TTL passed: may have changes, at once
        assert time.monotonic() - started < 0.5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # changes() records the expiry (once)
    changes = store.kv.changes("k/", revision)
    assert [(c.kind, c.key) for c in changes] == [("expire", "k/1")]
    assert store.kv.changes("k/", revision) == changes
    store.close()


def test_a_subscription_idle_past_the_retention_reports_a_gap(tmp_path: Path) -> None:
    from taskspace.backends.memory import ManualClock
    from taskspace.backends.sqlite.pubsub import MESSAGE_RETENTION_S

    clock = ManualClock()
    store = open_store(f"sqlite:///{tmp_path}/s.db", clock=clock)
    assert isinstance(store, SQLiteStore)
    with store.pubsub.subscribe(["c"]) as sub, store.pubsub.subscribe(["c"]) as kept_up:
        store.pubsub.publish("c", b"m1")
        assert kept_up.get(1.0) == Message("c", b"m1")
        clock.advance(MESSAGE_RETENTION_S + 1)
        store.pubsub.publish("c", b"m2")  # its cleanup deletes m1, which ``sub`` never read
        assert sub.get(1.0) == Gap("overflow")
        assert sub.get(1.0) == Message("c", b"m2")
        assert sub.get(0.01) is None
        # a subscriber that read everything before the cleanup missed nothing
        assert kept_up.get(1.0) == Message("c", b"m2")
        assert kept_up.get(0.01) is None
        # every message after the last one ``sub`` saw deleted, none left
        store.pubsub.publish("c", b"m3")
        with store.conn.write() as db:
            db.execute("DELETE FROM messages")  # as a cleanup of everything would
        assert sub.get(1.0) == Gap("overflow")
        assert sub.get(0.01) is None
    # a subscription made after every message was deleted starts clean
    with store.pubsub.subscribe(["c"]) as late:
        store.pubsub.publish("c", b"m4")
        assert late.get(1.0) == Message("c", b"m4")
    store.close()
