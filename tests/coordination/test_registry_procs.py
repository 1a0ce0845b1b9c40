"""Registry fault tests (issue 8, fault test 4) with real processes and
signals: a SIGKILLed instance turns critical and is removed within TTL + check
interval; a pause shorter than the TTL minus one heartbeat interval (ttl/3:
the longest pause a heartbeat every ttl/3 can cover) evicts nothing. Each test
prints its figures (``pytest -s``). Run as a module, this file is the
instance process: ``python -m tests.coordination.test_registry_procs URL ID TTL [serve]``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskspace import Space
from taskspace.backends.base import Versioned
from taskspace.coordination.registry import instance_key, maintain_registry
from tests.coordination.registry_helpers import Watcher, http_server, wait_for

ROOT = Path(__file__).resolve().parents[2]
NOTICE_S = 0.2  # how late a watch may see an expiry (the feed records it at its next read)


def _instance_main(url: str, instance_id: str, ttl: float, serve: bool) -> None:
    space = Space(url)
    if serve:
        with http_server() as base:
            space.registry.register("svc", instance_id, base, ttl=ttl, check=f"{base}/200",
                                    interval=0.2, timeout=0.5)  # fmt: skip
            print("ready", flush=True)
            threading.Event().wait()
    space.registry.register("svc", instance_id, "127.0.0.1:1", ttl=ttl)
    print("ready", flush=True)
    threading.Event().wait()


class Instance:
    """A process that registers one instance and heartbeats until killed."""

    def __init__(self, url: str, instance_id: str, ttl: float, serve: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "tests.coordination.test_registry_procs", url,
                instance_id, str(ttl), "serve" if serve else ""]  # fmt: skip
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _expires(item: Versioned | None) -> float:
    return -1.0 if item is None or item.expires is None else item.expires


@pytest.fixture
def shared_space(space: Space, backend: str) -> Iterator[Space]:
    if backend == "memory":
        pytest.skip("a memory space lives in one process")
    yield space
    space.registry.close()


def test_a_killed_instance_expires_within_its_ttl(shared_space: Space) -> None:
    ttl = 1.0
    watcher = Watcher(shared_space, "svc")
    instance = Instance(shared_space.url, "victim", ttl)
    try:
        watcher.expect("added", "victim")
        instance.signal(signal.SIGKILL)
        killed = time.monotonic()
        watcher.expect("expired", "victim", timeout=ttl + 5)
        elapsed = time.monotonic() - killed
        print(f"\nSIGKILLed instance (no check) removed after {elapsed:.2f} s: bound"
              f" ttl + notice = {ttl + NOTICE_S:g} s")  # fmt: skip
        assert elapsed <= ttl + NOTICE_S
        assert shared_space.registry.discover("svc", healthy_only=False) == []
    finally:
        instance.close()
        watcher.close()


def test_a_pause_shorter_than_the_ttl_evicts_nothing(shared_space: Space) -> None:
    ttl, pauses = 1.5, 3
    pause = ttl - ttl / 3 - 0.2  # heartbeats every ttl/3: up to 1.0 s is covered; 0.2 s margin
    instance = Instance(shared_space.url, "sleeper", ttl)
    watcher = Watcher(shared_space, "svc")
    kv, key = shared_space.store.kv, instance_key("svc", "sleeper")
    first = kv.get(key)
    assert first is not None
    try:
        for _ in range(pauses):
            before = kv.get(key)
            assert before is not None and before.expires is not None
            instance.signal(signal.SIGSTOP)
            time.sleep(pause)  # the pause itself
            instance.signal(signal.SIGCONT)
            # its heartbeat runs again: the TTL moves (a touch), the key was never gone
            wait_for(lambda b=before: _expires(kv.get(key)) > _expires(b), timeout=ttl)
        after = kv.get(key)
        evictions = [c for c in watcher.seen if c.kind in ("expired", "removed")]
        with pytest.raises(AssertionError):
            watcher.expect("expired", "sleeper", timeout=0.3)
        print(f"\n{pauses} SIGSTOP pauses of {pause:.2f} s (ttl {ttl} s, heartbeat every"
              f" {ttl / 3:.2f} s): evictions {len(evictions)}, rewrites"
              f" {0 if after is None else after.version - first.version}")  # fmt: skip
        assert [i.id for i in shared_space.registry.discover("svc")] == ["sleeper"]
        assert not evictions and after is not None and after.version == first.version
    finally:
        instance.close()
        watcher.close()


def test_a_killed_checked_instance_turns_critical_then_is_removed(shared_space: Space) -> None:
    ttl, interval = 1.5, 0.2
    instance = Instance(shared_space.url, "served", ttl, serve=True)
    watcher = Watcher(shared_space, "svc")

    def status() -> str:
        maintain_registry(shared_space)
        inst = shared_space.registry.get("svc", "served")
        return "gone" if inst is None else inst.status

    try:
        wait_for(lambda: status() == "passing", timeout=10)
        instance.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: status() in ("critical", "gone"), timeout=10)
        critical = time.monotonic() - killed
        change = watcher.expect("updated", "served")
        while change.instance is not None and change.instance.status != "critical":
            change = watcher.expect("updated", "served")
        watcher.expect("expired", "served", timeout=ttl + 5)
        removed = time.monotonic() - killed
        print(f"\nSIGKILLed checked instance: critical after {critical:.2f} s, removed after"
              f" {removed:.2f} s: bound ttl + interval = {ttl + interval:g} s")  # fmt: skip
        assert critical <= ttl + interval and removed <= ttl + interval
    finally:
        instance.close()
        watcher.close()


if __name__ == "__main__":
    _instance_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:5] == ["serve"])
