"""space.cache: L1/L2 reads and writes, invalidation across Spaces and processes,
the staleness bound, racing fills, outages and bad input (every backend)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskspace import Space
from taskspace.backends.base import Put
from taskspace.errors import ConfigError, SerializationError
from taskspace.state.cache import MISSING, RETENTION_S, Cache
from tests.state import cache_procs

BOUND_SLACK_S = 0.25  # the watchdog's wake-up on a loaded 2-core machine (ms normally)


def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.005)


def fresh(cache: Cache, key: str) -> None:
    """Wait until a read of ``key`` is served by L1."""

    def served() -> bool:
        before = cache.stats().l1_hits
        cache.get(key)
        return cache.stats().l1_hits > before

    eventually(served, what="an L1 hit")


@pytest.fixture(params=["memory", "sqlite"])
def local(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Space]:
    """A Space on memory and SQLite only, for tests of the cache's own logic
    (the store contract behind it is the conformance suite's business)."""
    from tests.conftest import backend_url

    sp = Space(backend_url(str(request.param), tmp_path))
    yield sp
    sp.close()


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    """A space URL other Spaces and processes can open (not memory://)."""
    if backend == "memory":
        pytest.skip("the memory backend lives in one Space")
    from tests.conftest import backend_url

    space = Space(backend_url(backend, tmp_path))
    space.store.kv.revision()  # create the space before others open it
    created = space.url
    space.close()
    return created


@pytest.fixture
def pair(url: str) -> Iterator[tuple[Space, Space]]:
    """Two Spaces on one backend: two processes' views, in one process."""
    a, b = Space(url), Space(url)
    yield a, b
    a.close()
    b.close()


# -- one process ----------------------------------------------------------------------


def test_get_set_delete_and_stats(space: Space) -> None:
    cache = space.cache("things", policy="lru", capacity=100)
    assert cache.get("a") is None
    assert cache.get("a", "dflt") == "dflt"
    version = cache.set("a", {"n": [1, 2]})
    assert isinstance(version, int)
    assert cache.get("a") == {"n": [1, 2]}
    fresh(cache, "a")
    stats = cache.stats()
    assert stats.misses == 2 and stats.l1_hits >= 1 and stats.hits == stats.l1_hits + stats.l2_hits
    assert space.kv.get("taskspace/cache/things/a") == {"n": [1, 2]}  # L2 is the KV
    assert cache.delete("a") is True
    assert cache.get("a") is None
    assert cache.delete("a") is False
    assert cache.peek("a") is MISSING


def test_get_or_set_reads_through_once(local: Space) -> None:
    space = local
    cache = space.cache("rt")
    calls: list[int] = []

    def load() -> int:
        calls.append(1)
        return 42

    assert cache.get_or_set("k", load) == 42
    assert cache.get_or_set("k", load) == 42
    fresh(cache, "k")
    assert cache.get_or_set("k", load) == 42
    assert len(calls) == 1

    def boom() -> int:
        raise KeyError("nope")

    with pytest.raises(KeyError):
        cache.get_or_set("other", boom)
    assert cache.get("other") is None  # nothing stored


def test_none_is_a_value(local: Space) -> None:
    space = local
    cache = space.cache("nones")
    cache.set("n", None)
    assert cache.get("n", "absent") is None
    assert cache.get_or_set("n", lambda: 1) is None


def test_ttl_expires_in_l1_and_l2(space: Space) -> None:
    cache = space.cache("short", ttl=0.15)
    cache.set("k", 1)
    fresh(cache, "k")
    eventually(lambda: cache.get("k") is None, what="expiry")
    assert space.kv.get("taskspace/cache/short/k") is None


def test_retention_without_ttl(space: Space) -> None:
    """Storage stays bounded: a value set without a ttl lives RETENTION_S in L2."""
    cache = space.cache("kept")
    cache.set("k", 1)
    entry = space.kv.get_versioned("taskspace/cache/kept/k")
    assert entry is not None and entry.expires is not None
    left = entry.expires - space.store.clock.now()
    assert RETENTION_S - 60 < left <= RETENTION_S
    cache.set("k", 2, ttl=5)
    entry = space.kv.get_versioned("taskspace/cache/kept/k")
    assert entry is not None and entry.expires is not None
    assert entry.expires - space.store.clock.now() <= 5


def test_clear_empties_both_levels(local: Space) -> None:
    space = local
    cache = space.cache("bulk")
    other = space.cache("neighbour")
    cache.set("k0", 0)
    puts = [Put(f"taskspace/cache/bulk/k{i}", b"1") for i in range(1, 1200)]
    space.store.kv.txn([], puts)
    other.set("stay", 1)
    assert cache.clear() == 1200
    assert cache.get("k0") is None and cache.get("k1000") is None
    assert other.get("stay") == 1
    assert list(space.kv.scan("taskspace/cache/bulk/")) == []


def test_names_do_not_overlap(local: Space) -> None:
    space = local
    a, ab = space.cache("a"), space.cache("a/b")
    ab.set("k", 1)
    assert a.get("b/k") is None
    assert ab.prefix == "taskspace/cache/a%2Fb/"


def test_close_stops_the_threads_and_keeps_l2(local: Space) -> None:
    space = local
    cache = space.cache("closing")
    cache.set("k", 1)
    fresh(cache, "k")
    threads = [cache._thread, cache._watchdog]
    cache.close()
    assert all(t is not None and not t.is_alive() for t in threads)
    assert cache.peek("k") is MISSING
    assert cache.get("k") == 1  # straight from L2
    assert cache.stats().size == 0
    cache.close()  # idempotent


def test_space_close_closes_caches(local: Space) -> None:
    space = local
    cache = space.cache("c")
    cache.set("k", 1)
    thread = cache._thread
    space.close()
    assert thread is not None and not thread.is_alive()
    assert space.cache("c") is not cache  # a new one after close


def test_racing_fill_is_refused(space: Space) -> None:
    """A read of L2 that started before an invalidation must not put its
    (now stale) value into L1 when it ends after the invalidation."""
    cache = space.cache("race", policy="lru")
    cache.set("k", 1)
    fresh(cache, "k")
    full = cache.prefix + "k"
    fill = cache._begin("k")  # a reader begins: it reads version 1 from L2
    old = space.store.kv.get(full)
    assert old is not None
    invalidated, refused = cache.stats().invalidations, cache.stats().refused_fills
    space.kv.put(full, 2)  # another process writes (not through this cache)
    eventually(lambda: cache.stats().invalidations > invalidated, what="the invalidation")
    cache._end("k", fill, (1, old.version), failed=False)  # the reader ends late
    assert cache.stats().refused_fills == refused + 1
    assert cache.peek("k") is MISSING
    assert cache.get("k") == 2
    fresh(cache, "k")
    assert cache.peek("k") == 2


def test_local_delete_refuses_a_fill_in_flight(local: Space) -> None:
    space = local
    cache = space.cache("race2")
    cache.set("k", 1)
    fresh(cache, "k")
    refused = cache.stats().refused_fills
    fill = cache._begin("k")
    old = space.store.kv.get(cache.prefix + "k")
    assert old is not None
    cache.delete("k")
    cache._end("k", fill, (1, old.version), failed=False)
    assert cache.stats().refused_fills == refused + 1
    assert cache.get("k") is None


def test_an_older_fill_never_replaces_a_newer_entry(local: Space) -> None:
    space = local
    cache = space.cache("race3")
    cache.set("k", 1)
    slow = cache._begin("k")
    old = space.store.kv.get(cache.prefix + "k")
    assert old is not None
    cache.set("k", 2)  # this process's own newer write lands first
    cache._end("k", slow, (1, old.version), failed=False)
    fresh(cache, "k")
    assert cache.peek("k") == 2


def test_threads_hammering_one_key_converge(local: Space) -> None:
    space = local
    """Readers and a writer in threads: once the writer is done, every read
    (within the bound) returns the last value; stats add up."""
    cache = space.cache("threads", policy="tinylfu", max_stale=0.05)
    cache.set("k", 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                cache.get("k")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for v in range(1, 30):
        cache.set("k", v)
    done = time.monotonic()
    time.sleep(0.05 + BOUND_SLACK_S)  # the bound after the last write
    late = [cache.get("k") for _ in range(200)]
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert set(late) == {29}, f"stale reads {time.monotonic() - done:.2f} s after the write"


# -- across Spaces (processes' views) ------------------------------------------------


def test_a_write_invalidates_another_spaces_l1(pair: tuple[Space, Space]) -> None:
    a, b = pair
    ca, cb = a.cache("shared"), b.cache("shared")
    ca.set("k", "one")
    assert cb.get("k") == "one"
    fresh(cb, "k")
    ca.set("k", "two")
    eventually(lambda: cb.peek("k") is MISSING or cb.peek("k") == "two", what="invalidation")
    assert cb.get("k") == "two"
    ca.delete("k")
    eventually(lambda: cb.get("k") is None, what="delete seen")
    ca.set("k", "three")
    fresh(cb, "k")
    ca.clear()
    eventually(lambda: cb.get("k") is None, what="clear seen")


def test_bad_input(local: Space) -> None:
    space = local
    bad_options: list[dict[str, Any]] = [
        {"capacity": 0}, {"capacity": 1.5}, {"capacity": True}, {"policy": "fifo"},
        {"ttl": 0}, {"ttl": -1}, {"ttl": "1"}, {"max_stale": 0}, {"max_stale": None},
        {"colour": "red"},
    ]  # fmt: skip
    for i, options in enumerate(bad_options):
        with pytest.raises(ConfigError):
            space.cache(f"bad{i}", **options)
    with pytest.raises(ConfigError, match="name"):
        Cache(space, "")
    cache = space.cache("good", capacity=5)
    with pytest.raises(ConfigError):
        space.cache("good", capacity=6)  # one per name, same options
    for key in (None, "", 1, ["x"], ("t",)):
        with pytest.raises(ConfigError, match="key"):
            cache.get(key)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="key"):
            cache.set(key, 1)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="key"):
            cache.delete(key)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="'k'"):
        cache.set("k", (1, 2))
    with pytest.raises(SerializationError):
        cache.set("k", {1: "x"})
    with pytest.raises(ConfigError, match="ttl"):
        cache.set("k", 1, ttl=0)
    with pytest.raises(ConfigError, match="fn"):
        cache.get_or_set("k", 5)  # type: ignore[arg-type]
    assert cache.get("k") is None  # nothing was written
    assert list(space.kv.scan("taskspace/cache/")) == []


