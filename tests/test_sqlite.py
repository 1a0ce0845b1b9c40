"""SQLite specifics: the reboot-safe clock, durability settings, many processes,
flat claims behind delayed tasks, driver faults, bounded storage, opening a
space without creating it."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from taskspace.backends import open_store
from taskspace.backends.base import Outcome, TaskSpec
from taskspace.backends.sqlite import SQLiteStore
from taskspace.backends.sqlite.schema import TABLES
from taskspace.errors import BackendError, SpaceNotFound, SubscriptionLost

DAY = 24 * 3600.0
SUCCEEDED = Outcome("succeeded", result=b"1")


def spec(task_id: str, lease_s: float = 600.0, **kw: object) -> TaskSpec:
    return TaskSpec(  # type: ignore[arg-type]
        id=task_id, name="t", payload=b"[[]]", lease_s=lease_s, max_attempts=3, **kw
    )


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
    store.kv_put("month", b"v", ttl=30 * DAY)
    assert store.acquire("lock", "holder", 1, ttl=600) is not None
    before = store.clock.now()
    store.close()
    simulate_reboot(tmp_path / "s.db")

    store = open_store(url)
    now = store.clock.now()
    assert before <= now <= before + 5  # restarted from the high-water mark
    week = store.queue.get("week")
    assert week is not None and 7 * DAY - 10 < week.ready_at - now <= 7 * DAY
    month = store.kv_get("month")
    assert month is not None and month.expires is not None
    assert 30 * DAY - 10 < month.expires - now <= 30 * DAY
    assert store.holders("lock") == []
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


def test_file_from_before_the_high_water_mark_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the first release's layout, without new columns
        db.executescript(TABLES)
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


def test_synchronous_setting_applies(tmp_path: Path) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db?synchronous=full")
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
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
    conn = store._conn()
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
    conn = store._conn()
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
            lambda: store.kv_put("k", b"v"),
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
        conn = store._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    def free() -> None:
        store._conn().execute("PRAGMA max_page_count = 1000000")

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
    store.kv_put("k", b"v")
    calls: list[Callable[[], object]] = [
        lambda: store.queue.get("a"),
        lambda: store.queue.state("a"),
        lambda: store.kv_get("k"),
        lambda: store.kv_scan("k"),
        lambda: store.queue.list(),
        store.queue.stats,
        lambda: store.queue.wait_for_tasks(["empty"], 0.01),
        lambda: store.queue.wait_for_finish(["a"], 0.01),
        lambda: store.queue.push([spec("b")]),
        store.queue.requeue_expired,
    ]
    for call in calls:
        store._conn().close()  # injected: the driver's connection is broken
        with pytest.raises(BackendError) as info:
            call()
        assert isinstance(info.value.__cause__, sqlite3.Error)
        call()
    assert store.kv_get("k") is not None
    assert [r.id for r in store.queue.claim(["default"], "w", 5)] == ["a", "b"]
    store.close()


def test_a_subscription_that_lost_its_connection_says_so_and_carries_on(tmp_path: Path) -> None:
    store = sqlite_store(f"sqlite:///{tmp_path}/s.db")
    sub = store.subscribe(["c"])
    store.publish("c", b"1")
    assert sub.get(1.0) is not None
    assert sub._conn is not None
    sub._conn.close()  # injected
    store.publish("c", b"2")
    with pytest.raises(SubscriptionLost):
        sub.get(0.01)
    message = sub.get(1.0)  # reconnected: nothing published meanwhile is lost
    assert message is not None and message.data == b"2"
    sub.close()
    store.close()


# -- bounded storage (issue "Storage stays bounded") ------------------------------------


def test_reap_keeps_the_file_bounded_and_uses_its_indexes(tmp_path: Path) -> None:
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
            store.kv_put(f"{rnd}-{i}", b"v" * 1000, ttl=0.0001)
        while store.queue.reap(limit=300):
            pass
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sizes.append(path.stat().st_size)
    assert store.queue.stats().counts == {}
    assert sizes[-1] <= sizes[1], sizes
    statements, _ = _traced(store, store.queue.reap)
    plans = _plans(store, statements, keyword="DELETE")
    assert any("tasks_reap" in p for p in plans) and any("kv_expires" in p for p in plans), plans
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
