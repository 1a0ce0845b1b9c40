"""Child processes of the cache and memo tests (``python -m tests.state.cache_procs
<mode> <json args>``), and the parent's helpers to run them.

Every child opens its own Space on the URL, touches ``ready.<pid>`` in the
work directory once warmed up, waits for the ``go`` file (so that all
children start at once) and prints one JSON line as its report.

- ``writer``: writes versions 1..n of one key, each followed by a line
  ``<key> <version> <monotonic time the write returned>`` in ``writes.log``.
- ``reader``: reads its keys in a tight loop until ``stop`` exists; reports,
  per key and value, the start time of the last read that returned it.
  ``canary``: the listener applies nothing (the detector must bite).
- ``hold``: fills L1, then waits for ``go2`` (the parent SIGSTOPs it
  meanwhile), reads again and reports the value and the cache's stats.
- ``memo``: calls a memoized function that counts its runs in the KV and
  sleeps ``sleep`` seconds; reports the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from taskspace import Space

REPO_ROOT = Path(__file__).resolve().parents[2]
GO_WAIT_S = 20.0


def _wait_for(path: Path, timeout: float = GO_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.002)


def _ready(work: Path) -> None:
    (work / f"ready.{os.getpid()}").touch()
    _wait_for(work / "go")


def writer(space: Space, work: Path, a: dict[str, Any]) -> dict[str, Any]:
    cache = space.cache(a["cache"], max_stale=a["max_stale"])
    cache.set(a["key"], 0)
    _ready(work)
    log = os.open(work / "writes.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for version in range(1, a["n"] + 1):
        cache.set(a["key"], version)
        done = time.monotonic()
        os.write(log, f"{a['key']} {version} {done!r}\n".encode())
        time.sleep(a["interval"])
    os.close(log)
    return {"written": a["n"]}


def reader(space: Space, work: Path, a: dict[str, Any]) -> dict[str, Any]:
    cache = space.cache(a["cache"], max_stale=a["max_stale"])
    if a.get("canary"):
        cache._apply = lambda changes: None  # type: ignore[method-assign]
    keys = a["keys"]
    for key in keys:
        cache.get(key)
    _ready(work)
    last: dict[str, dict[int, float]] = {key: {} for key in keys}
    stop = work / "stop"
    reads = 0
    while True:
        for key in keys:
            start = time.monotonic()
            value = cache.get(key)
            if value is not None:
                seen = last[key]
                seen[value] = start
        reads += len(keys)
        if reads % 64 == 0:
            if stop.exists():
                break
            time.sleep(0.001)  # leave the 2 cores of a CI box to the writers now and then
    stats = cache.stats()
    return {"last": last, "reads": reads, "l1_hits": stats.l1_hits, "l2_hits": stats.l2_hits,
            "invalidations": stats.invalidations}  # fmt: skip


def hold(space: Space, work: Path, a: dict[str, Any]) -> dict[str, Any]:
    cache = space.cache(a["cache"], max_stale=a["max_stale"])
    deadline = time.monotonic() + 10
    while cache.stats().l1_hits == 0:  # until L1 serves the value
        assert time.monotonic() < deadline, "L1 never served"
        cache.get(a["key"])
        time.sleep(0.01)
    before = cache.stats().resets
    (work / f"ready.{os.getpid()}").touch()
    _wait_for(work / "go2")
    time.sleep(a["settle"])
    value = cache.get(a["key"])
    deadline = time.monotonic() + 10
    while cache.stats().resets == before and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = cache.stats()
    return {"value": value, "resets_before": before, "resets": stats.resets}


def memo(space: Space, work: Path, a: dict[str, Any]) -> dict[str, Any]:
    @space.cached(ttl=60, name="procs.slow", lease_ttl=a["lease_ttl"], wait=a["wait"])
    def slow(x: int) -> int:
        space.kv.incr("calls")
        (work / f"computing.{os.getpid()}").touch()
        time.sleep(a["sleep"])
        return x * 2

    space.kv.get("warm-up")
    _ready(work)
    start = time.monotonic()
    result = slow(a["x"])
    return {"result": result, "elapsed": time.monotonic() - start, "pid": os.getpid()}


MODES = {"writer": writer, "reader": reader, "hold": hold, "memo": memo}


def main() -> None:
    mode, url, workdir, raw = sys.argv[1:5]
    space = Space(url)
    try:
        report = MODES[mode](space, Path(workdir), json.loads(raw))
    finally:
        space.close()
    print(json.dumps(report), flush=True)


# -- the parent's side -------------------------------------------------------------


def spawn(mode: str, url: str, work: Path, **args: Any) -> subprocess.Popen[str]:
    """Start one child (it waits for ``go``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.state.cache_procs", mode, url, str(work), json.dumps(args)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(work: Path, children: list[subprocess.Popen[str]], n: int | None = None) -> None:
    """Block until ``n`` (default: all) children touched their ready file."""
    want = len(children) if n is None else n
    deadline = time.monotonic() + GO_WAIT_S
    while len(list(work.glob("ready.*"))) < want:
        for child in children:
            if child.poll() is not None:
                raise AssertionError(f"a child died early: {child.communicate()[1]}")
        assert time.monotonic() < deadline, "children never got ready"
        time.sleep(0.01)


def report(child: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The child's JSON report (it must exit 0)."""
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def kill_all(children: list[subprocess.Popen[str]]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
        if child.returncode is None or not (child.stdout is None or child.stdout.closed):
            child.communicate()


if __name__ == "__main__":
    main()