# -- across processes -----------------------------------------------------------------


def _staleness(work: Path, reports: list[dict[str, Any]]) -> float:
    """The largest time a read returned a value after a newer write had
    completed (0 if no read ever did)."""
    done: dict[str, dict[int, float]] = {}
    for line in (work / "writes.log").read_text().splitlines():
        key, version, at = line.split()
        done.setdefault(key, {})[int(version)] = float(at)
    worst = 0.0
    for rep in reports:
        for key, seen in rep["last"].items():
            for value, read_at in seen.items():
                newer = done[key].get(int(value) + 1)
                if newer is not None:
                    worst = max(worst, read_at - newer)
    return worst


def _run_fleet(url: str, work: Path, max_stale: float, canary: bool = False, procs: int = 2
               ) -> tuple[float, list[dict[str, Any]]]:  # fmt: skip
    """``procs`` writers (one key each) and ``procs`` readers (every key)."""
    work.mkdir()
    keys = [f"k{i}" for i in range(procs)]
    common = {"cache": "fleet", "max_stale": max_stale}
    children = [
        cache_procs.spawn("writer", url, work, key=key, n=15, interval=0.02, **common)
        for key in keys
    ] + [
        cache_procs.spawn("reader", url, work, keys=keys, canary=canary, **common)
        for _ in range(procs)
    ]
    try:
        cache_procs.wait_ready(work, children)
        (work / "go").touch()
        for writer in children[:procs]:
            cache_procs.report(writer)
        time.sleep(max_stale + BOUND_SLACK_S)  # reads after the bound count too
        (work / "stop").touch()
        readers = [cache_procs.report(reader) for reader in children[procs:]]
    finally:
        cache_procs.kill_all(children)
    return _staleness(work, readers), readers


