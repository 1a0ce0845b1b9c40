"""space.kv.watch on every backend: every change once and in order, resuming
after an outage (a real server killed and restarted: Redis with AOF always,
a private PostgreSQL; on SQLite a writer process SIGKILLed mid-stream) and
after the change feed was compacted (net difference, then the feed again)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskspace import BackendError, ConfigError, SerializationError, Space
from taskspace.backends.base import Change
from taskspace.errors import Compacted
from taskspace.state import watch as watch_module
from taskspace.state.kv import Watch, WatchEvent
from tests.services import PgCluster, RedisServer
from tests.state.kv_procs import spawn


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll ``condition`` (cheap, in memory) until truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"not met within {timeout} s: {what}")


class Collector:
    """Iterate a watch on a thread; events in ``seen``, an exception in ``error``."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.seen: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.seen.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.error = exc

    def close(self) -> None:
        self.watch.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "close() did not end the iteration"
        assert self.error is None, self.error


def feed(space: Space, prefix: str, after: int) -> list[Change]:
    """Every change of ``prefix`` after ``after``, as the store holds them."""
    out: list[Change] = []
    while page := space.store.kv.changes(prefix, after, limit=1000):
        out += page
        after = page[-1].revision
    return out


def mirror(events: list[WatchEvent], start: dict[str, Any] | None = None) -> dict[str, Any]:
    state = dict(start or {})
    for event in events:
        if event.kind == "put":
            state[event.key] = event.value
        else:
            state.pop(event.key, None)
    return state


# -- following ------------------------------------------------------------------------------


def test_watch_reports_every_change_in_order(space: Space) -> None:
    kv = space.kv
    kv.put("cfg/old", "before the watch")  # not reported: the watch starts now
    watch = kv.watch("cfg/", timeout=2.0)
    v1 = kv.put("cfg/a", {"n": 1})
    kv.put("other/x", 1)  # another prefix
    v2 = kv.put("cfg/a", {"n": 2})
    assert kv.delete("cfg/old")
    outcome = kv.txn().put("cfg/b", [1, 2]).put("cfg/c", None).delete("cfg/a").commit()
    got = [next(watch) for _ in range(6)]
    assert [(e.kind, e.key, e.value) for e in got[:3]] == [
        ("put", "cfg/a", {"n": 1}),
        ("put", "cfg/a", {"n": 2}),
        ("delete", "cfg/old", None),
    ]
    assert sorted((e.key, e.kind, e.value) for e in got[3:]) == [  # one txn: any order
        ("cfg/a", "delete", None),
        ("cfg/b", "put", [1, 2]),
        ("cfg/c", "put", None),
    ]
    assert [e.version for e in got[:2]] == [v1, v2]
    assert [e.version for e in got[3:] if e.kind == "delete"] == [v2]
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and len(set(revisions[:3])) == 3
    assert set(revisions[3:]) == {outcome.revision}, "a txn's changes share its revision"
    assert not any(e.relist for e in got)
    assert watch.get(timeout=0.05) is None  # nothing more
    watch.close()
    assert list(watch) == [] and watch.closed


def test_watch_reports_expiry_without_anyone_reading_the_key(space: Space) -> None:
    watch = space.kv.watch("tmp/")
    version = space.kv.put("tmp/session", "s", ttl=0.3)
    assert next(watch).kind == "put"
    start = time.monotonic()
    event = watch.get(timeout=5)
    assert event is not None and (event.kind, event.key, event.value) == (
        "expire",
        "tmp/session",
        None,
    )
    assert event.version == version
    assert time.monotonic() - start < 3, "the wait ends when a key of the prefix is due"
    watch.close()


