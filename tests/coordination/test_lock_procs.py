"""Locks and semaphores across real processes (SQLite and Redis; memory is
one process only): mutual exclusion, a semaphore's limit under 8 processes,
tokens strictly increasing in acquisition order, and a canary showing the
overlap detector bites when nothing excludes.

Each child waits at a start line (a file) so that all of them contend at
once, enters the critical section ``n`` times, and reports how many others
it saw inside with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from taskspace import Space

REPO_ROOT = Path(__file__).resolve().parents[2]
GO_WAIT_S = 15.0


def _child(url: str, workdir: str, mode: str, n: int, limit: int) -> None:
    space = Space(url)
    work = Path(workdir)
    inside = work / "inside"
    if mode == "lock":
        guard: Any = space.lock("mutex", ttl=5, wait=20)
    elif mode == "sem":
        guard = space.semaphore("pool", limit, ttl=5, wait=20)
    else:
        guard = None
    space.store.leases.holders("warm-up")  # open the store before the start line
    (work / f"ready.{os.getpid()}").touch()
    deadline = time.monotonic() + GO_WAIT_S
    while not (work / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    log = os.open(work / "tokens.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    violations = 0
    for i in range(n):
        lease = guard.__enter__() if guard is not None else None
        me = inside / f"{os.getpid()}.{i}"
        me.touch()
        if len(os.listdir(inside)) > limit:
            violations += 1
        if lease is not None:
            os.write(log, f"{lease.token}\n".encode())
        time.sleep(0.002)
        me.unlink()
        if guard is not None:
            guard.__exit__(None, None, None)
    print(json.dumps({"violations": violations, "n": n}), flush=True)


def run_children(url: str, work: Path, mode: str, procs: int, n: int, limit: int) -> list[Any]:
    (work / "inside").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [url, str(work), mode, str(n), str(limit)]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.coordination.test_lock_procs", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    try:
        deadline = time.monotonic() + GO_WAIT_S
        while len(list(work.glob("ready.*"))) < procs:
            assert time.monotonic() < deadline, "children never got ready"
            assert all(c.poll() is None for c in children), "a child died early"
            time.sleep(0.01)
        (work / "go").touch()
        reports = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        pytest.skip("the memory backend lives in one process")
    from tests.conftest import backend_url

    space = Space(backend_url(backend, tmp_path))
    space.store.leases.holders("create")  # create the space before the children open it
    url = space.url
    space.close()
    return url


def test_lock_excludes_across_processes(url: str, tmp_path: Path) -> None:
    procs, n = 6, 30
    reports = run_children(url, tmp_path / "w", "lock", procs, n, limit=1)
    violations = sum(r["violations"] for r in reports)
    tokens = [int(t) for t in (tmp_path / "w" / "tokens.log").read_text().split()]
    print(f"lock: {procs} processes x {n} acquisitions, overlaps={violations}")
    assert violations == 0
    assert len(tokens) == procs * n
    assert tokens == sorted(set(tokens)), "tokens strictly increase in acquisition order"


def test_semaphore_never_exceeds_its_limit(url: str, tmp_path: Path) -> None:
    procs, n, limit = 8, 20, 3
    reports = run_children(url, tmp_path / "w", "sem", procs, n, limit)
    violations = sum(r["violations"] for r in reports)
    print(f"semaphore limit {limit}: {procs} processes x {n} acquisitions, violations={violations}")
    assert violations == 0
    assert len((tmp_path / "w" / "tokens.log").read_text().split()) == procs * n


def test_canary_overlaps_without_a_lock(url: str, tmp_path: Path) -> None:
    """The detector is real: the same run with no lock sees others inside."""
    reports = run_children(url, tmp_path / "w", "none", 4, 40, limit=1)
    overlaps = sum(r["violations"] for r in reports)
    print(f"canary without a lock: overlaps={overlaps}")
    assert overlaps > 0


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