def test_no_read_is_staler_than_the_bound_across_4_processes(url: str, tmp_path: Path) -> None:
    """2 writers write increasing versions of their key; 2 readers read both
    keys in a tight loop. No read that started more than max_stale (+ the
    watchdog's wake-up slack) after a write completed returns an older value,
    and L1 did serve (the readers were not reading L2 all along)."""
    max_stale = 0.3
    worst, readers = _run_fleet(url, tmp_path / "w", max_stale)
    l1 = sum(r["l1_hits"] for r in readers)
    reads = sum(r["reads"] for r in readers)
    dropped = sum(r["invalidations"] for r in readers)
    print(f"staleness max {worst * 1000:.1f} ms over {reads:,} reads (L1 hits {l1:,},"
          f" invalidations {dropped})")  # fmt: skip
    assert worst <= max_stale + BOUND_SLACK_S
    assert l1 > 1000
    assert all(r["invalidations"] > 0 for r in readers)


def test_canary_readers_without_invalidation_go_stale(
    backend: str, url: str, tmp_path: Path
) -> None:
    """The detector bites: readers whose listener applies nothing serve stale
    L1 values well past the bound."""
    if backend != "sqlite":
        pytest.skip("one backend is enough for the canary")
    worst, _ = _run_fleet(url, tmp_path / "w", 0.3, canary=True, procs=1)
    print(f"canary staleness {worst:.2f} s")
    assert worst > 0.3 + BOUND_SLACK_S