def test_watch_resumes_from_its_revision_and_lists_with_initial(space: Space) -> None:
    kv = space.kv
    kv.put("j/1", 1)
    kv.put("j/2", 2)
    watch = kv.watch("j/", initial=True, timeout=0.3)
    listed = [next(watch), next(watch)]
    assert [(e.key, e.value, e.relist) for e in listed] == [("j/1", 1, True), ("j/2", 2, True)]
    kv.put("j/3", 3)
    kv.txn().put("j/4", 4).put("j/5", 5).commit()
    assert next(watch).key == "j/3"
    assert next(watch).key == "j/4"
    resume = watch.revision  # the rest of the txn (j/5) is not delivered yet
    watch.close()
    kv.delete("j/1")
    again = list(kv.watch("j/", since=resume, timeout=0))  # 0: what is there now, then end
    assert [(e.kind, e.key) for e in again] == [("put", "j/4"), ("put", "j/5"), ("delete", "j/1")]
    # a watch that ended (timeout) resumes exactly after its last event
    watch = kv.watch("j/", since=again[-1].revision, timeout=0)
    assert list(watch) == []
    kv.put("j/6", 6)
    assert [e.key for e in kv.watch("j/", since=watch.revision, timeout=0)] == ["j/6"]


def test_watch_timeout_close_from_another_thread_and_space_close(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "WAIT_STEP_S", 0.2)  # each blocking wait: 0.2 s at most
    watch = space.kv.watch("t/", timeout=0.3)
    start = time.monotonic()
    assert list(watch) == []
    assert 0.25 <= time.monotonic() - start < 3.0 and watch.closed
    # close() from another thread ends a blocked iteration
    collector = Collector(space.kv.watch("t/"))
    time.sleep(0.05)
    start = time.monotonic()
    collector.close()
    assert time.monotonic() - start <= watch_module.WAIT_STEP_S + 2.0
    # Space.close closes the watches of space.kv
    collector = Collector(space.kv.watch("t/"))
    space.kv.put("t/x", 1)
    wait_for(lambda: collector.seen, what="the put")
    space.close()
    collector.close()
    assert [e.key for e in collector.seen] == ["t/x"]


def test_watch_async_iteration_and_cancellation(space: Space) -> None:
    kv = space.kv

    async def main() -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        watch = kv.watch("a/", timeout=0.3)
        # a cancelled await loses nothing: the event arrives in the next one
        waiter = asyncio.ensure_future(watch.__anext__())
        await asyncio.sleep(0.05)
        waiter.cancel()
        kv.put("a/1", 1)
        async with watch:
            async for event in watch:
                got.append((event.kind, event.key))
                if event.key == "a/1":
                    kv.delete("a/1")
        assert watch.closed  # ended by its timeout
        return got

    start = time.monotonic()
    assert asyncio.run(main()) == [("put", "a/1"), ("delete", "a/1")]
    assert time.monotonic() - start < 5


