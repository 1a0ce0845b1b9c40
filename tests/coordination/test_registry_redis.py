"""A registry watch and heartbeats across a restart of a private Redis (AOF
always): the watch resumes from its revision and misses nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from taskspace import Space
from tests.coordination.registry_helpers import Watcher, wait_for
from tests.services import RedisServer


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis = RedisServer(appendfsync="always").start()
    yield redis
    redis.close()


def test_watch_and_heartbeats_survive_a_redis_restart(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskspace.registry")
    space = Space(server.namespaced_url())
    watcher = Watcher(space, "svc")
    try:
        space.registry.register("svc", "a", "h:1", ttl=3.0)
        watcher.expect("added", "a")
        server.kill()  # SIGKILL; AOF always: every acknowledged write is on disk
        server.restart()
        # written after the restart: the watch reconnects and follows from its revision
        space.registry.register("svc", "b", "h:2", ttl=3.0)
        space.registry.deregister("svc", "a")
        watcher.expect("added", "b")
        watcher.expect("removed", "a")
        assert [i.id for i in space.registry.discover("svc")] == ["b"]
        assert not [c for c in watcher.seen if c.kind == "expired"]  # heartbeats carried on
    finally:
        watcher.close()
        space.registry.close()
        space.close()


def test_watch_backs_off_while_redis_is_down(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskspace.registry")
    space = Space(server.namespaced_url())
    space.registry.register("svc", "a", "h:1", ttl=None)
    watcher = Watcher(space, "svc")
    try:
        server.stop()
        # the watch's next wait fails: logged and retried with backoff, never raised
        wait_for(lambda: "registry watch:" in caplog.text, timeout=10)
        server.restart()
        space.registry.register("svc", "c", "h:3", ttl=None)
        watcher.expect("added", "c")
    finally:
        watcher.close()
        space.close()


def test_watch_with_idle_timeout_ends_on_time_while_redis_is_down(server: RedisServer) -> None:
    import time

    from taskspace.errors import BackendError

    idle = 1.0
    space = Space(server.namespaced_url())
    try:
        space.registry.register("svc", "a", "h:1", ttl=None)
        watch = space.registry.watch("svc", idle_timeout=idle)
        server.stop()
        start = time.monotonic()
        assert list(watch) == []  # ends: no change for idle_timeout, outage or not
        ended = time.monotonic() - start
        start = time.monotonic()
        with pytest.raises(BackendError, match="could not read its start"):
            space.registry.watch("svc", idle_timeout=idle)  # the call never blocks past it
        refused = time.monotonic() - start
        print(f"\nwhile Redis is down: watch ended after {ended:.2f} s, watch() raised after"
              f" {refused:.2f} s (idle_timeout {idle} s)")  # fmt: skip
        assert ended <= idle + 0.5 and refused <= idle + 0.5
    finally:
        space.close()