@pytest.mark.fault
def test_paused_reader_after_compaction_clears_l1(
    backend: str, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader process SIGSTOPped while the value changes and the change feed
    is compacted past its position: on resume its listener gets Compacted and
    clears L1, and its reads return the new value."""
    if backend == "postgres":
        pytest.skip("PostgreSQL: the 4-process test covers it (suite time)")
    import importlib

    module = importlib.import_module(f"taskspace.backends.{backend}.kv")
    monkeypatch.setattr(module, "KV_CHANGES_KEEP", 1)  # this process's reap keeps 1 change
    work = tmp_path / "w"
    work.mkdir()
    space = Space(url)
    try:
        writer = space.cache("held", max_stale=0.2)
        writer.set("k", "old")
        child = cache_procs.spawn("hold", url, work, cache="held", key="k", max_stale=0.2,
                                  settle=0.3)  # fmt: skip
        try:
            cache_procs.wait_ready(work, [child], 1)
            os.kill(child.pid, signal.SIGSTOP)
            writer.set("k", "new")
            for i in range(5):
                space.kv.put(f"filler/{i}", i)
            space.store.kv.reap()
            os.kill(child.pid, signal.SIGCONT)
            (work / "go2").touch()
            rep = cache_procs.report(child)
        finally:
            cache_procs.kill_all([child])
    finally:
        space.close()
    assert rep["value"] == "new"
    assert rep["resets"] > rep["resets_before"], "Compacted did not clear L1"


@pytest.mark.fault
def test_redis_paused_stops_l1_then_recovers(tmp_path: Path) -> None:
    """Redis SIGSTOPped: after max_stale L1 no longer serves (the listener is
    stuck); after SIGCONT the listener resumes from its position and the
    next write is seen."""
    from tests.services import RedisServer

    server = RedisServer().start()
    a, b = Space(server.url), Space(server.url)
    try:
        ca, cb = a.cache("p", max_stale=0.2), b.cache("p", max_stale=0.2)
        ca.set("k", 1)
        fresh(cb, "k")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            eventually(lambda: cb.peek("k") is MISSING, timeout=0.2 + 1.0, what="L1 off")
        finally:
            server.proc.send_signal(signal.SIGCONT)
        ca.set("k", 2)
        eventually(lambda: cb.get("k") == 2, what="the write after the pause")
        fresh(cb, "k")
        assert cb.peek("k") == 2
    finally:
        a.close()
        b.close()
        server.close()


def test_listener_survives_an_exception(local: Space, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception in the listener is logged; the listener clears
    L1, restarts from the current revision and keeps invalidating."""
    space = local
    cache = space.cache("sturdy", max_stale=0.2)
    cache.set("k", 1)
    fresh(cache, "k")
    failures: list[int] = []

    def probe(changes: list[Any]) -> None:
        if not failures:
            failures.append(len(changes))
            raise RuntimeError("probe failure")

    cache._on_apply = probe
    resets = cache.stats().resets
    space.kv.put(cache.prefix + "k", 2)
    eventually(lambda: cache.stats().resets > resets, what="the restart")
    assert "listener failed" in caplog.text
    assert cache.get("k") == 2
    space.kv.put(cache.prefix + "k", 3)
    eventually(lambda: cache.get("k") == 3, what="invalidation after the restart")
    fresh(cache, "k")
    assert cache.peek("k") == 3
    assert cache._thread is not None and cache._thread.is_alive()
