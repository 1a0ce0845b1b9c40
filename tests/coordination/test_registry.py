"""Service registry on every backend: register, discover, heartbeats, health
checks against loopback servers, deregister_after, watch, bad input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from taskspace import Space
from taskspace.coordination import registry as registry_mod
from taskspace.coordination.health import run_check
from taskspace.coordination.registry import PREFIX, maintain_registry
from taskspace.errors import Compacted, ConfigError
from tests.coordination.registry_helpers import Watcher, closed_port, http_server, wait_for


@pytest.fixture(autouse=True)
def _close_registry(space: Space) -> Iterator[None]:
    """Registrations a test left behind stop heartbeating with the test."""
    yield
    space.registry.close()


def test_register_discover_by_tags_and_health(space: Space) -> None:
    reg = space.registry
    a = reg.register("api", "a1", "10.0.0.1:80", tags=["v1", "eu"], meta={"zone": "a"})
    b = reg.register("api", "a2", "10.0.0.2:80", tags=["v2", "eu"])
    c = reg.register("api", "a3", "10.0.0.3:80", tags=["v1"])
    reg.register("db", "d1", "10.0.1.1:5432")
    try:
        assert [i.id for i in reg.discover("api")] == ["a1", "a2", "a3"]
        assert [i.id for i in reg.discover("api", tags=["eu"])] == ["a1", "a2"]
        assert [i.id for i in reg.discover("api", tags=["v1", "eu"])] == ["a1"]
        first = reg.discover("api")[0]
        assert (first.address, first.meta, first.status) == (
            "10.0.0.1:80",
            {"zone": "a"},
            "passing",
        )
        assert first.registered > 1.7e9 and first.expires is not None  # wall clock; a TTL
        b.update(status="warning", output="disk 91%")
        c.update(status="critical", output="down")
        assert [i.id for i in reg.discover("api")] == ["a1"]  # passing only (Consul's ?passing)
        assert [i.id for i in reg.discover("api", include_warning=True)] == ["a1", "a2"]
        assert [(i.id, i.status) for i in reg.discover("api", healthy_only=False)] == [
            ("a1", "passing"), ("a2", "warning"), ("a3", "critical"),
        ]  # fmt: skip
        assert reg.get("api", "a2").output == "disk 91%"  # type: ignore[union-attr]
        a.update(meta={"zone": "b"}, tags=["v3"])
        got = reg.get("api", "a1")
        assert got is not None and got.meta == {"zone": "b"} and got.tags == ("v3",)
        assert sorted(reg.services()) == ["api", "db"]
        assert reg.discover("nothing") == []
    finally:
        reg.close()
    assert reg.services() == {}


def test_heartbeats_keep_an_instance_alive_without_new_revisions(space: Space) -> None:
    with space.registry.register("api", "hb", "127.0.0.1:1", ttl=0.6) as registration:
        revision = space.store.kv.revision()
        time.sleep(1.5)  # the point: 2.5 TTLs pass, heartbeats alone keep it
        assert [i.id for i in space.registry.discover("api")] == ["hb"]
        assert space.store.kv.revision() == revision  # kv.touch: no change on the feed
        assert registration.active
    assert not registration.active
    assert space.registry.discover("api", healthy_only=False) == []


def test_ttl_expiry_without_heartbeats_and_rewrite_after_loss(space: Space) -> None:
    silent = space.registry.register("api", "quiet", "h:1", ttl=0.3, heartbeat=False)
    wait_for(lambda: space.registry.get("api", "quiet") is None, timeout=5)
    assert silent.heartbeat()  # the key was gone: written again
    assert silent.rewrites == 1 and space.registry.get("api", "quiet") is not None
    assert silent.deregister() and not silent.deregister()
    assert not silent.heartbeat()  # deregistered: never resurrected


def test_deregister_by_name_and_reregister_overwrites(space: Space) -> None:
    reg = space.registry
    reg.register("api", "x", "h:1", ttl=None)
    reg.register("api", "x", "h:2", ttl=None, tags=["new"])
    assert [(i.address, i.tags) for i in reg.discover("api")] == [("h:2", ("new",))]
    assert reg.deregister("api", "x") and not reg.deregister("api", "x")
    assert reg.get("api", "x") is None


@pytest.mark.parametrize(
    ("args", "options", "named"),
    [
        (("", "i", "a"), {}, "service"),
        (("a/b", "i", "a"), {}, "service"),
        (("api", "i/1", "a"), {}, "instance_id"),
        (("api", "", "a"), {}, "instance_id"),
        (("api", "i", ""), {}, "address"),
        (("api", "i", "a"), {"ttl": -1}, "ttl"),
        (("api", "i", "a"), {"ttl": 0}, "ttl"),
        (("api", "i", "a"), {"tags": "v1"}, "tags"),
        (("api", "i", "a"), {"meta": {"x": object()}}, "meta"),
        (("api", "i", "a"), {"meta": {1: 2}}, "meta"),
        (("api", "i", "a"), {"check": "ftp://host/"}, "check"),
        (("api", "i", "a"), {"check": "tcp://host"}, "check"),
        (("api", "i", "a"), {"check": "tcp://host:99999"}, "check"),
        (("api", "i", "a"), {"interval": 0}, "interval"),
        (("api", "i", "a"), {"timeout": float("nan")}, "timeout"),
        (("api", "i", "a"), {"deregister_after": -5}, "deregister_after"),
        (("api", "i", "a"), {"heartbeat": "yes"}, "heartbeat"),
        (("api", "i", "a"), {"ttl": 0.001}, "ttl"),  # below the floor: a heartbeat storm
        (("api", "i", "a"), {"ttl": True}, "ttl"),
        (("api", "i", "a"), {"ttl": float("inf")}, "ttl"),
        (("api", "i", "a"), {"interval": 0.001}, "interval"),
        (("api", "i", "a"), {"timeout": 0}, "timeout"),
        (("api", "i", "a"), {"deregister_after": float("nan")}, "deregister_after"),
        (("api", "i", "a"), {"meta": {"x": float("nan")}}, "meta"),  # JSON would store null
        (("api", "i", "a"), {"meta": {"x": [float("inf")]}}, "meta"),
        (("api", "i", "a"), {"meta": {"x": (1, 2)}}, "meta"),  # would come back a list
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    space: Space, args: tuple[str, str, str], options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        space.registry.register(*args, **options)  # type: ignore[arg-type]
    assert space.store.kv.scan(PREFIX) == []


def test_bad_arguments_of_the_other_calls(space: Space) -> None:
    reg = space.registry
    with pytest.raises(ConfigError, match="service"):
        reg.discover("no spaces")
    with pytest.raises(ConfigError, match="tags"):
        reg.discover("api", tags="v1")
    with pytest.raises(ConfigError, match="since"):
        reg.watch("api", since=-1)
    with pytest.raises(ConfigError, match="healthy_only"):
        reg.discover("api", healthy_only="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="include_warning"):
        reg.discover("api", include_warning=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="idle_timeout"):
        reg.watch("api", idle_timeout=float("nan"))
    with pytest.raises(ConfigError, match="initial"):
        reg.watch("api", initial="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="budget"):
        reg.maintain(budget=-1)
    with pytest.raises(ConfigError, match="instance_id"):
        reg.deregister("api", "a b")
    with (
        reg.register("api", "i", "h:1") as registration,
        pytest.raises(ConfigError, match="status"),
    ):
        registration.update(status="ok")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="deregistered"):
        registration.update(meta={})
    assert space.store.kv.scan(PREFIX) == []
    with reg.register("api", "j", "h:1") as registration:
        version = space.store.kv.get(PREFIX + "api/j").version  # type: ignore[union-attr]
        for bad in ({"meta": {"x": float("nan")}}, {"tags": "v1"}, {"address": ""},
                    {"status": "warning", "output": 5}):  # fmt: skip
            with pytest.raises(ConfigError):
                registration.update(**bad)  # type: ignore[arg-type]
        assert space.store.kv.get(PREFIX + "api/j").version == version  # type: ignore[union-attr]


def _settle(space: Space, expected: dict[str, str], timeout: float = 10.0) -> None:
    """Run maintainer passes until every instance has its expected status."""

    def settled() -> bool:
        maintain_registry(space)
        found = {i.id: i.status for i in space.registry.discover("web", healthy_only=False)}
        return found == expected

    wait_for(settled, timeout=timeout, step=0.05)


def test_http_and_tcp_checks_by_the_maintainer(space: Space) -> None:
    reg = space.registry
    down = closed_port()
    with http_server() as base:
        port = base.rsplit(":", 1)[1]
        checks = {"ok": f"{base}/200", "busy": f"{base}/429", "broken": f"{base}/500",
                  "down": f"http://127.0.0.1:{down}/", "tcp-up": f"tcp://127.0.0.1:{port}",
                  "tcp-down": f"tcp://127.0.0.1:{down}"}  # fmt: skip
        for name, url in checks.items():
            reg.register("web", name, url, check=url, interval=0.1, timeout=1.0, ttl=None)
        assert {i.status for i in reg.discover("web", healthy_only=False)} == {"critical"}
        assert reg.discover("web") == []  # not checked yet: critical, as Consul starts checks
        expected = {"ok": "passing", "busy": "warning", "broken": "critical",
                    "down": "critical", "tcp-up": "passing", "tcp-down": "critical"}  # fmt: skip
        _settle(space, expected)
        ok = reg.get("web", "ok")
        assert ok is not None and ok.output == "HTTP 200: status 200" and ok.checked is not None
        assert "HTTP 500" in reg.get("web", "broken").output  # type: ignore[union-attr]
        # a check that finds the same status writes nothing: no revision
        revision = space.store.kv.revision()
        time.sleep(0.15)
        maintain_registry(space)
        maintain_registry(space)
        assert space.store.kv.revision() == revision
    # the server went away: its instances turn critical
    _settle(space, {**expected, "ok": "critical", "busy": "critical", "tcp-up": "critical"})
    reg.close()


def test_a_status_change_keeps_the_remaining_ttl(space: Space) -> None:
    with http_server() as base:
        space.registry.register("web", "t", base, check=f"{base}/200", interval=0.1, ttl=30,
                                heartbeat=False)  # fmt: skip
        _settle(space, {"t": "passing"})
    inst = space.registry.get("web", "t")
    assert inst is not None and inst.expires is not None
    assert inst.expires - space.store.clock.now() <= 30  # not extended past the owner's TTL


def test_maintain_is_bounded_and_records_slow_checks_later(space: Space) -> None:
    with http_server() as base:
        space.registry.register("web", "slow", base, check=f"{base}/slow", interval=60,
                                timeout=1.5, ttl=None)  # fmt: skip
        start = time.monotonic()
        maintain_registry(space)
        assert time.monotonic() - start < 1.4  # the budget, not the check's 3 s
        assert space.registry.get("web", "slow").output == "not checked yet"  # type: ignore[union-attr]

        # the check times out in the pool; a later pass records it, and holds up nothing
        def recorded() -> Any:
            start = time.monotonic()
            maintain_registry(space)
            assert time.monotonic() - start < 0.5  # nothing new was due: no wait
            inst = space.registry.get("web", "slow")
            return inst if inst is not None and inst.checked is not None else None

        inst = wait_for(recorded, timeout=5)
        assert inst.status == "critical" and "timed out" in inst.output


def test_critical_instances_are_deregistered_after_deregister_after(space: Space) -> None:
    down = f"tcp://127.0.0.1:{closed_port()}"
    space.registry.register("web", "dead", "h:1", check=down, interval=0.1, timeout=0.5,
                            deregister_after=0.5, ttl=None)  # fmt: skip
    space.registry.register("web", "kept", "h:1", check=down, interval=0.1, timeout=0.5,
                            deregister_after=None, ttl=None)  # fmt: skip
    watcher = Watcher(space, "web")
    try:
        removed = wait_for(
            lambda: maintain_registry(space) or space.registry.get("web", "dead") is None
        )
        assert removed
        watcher.expect("removed", "dead")
        assert space.registry.get("web", "kept") is not None  # deregister_after=None: never
    finally:
        watcher.close()


def test_run_check_never_raises() -> None:
    assert run_check("tcp://127.0.0.1:1", 0.5).status == "critical"
    assert run_check("http://[::1", 0.5).status == "critical"
    assert run_check("http://127.0.0.1:1/", 0.5).status == "critical"


def test_watch_sees_every_kind_of_change(space: Space) -> None:
    reg = space.registry
    reg.register("api", "before", "h:0", ttl=None)
    watcher = Watcher(space, "api", initial=True)
    try:
        assert watcher.expect("added", "before").instance.address == "h:0"  # type: ignore[union-attr]
        a = reg.register("api", "a", "h:1", ttl=0.5, heartbeat=False)
        assert watcher.expect("added", "a").instance.address == "h:1"  # type: ignore[union-attr]
        a.update(status="warning", output="slow")
        change = watcher.expect("updated", "a")
        assert change.instance.status == "warning" and change.previous.status == "passing"  # type: ignore[union-attr]
        reg.register("other", "o", "h:2", ttl=None)  # another service: not seen
        reg.deregister("api", "before")
        assert watcher.expect("removed", "before").instance.address == "h:0"  # type: ignore[union-attr]
        expired = watcher.expect("expired", "a")  # no heartbeat: its TTL ran out
        assert expired.instance is not None and expired.revision > change.revision
        assert all(c.service == "api" for c in watcher.seen)
    finally:
        watcher.close()
    # resuming from a revision replays what came after it
    resumed = list(reg.watch("api", since=change.revision, idle_timeout=0.3))
    assert [(c.kind, c.id) for c in resumed] == [("removed", "before"), ("expired", "a")]


def _patch_keep(monkeypatch: pytest.MonkeyPatch, space: Space, keep: int) -> None:
    import sys

    module = sys.modules[type(space.store.kv).__module__]
    assert hasattr(module, "KV_CHANGES_KEEP"), module
    monkeypatch.setattr(module, "KV_CHANGES_KEEP", keep)


def test_watch_misses_nothing_across_compacted(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_keep(monkeypatch, space, 3)
    reg, kv = space.registry, space.store.kv
    reg.register("api", "gone", "h:0", ttl=None)
    reg.register("api", "changed", "h:0", ttl=None)
    reg.register("api", "same", "h:0", ttl=None)
    watch = reg.watch("api", initial=True, idle_timeout=1.0)
    assert sorted(next(watch).id for _ in range(3)) == ["changed", "gone", "same"]
    start = kv.revision()
    # while the watch is not reading: churn, a removal, an update, an addition
    for i in range(10):
        reg.register("api", f"churn{i}", "h:9", ttl=None)
        reg.deregister("api", f"churn{i}")
    reg.deregister("api", "gone")
    reg.register("api", "changed", "h:1", ttl=None)
    reg.register("api", "new", "h:2", ttl=None)
    reg.register("api", "brief", "h:3", ttl=None)
    reg.deregister("api", "brief")
    kv.reap()
    with pytest.raises(Compacted):  # the fault bites: the feed lost these changes
        kv.changes(PREFIX, start)
    real_scan = registry_mod.scan_all

    def racing_scan(store: Any, prefix: str) -> Any:
        # writes between the re-list's revision and its scan: the scan sees them
        # AND the feed replays them; each must still be reported exactly once
        monkeypatch.setattr(registry_mod, "scan_all", real_scan)
        reg.register("api", "racer", "h:5", ttl=None)
        reg.register("api", "same", "h:6", ttl=None)
        reg.deregister("api", "new")
        reg.register("api", "new", "h:7", ttl=None)
        return real_scan(store, prefix)

    monkeypatch.setattr(registry_mod, "scan_all", racing_scan)
    seen = [(c.kind, c.id) for c in watch]
    # the net difference, nothing of the churn or of "brief", and nothing twice
    assert sorted(seen) == [("added", "new"), ("added", "racer"), ("removed", "gone"),
                            ("updated", "changed"), ("updated", "same")]  # fmt: skip
    reg.register("api", "after", "h:4", ttl=None)  # then the feed again
    assert [
        (c.kind, c.id) for c in reg.watch("api", since=kv.revision() - 1, idle_timeout=0.2)
    ] == [("added", "after")]
    final = {i.id: i.address for i in reg.discover("api")}
    assert final == {"after": "h:4", "changed": "h:1", "new": "h:7", "racer": "h:5", "same": "h:6"}


def test_meta_is_json_and_the_document_is_readable(space: Space) -> None:
    space.registry.register("api", "j", "h:1", meta={"n": 1, "l": [1, 2]}, ttl=None)
    raw = space.store.kv.get(PREFIX + "api/j")
    assert raw is not None
    doc = orjson.loads(raw.value)
    assert doc["service"] == "api" and doc["status"] == "passing" and doc["meta"]["l"] == [1, 2]
    space.store.kv.put(PREFIX + "api/garbage", b"not json")  # ignored, never a crash
    assert [i.id for i in space.registry.discover("api")] == ["j"]


def test_http_checks_never_go_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    # a proxy from the maintainer's environment (nothing listens there) is ignored
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached global opener
    with http_server() as base:
        result = run_check(f"{base}/200", 2.0)
    assert (result.status, result.output) == ("passing", "HTTP 200: status 200")


def test_an_instance_the_maintainer_deregistered_does_not_come_back(
    space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="taskspace.registry")
    down = f"tcp://127.0.0.1:{closed_port()}"
    reg = space.registry.register(
        "web", "flap", "h:1", check=down, interval=0.1, timeout=0.5, deregister_after=0.3, ttl=0.6
    )  # heartbeats every 0.2 s
    watcher = Watcher(space, "web")
    try:
        wait_for(lambda: maintain_registry(space) or space.registry.get("web", "flap") is None)
        watcher.expect("removed", "flap")
        wait_for(lambda: not reg.active, timeout=5)  # its next heartbeat saw the tombstone
        deadline = time.monotonic() + 3 * reg.interval  # heartbeats would have run again
        while time.monotonic() < deadline:
            maintain_registry(space)
            assert space.registry.get("web", "flap") is None
            time.sleep(0.05)
        assert reg.rewrites == 0 and not reg.heartbeat() and reg.evicted
        assert not [c for c in watcher.seen if c.kind == "added"]  # no flapping
        assert caplog.text.count("was deregistered by the maintainer") == 1  # logged once
        # registering again is a new incarnation: its heartbeat rewrites it after an expiry
        again = space.registry.register("web", "flap", "h:1", ttl=0.3, heartbeat=False)
        wait_for(lambda: space.registry.get("web", "flap") is None, timeout=5)
        assert again.heartbeat() and again.rewrites == 1 and again.active
        assert space.registry.get("web", "flap") is not None
    finally:
        watcher.close()


def _resumed_ids(space: Space, since: int) -> set[str]:
    return {c.id for c in space.registry.watch("api", since=since, idle_timeout=0.3)
            if c.kind in ("added", "updated")}  # fmt: skip


def test_resuming_from_any_relist_event_loses_none_of_the_rest(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_keep(monkeypatch, space, 3)
    reg, kv = space.registry, space.store.kv
    watch = reg.watch("api")  # knows nothing yet
    for i in range(4):
        reg.register("api", f"i{i}", "h:1", ttl=None)
    for i in range(10):
        kv.put(f"other/{i}", b"x")
    kv.reap()  # the watch's next read raises Compacted: it re-lists
    relist = [next(watch) for _ in range(4)]
    assert sorted(c.id for c in relist) == ["i0", "i1", "i2", "i3"] and all(
        c.relist for c in relist
    )
    # a consumer that stopped after event n and resumes from its revision gets the rest
    for n, change in enumerate(relist):
        rest = {c.id for c in relist[n + 1 :]}
        assert rest <= _resumed_ids(space, change.revision), (n, change)
    assert list(reg.watch("api", since=relist[-1].revision, idle_timeout=0.3)) == []  # the last


def test_resuming_from_any_initial_event_loses_none_of_the_rest(space: Space) -> None:
    reg = space.registry
    for i in range(4):
        reg.register("api", f"i{i}", "h:1", ttl=None)
    reg.register("other", "o", "h:1", ttl=None)
    reg.register("api", "i1", "h:2", ttl=None)  # a later write of an earlier instance
    initial = list(reg.watch("api", initial=True, idle_timeout=0.3))
    assert sorted(c.id for c in initial) == ["i0", "i1", "i2", "i3"]
    for n, change in enumerate(initial):
        rest = {c.id for c in initial[n + 1 :]}
        assert rest <= _resumed_ids(space, change.revision), (n, change)
    assert initial[-1].revision == space.store.kv.revision()  # the last: nothing to replay


def test_a_maintainer_pass_is_bounded_including_its_writes(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.coordination.registry_helpers import SlowStore, listening_port

    count, budget = 60, registry_mod.MAINTAIN_BUDGET_S
    with listening_port() as port:
        for i in range(count):
            space.registry.register("web", f"i{i}", "h:1", check=f"tcp://127.0.0.1:{port}",
                                    interval=0.5, ttl=None, heartbeat=False)  # fmt: skip
        slow = SlowStore(space.store, 0.03)  # 60 writes alone would take 1.8 s
        monkeypatch.setattr(space, "_store", slow)
        passes = []
        while len(space.registry.discover("web")) < count:
            slow.calls.clear()
            start = time.monotonic()
            maintain_registry(space)
            passes.append((time.monotonic() - start, len(slow.calls)))
            assert len(passes) < 10, passes
        slow.calls.clear()
        start = time.monotonic()
        maintain_registry(space)  # every status unchanged: no per-instance call
        unchanged = (time.monotonic() - start, list(slow.calls))
    print(f"\npasses until {count} passing (s, store calls): {passes}; unchanged: {unchanged}")
    assert all(took <= budget + 0.2 for took, _ in passes)  # one store call of overrun
    assert len(unchanged[1]) <= 3 and "get" not in unchanged[1] and "cas" not in unchanged[1]
