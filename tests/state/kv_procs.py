"""Child processes of the blackboard tests (``python -m tests.state.kv_procs ...``).

- ``update URL WORKDIR KEY N``: wait at the start line (the file WORKDIR/go),
  then ``space.kv.update(KEY, lambda v: v + 1, default=0)`` N times; print
  ``{"n": N, "seconds": ...}``.
- ``write URL PREFIX START N [PAUSE]``: write keys ``PREFIX%06d`` (value: the
  number) from START, each exactly once, also across outages (a txn that
  requires the key absent, retried on BackendError until it answers: a retry
  after a lost reply finds the key and stops; so does a writer restarted
  from START); PAUSE seconds between writes (default 0).

Both open the store before they report ready, so a test can start them all
at once. Helpers for the test process (``spawn``, ``start_line``) are here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from taskspace import Space
from taskspace.errors import BackendError

REPO_ROOT = Path(__file__).resolve().parents[2]
GO_WAIT_S = 30.0


def spawn(*args: str) -> subprocess.Popen[str]:
    """``python -m tests.state.kv_procs *args`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.state.kv_procs", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_line(work: Path, children: list[subprocess.Popen[str]]) -> None:
    """Wait until every child is ready (a ``ready.<pid>`` file), then let them go."""
    deadline = time.monotonic() + GO_WAIT_S
    while len(list(work.glob("ready.*"))) < len(children):
        if time.monotonic() > deadline:
            raise AssertionError("children never got ready")
        for child in children:
            if child.poll() is not None:
                raise AssertionError(f"a child died early: {child.communicate()[1][-2000:]}")
        time.sleep(0.01)
    (work / "go").touch()


def _ready(work: Path) -> None:
    (work / f"ready.{os.getpid()}").touch()
    deadline = time.monotonic() + GO_WAIT_S
    while not (work / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        time.sleep(0.002)


def update_child(url: str, workdir: str, key: str, n: int) -> None:
    space = Space(url)
    space.kv.get(key)  # open the store before the start line
    _ready(Path(workdir))
    start = time.perf_counter()
    for _ in range(n):
        space.kv.update(key, lambda v: v + 1, default=0, timeout=120)
    print(json.dumps({"n": n, "seconds": time.perf_counter() - start}), flush=True)
    space.close()


def write_child(url: str, prefix: str, first: int, n: int, pause: float) -> None:
    space = Space(url)
    for i in range(first, first + n):
        key = f"{prefix}{i:06d}"
        while True:
            try:
                space.kv.txn().require_absent(key).put(key, i).commit()
                break  # written now, or by the attempt whose reply was lost
            except BackendError:
                time.sleep(0.02)
        if pause:
            time.sleep(pause)
    space.close()


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "update":
        update_child(args[0], args[1], args[2], int(args[3]))
    elif mode == "write":
        write_child(
            args[0], args[1], int(args[2]), int(args[3]), float((args[4:5] and args[4]) or 0)
        )
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