def test_watch_bad_value_raises_and_the_watch_carries_on(space: Space) -> None:
    watch = space.kv.watch("raw/", timeout=1.0)
    space.store.kv.put("raw/bin", b"\xff\x00 not json")
    space.kv.put("raw/ok", "fine")
    with pytest.raises(SerializationError, match="raw/bin"):
        next(watch)
    event = next(watch)
    assert (event.key, event.value) == ("raw/ok", "fine")
    watch.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prefix": 3}, "prefix"),
        ({"since": -1}, "since"),
        ({"since": "5"}, "since"),
        ({"since": True}, "since"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"initial": "yes"}, "initial"),
        ({"initial": True, "since": 3}, "initial"),
    ],
)
def test_watch_bad_arguments(space: Space, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        space.kv.watch(**options)


# -- compaction -------------------------------------------------------------------------------


def _patch_keep(monkeypatch: pytest.MonkeyPatch, space: Space, keep: int) -> None:
    """Make ``reap`` keep only ``keep`` changes (each backend reads the constant
    at call time from its own module)."""
    module = sys.modules[type(space.store.kv).__module__]
    assert hasattr(module, "KV_CHANGES_KEEP"), module
    monkeypatch.setattr(module, "KV_CHANGES_KEEP", keep)


def test_watch_across_compaction_delivers_the_net_difference_once(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_keep(monkeypatch, space, 3)
    kv, store = space.kv, space.store.kv
    for name in ("gone", "changed", "same", "expires"):
        kv.put(f"m/{name}", f"{name}-0")
    start_state = dict(kv.scan("m/"))
    watch = kv.watch("m/", timeout=0.5)  # knows the four keys (listed at the call)
    kv.put("m/seen", 1)
    first = next(watch)
    assert (first.key, first.relist) == ("m/seen", False)
    # while the watch does not read: churn, removals, an update, additions
    for i in range(10):
        kv.put(f"m/churn{i}", i)
        kv.delete(f"m/churn{i}")
    kv.delete("m/gone")
    kv.delete("m/seen")
    kv.put("m/changed", "changed-1")
    kv.put("m/changed", "changed-2")
    kv.put("m/new", "new-0")
    store.reap()
    with pytest.raises(Compacted):
        store.changes("m/", first.revision)  # the fault bites: the feed lost these changes

    real_scan = store.scan

    def racing_scan(*args: Any, **kwargs: Any) -> Any:
        # writes between the re-list's revision and its scan: the scan sees them
        # AND the feed replays them; each must still be delivered exactly once
        store.scan = real_scan  # type: ignore[method-assign]
        kv.put("m/racer", "r")
        kv.put("m/same", "same-1")
        kv.delete("m/new")
        kv.put("m/new", "new-1")
        return real_scan(*args, **kwargs)

    store.scan = racing_scan  # type: ignore[method-assign]
    try:
        relisted: list[WatchEvent] = []
        for _ in range(6):
            event = watch.get(timeout=5)
            assert event is not None, relisted
            relisted.append(event)
        assert watch.get(timeout=0.05) is None and watch.relists == 1
        kv.put("m/after", "a")
        rest = list(watch)
    finally:
        store.scan = real_scan  # type: ignore[method-assign]
    got = [first, *relisted, *rest]
    assert all(e.relist for e in relisted)
    assert {(e.kind, e.key, e.value) for e in relisted} == {
        ("delete", "m/gone", None),
        ("delete", "m/seen", None),
        ("put", "m/changed", "changed-2"),  # two writes collapsed into the last
        ("put", "m/new", "new-1"),
        ("put", "m/racer", "r"),
        ("put", "m/same", "same-1"),
    }
    assert [(e.kind, e.key) for e in rest] == [("put", "m/after")]
    # never repeated: each (key, version) once; resume stamps never go back
    puts = [(e.key, e.version) for e in got if e.kind == "put"]
    assert len(puts) == len(set(puts))
    stamps = [e.revision for e in got]
    assert stamps == sorted(stamps)
    assert mirror(got, start_state) == dict(kv.scan("m/"))


def test_watch_resumed_below_the_compaction_point_lists_what_it_missed(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_keep(monkeypatch, space, 2)
    kv = space.kv
    kv.put("r/a", 1)
    since = kv.get_versioned("r/a").revision  # type: ignore[union-attr]
    for i in range(6):
        kv.put("r/b", i)
    kv.put("r/c", "c")
    space.store.kv.reap()
    got = list(kv.watch("r/", since=since, timeout=0))
    # it knew nothing: everything written after `since` is listed, once, with its last value
    assert sorted((e.key, e.value) for e in got) == [("r/b", 5), ("r/c", "c")]
    assert all(e.relist for e in got)


# -- outages: a real server stopped, killed, restarted ------------------------------------------


def _writer_run(space: Space, url: str, n: int, outage: Callable[[], None]) -> None:
    """A writer process writes ``n`` numbered keys under ``w/`` while a watch
    follows; ``outage()`` runs twice mid-stream (when a third and two thirds
    were seen). The watch must see every write exactly once, in revision
    order, exactly as the store's feed holds them."""
    watch = space.kv.watch("w/")
    start = watch.revision
    collector = Collector(watch)
    writer = spawn("write", url, "w/", "0", str(n), "0.002")
    try:
        for part in (n // 3, 2 * n // 3):
            wait_for(lambda p=part: len(collector.seen) >= p, 60, f"{part} changes seen")  # type: ignore[misc]
            outage()
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err[-2000:]
        wait_for(lambda: len(collector.seen) >= n, 60, f"all {n} changes seen")
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
        collector.close()
    seen = [(e.revision, e.key, e.kind) for e in collector.seen]
    assert [k for _, k, _ in seen] == [f"w/{i:06d}" for i in range(n)], "each once, in order"
    revisions = [r for r, _, _ in seen]
    assert revisions == sorted(set(revisions)), "revisions strictly increasing"
    assert seen == [(c.revision, c.key, c.kind) for c in feed(space, "w/", start)]
    assert not any(e.relist for e in collector.seen)


def test_watch_misses_nothing_across_redis_kill_and_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskspace.kv")
    server = RedisServer(appendfsync="always").start()
    try:
        url = server.namespaced_url()
        space = Space(url)

        def outage() -> None:
            server.kill()  # SIGKILL; AOF always: every acknowledged write is on disk
            time.sleep(0.2)  # down for a moment: the watch and the writer fail and retry
            server.restart()

        _writer_run(space, url, 300, outage)
        assert "retrying from revision" in caplog.text, "the outage was seen and retried"
        space.close()
    finally:
        server.close()


def test_watch_misses_nothing_across_postgres_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskspace.kv")
    cluster = PgCluster().start()
    try:
        url = cluster.url()
        space = Space(url)

        def outage() -> None:
            cluster.stop("fast")  # every client is disconnected
            cluster.restart()

        _writer_run(space, url, 300, outage)
        # The follower retries when one of its reads fails; one blocked in
        # kv.wait may instead ride it out on the listener, which reconnects.
        seen = ("retrying from revision", "PostgreSQL listener lost")
        assert any(line in caplog.text for line in seen), "the outage was seen"
        space.close()
    finally:
        cluster.close()


@pytest.mark.fault
def test_watch_misses_nothing_when_a_sqlite_writer_is_killed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/space.db"
    space = Space(url)
    writers: list[subprocess.Popen[str]] = []

    def outage() -> None:
        victim = writers[-1] if writers else first
        victim.send_signal(signal.SIGKILL)  # mid-stream, possibly mid-transaction
        victim.wait()
        writers.append(spawn("write", url, "w/", "0", "300", "0.002"))  # starts over: no repeats

    watch = space.kv.watch("w/")
    start = watch.revision
    collector = Collector(watch)
    first = spawn("write", url, "w/", "0", "300", "0.002")
    try:
        for part in (100, 200):
            wait_for(lambda p=part: len(collector.seen) >= p, 60, f"{part} changes seen")  # type: ignore[misc]
            outage()
        _, err = writers[-1].communicate(timeout=60)
        assert writers[-1].returncode == 0, err[-2000:]
        wait_for(lambda: len(collector.seen) >= 300, 30, "all 300 changes seen")
    finally:
        for proc in (first, *writers):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        collector.close()
    seen = [(e.revision, e.key) for e in collector.seen]
    assert [k for _, k in seen] == [f"w/{i:06d}" for i in range(300)]
    assert seen == [(c.revision, c.key) for c in feed(space, "w/", start)]
    space.close()


def test_watch_get_raises_on_time_while_redis_is_down_then_resumes(tmp_path: Path) -> None:
    server = RedisServer(appendfsync="always").start()
    try:
        space = Space(server.namespaced_url())
        space.kv.put("d/a", 1)
        watch = space.kv.watch("d/")
        server.stop()
        start = time.monotonic()
        with pytest.raises(BackendError, match="did not answer before the timeout"):
            watch.get(timeout=0.5)  # a timeout is a promise, and never silent on an outage
        assert time.monotonic() - start < 3.0
        with pytest.raises(BackendError, match="did not answer"):
            space.kv.update("d/a", lambda v: v + 1, timeout=0.5)
        with pytest.raises(BackendError, match="could not list its start"):
            space.kv.watch("d/", timeout=0.3)
        server.restart()
        space.kv.put("d/b", 2)
        event = watch.get(timeout=10)
        assert event is not None and (event.key, event.value) == ("d/b", 2)
        assert space.kv.get("d/a") == 1, "the failed update wrote nothing"
        watch.close()
        space.close()
    finally:
        server.close()
