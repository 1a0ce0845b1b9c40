"""Workers in the registry: announce is a touch unless the worker's info
changed, load changes are written at most every LOAD_WRITE_MIN_S, and
live_workers keeps returning the info dicts (with health)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import orjson
import pytest

from taskspace import Space
from taskspace.coordination.registry import WORKER_SERVICE
from taskspace.worker import registry as workers
from taskspace.worker.config import WorkerConfig
from taskspace.worker.worker import Worker
from tests.coordination.registry_helpers import http_server, wait_for


@pytest.fixture(autouse=True)
def _close_registry(space: Space) -> Iterator[None]:
    """Registrations a test left behind stop heartbeating with the test."""
    yield
    space.registry.close()


def _info(name: str, **changes: object) -> dict[str, object]:
    info: dict[str, object] = {"name": name, "host": "h", "pid": 1, "queues": ["default"],
                               "tasks": ["app.add"], "concurrency": 4, "running": 0,
                               "started": 1.0, "succeeded": 0, "failed": 0}  # fmt: skip
    info.update(changes)
    return info


def test_announce_touches_unless_the_info_changed(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, kv = space.store, space.store.kv
    workers.announce(store, "w1", _info("w1"), ttl=30)
    revision = kv.revision()
    workers.announce(store, "w1", _info("w1"), ttl=30)
    workers.announce(store, "w1", _info("w1", running=3, succeeded=7), ttl=30)  # load: touch
    assert kv.revision() == revision
    workers.announce(store, "w1", _info("w1", queues=["a", "b"]), ttl=30)  # stable: a write
    assert kv.revision() > revision
    revision = kv.revision()
    monkeypatch.setattr(workers, "LOAD_WRITE_MIN_S", 0.0)
    workers.announce(store, "w1", _info("w1", queues=["a", "b"], running=2), ttl=30)
    assert kv.revision() > revision  # the load, once LOAD_WRITE_MIN_S has passed
    (info,) = workers.live_workers(store)
    assert info["running"] == 2 and info["queues"] == ["a", "b"] and info["health"] == "passing"
    (inst,) = space.registry.discover(WORKER_SERVICE)
    assert inst.id == "w1" and inst.tags == ("queue:a", "queue:b") and inst.meta["tasks"]
    workers.withdraw(store, "w1")
    assert workers.live_workers(store) == []


def test_announce_rewrites_an_expired_entry(space: Space) -> None:
    workers.announce(space.store, "w2", _info("w2"), ttl=0.2)
    wait_for(lambda: workers.live_workers(space.store) == [])
    workers.announce(space.store, "w2", _info("w2"), ttl=30)  # the touch finds nothing: a put
    assert [w["name"] for w in workers.live_workers(space.store)] == ["w2"]
    workers.withdraw(space.store, "w2")


def test_odd_worker_names_and_legacy_entries(space: Space) -> None:
    workers.announce(space.store, "a b/c", _info("a b/c"), ttl=30)
    space.store.kv.put("taskspace/workers/old", orjson.dumps(_info("old")), ttl=30)
    assert sorted(w["name"] for w in workers.live_workers(space.store)) == ["a b/c", "old"]
    workers.withdraw(space.store, "a b/c")
    workers.withdraw(space.store, "old")
    assert workers.live_workers(space.store) == []


def test_a_running_worker_is_a_registry_instance(space: Space) -> None:
    worker = Worker(space, WorkerConfig(concurrency=2, install_signal_handlers=False))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        (inst,) = wait_for(lambda: space.registry.discover(WORKER_SERVICE))
        assert inst.meta["name"] == worker.name and inst.meta["concurrency"] == 2
        assert inst.status == "passing" and "queue:default" in inst.tags
    finally:
        worker.stop(grace=1)
        thread.join(10)
    assert space.registry.discover(WORKER_SERVICE, healthy_only=False) == []


def test_the_elected_maintainer_of_running_workers_runs_the_checks(space: Space) -> None:
    with http_server() as base:
        space.registry.register("web", "w", base, check=f"{base}/200", interval=0.2, ttl=None)
        worker = Worker(space, WorkerConfig(concurrency=1, install_signal_handlers=False))
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            (inst,) = wait_for(lambda: space.registry.discover("web"), timeout=15)
            assert inst.output == "HTTP 200: status 200"
        finally:
            worker.stop(grace=1)
            thread.join(10)
