"""Issue 8 fault test 6: fencing tokens never regress across a backend restart.

- SQLite: the process creating grants is SIGKILLed in the middle of
  acquiring and a new process takes over, several times; every token any of
  them printed is above every token printed before it.
- Redis with AOF (``appendonly yes``, ``appendfsync always``): a private
  redis-server is SIGKILLed while a client acquires in a loop and restarted
  from its AOF; every token after the restart is above every token before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskspace import BackendError, Space
from tests.faults.harness import FIGURES, REPO_ROOT, wait_for
from tests.services import RedisServer

pytestmark = pytest.mark.fault

TTL_S = 0.5
RESTARTS = 3


def _child(url: str, out: str) -> None:
    """Acquire and release ``lock/fence`` as fast as it can, printing each token."""
    space = Space(url)
    lock = space.lock("fence", ttl=TTL_S)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    while True:
        lease = lock.acquire(wait=2.0)
        if lease is None:
            continue
        os.write(fd, f"{os.getpid()} {lease.token}\n".encode())
        lease.release()


def _tokens(path: Path) -> list[tuple[int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        pid, _, token = line.partition(" ")
        if token:
            rows.append((int(pid), int(token)))
    return rows


def regressions(tokens: list[int]) -> int:
    """Tokens not above every token before them."""
    top, bad = 0, 0
    for token in tokens:
        if token <= top:
            bad += 1
        top = max(top, token)
    return bad


def test_sqlite_tokens_increase_across_process_restarts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/space.db"
    Space(url).store.leases.holders("lock/fence")  # create the space
    out = tmp_path / "tokens.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    seen_before: list[int] = []
    for _ in range(RESTARTS + 1):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.test_tokens_restart", url, str(out)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            count = len(_tokens(out)) if out.exists() else 0
            wait_for(lambda c=count: out.exists() and len(_tokens(out)) >= c + 20, 10.0,
                     "the child to acquire 20 times")  # fmt: skip
            time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)  # in the middle of acquiring, releasing or renewing
            child.wait()
        seen_before = [token for _, token in _tokens(out)]
    rows = _tokens(out)
    tokens = [token for _, token in rows]
    pids = list(dict.fromkeys(pid for pid, _ in rows))
    firsts = [next(t for p, t in rows if p == pid) for pid in pids]
    lasts = [[t for p, t in rows if p == pid][-1] for pid in pids]
    bad = regressions(tokens)
    figure = (
        f"tokens across restarts [sqlite]: {len(pids)} processes SIGKILLed in turn while"
        f" acquiring, {len(tokens)} tokens; each restart's first token minus the previous"
        f" process's last: {[f - last for f, last in zip(firsts[1:], lasts, strict=False)]};"
        f" regressions={bad}"
    )
    print(figure)
    FIGURES.append(figure)
    assert len(pids) == RESTARTS + 1 and seen_before
    assert bad == 0
    assert len(set(tokens)) == len(tokens)


def _acquire_tokens(space: Space, n: int, deadline: float) -> list[int]:
    """``n`` tokens of ``lock/fence``, riding out a server that is still starting."""
    tokens: list[int] = []
    lock = space.lock("fence", ttl=TTL_S)
    while len(tokens) < n:
        assert time.monotonic() < deadline, "the restarted server never answered"
        try:
            lease = lock.acquire(wait=1.0)
        except BackendError:
            time.sleep(0.05)
            continue
        if lease is None:
            continue
        tokens.append(lease.token)
        with contextlib.suppress(BackendError):
            lease.release()
    return tokens


def test_redis_aof_tokens_increase_across_server_kill(tmp_path: Path) -> None:
    server = RedisServer(appendfsync="always").start()
    try:
        url = server.namespaced_url()
        deadline = time.monotonic() + 15.0
        all_tokens: list[int] = []
        jumps: list[int] = []
        for _ in range(RESTARTS):
            space = Space(url)
            before = _acquire_tokens(space, 30, deadline)
            held = space.lock("held", ttl=TTL_S).acquire(wait=0)  # a grant alive at the kill
            assert held is not None
            server.kill()
            space.close()
            server.restart()
            space = Space(url)
            after = _acquire_tokens(space, 30, deadline)
            taken = space.lock("held", ttl=5).acquire(wait=2 * TTL_S + 1)
            assert taken is not None and taken.token > held.token
            taken.release()
            space.close()
            jumps.append(after[0] - before[-1])
            all_tokens += [*before, held.token, *after]
            assert min(after) > max(before), (before[-3:], after[:3])
        bad = regressions(all_tokens)
        figure = (
            f"tokens across restarts [redis AOF appendfsync=always]: {RESTARTS} SIGKILLs of the"
            f" server, {len(all_tokens)} tokens; first after minus last before: {jumps};"
            f" regressions={bad}"
        )
        print(figure)
        FIGURES.append(figure)
        assert bad == 0
    finally:
        server.close()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
