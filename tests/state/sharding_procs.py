"""Child processes for tests/state/test_sharding.py (``python -m tests.state.sharding_procs``).

- ``writer <coord> <workdir> <keys>``: writes ``k0..k<keys-1>`` round robin
  with increasing values through ShardedKV (even keys with ``put``, odd ones
  with ``update``, a cas loop) until ``<workdir>/stop`` exists, and after each
  write reads a random key it wrote before, which must hold exactly its last
  acknowledged value; prints JSON ``{"last": {key: last acknowledged value},
  "writes": n, "checks": n, "stale": [...], "errors": [...], "map_versions":
  [first, last]}``.
- ``reader <coord> <workdir> <keys>``: reads the keys round robin until
  ``stop`` and counts a value going backwards (a stale read) per key; prints
  JSON ``{"reads": n, "backwards": n, "errors": [...]}``.
- ``rebalance <coord> <workdir> <step> <nth>``: runs ``rebalance()`` with a
  tiny batch and, at the ``nth`` time step ``step`` is reached, touches
  ``<workdir>/at-step`` and sleeps until killed (the test SIGKILLs it there).

Each child touches ``<workdir>/ready.<role>.<pid>`` once its ShardedKV is open.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from taskspace.errors import TaskspaceError
from taskspace.state.sharding import ShardedKV
from taskspace.state.slots import Move

RUN_LIMIT_S = 60.0


def _ready(work: Path, role: str) -> None:
    (work / f"ready.{role}.{os.getpid()}").touch()


def writer(coord: str, work: Path, keys: int) -> dict[str, Any]:
    kv = ShardedKV(coordinator=coord, wait=20.0)
    first = kv.map_version
    last: dict[str, int] = {}
    errors: list[str] = []
    stale: list[str] = []
    checks = 0
    value = 0
    _ready(work, "writer")
    deadline = time.monotonic() + RUN_LIMIT_S
    stop = work / "stop"
    while not stop.exists() and time.monotonic() < deadline:
        key = f"k{value % keys}"
        value += 1
        try:
            if value % 2:
                kv.update(key, lambda _old, v=value: v)
            else:
                kv.put(key, value)
        except TaskspaceError as exc:  # outcome unknown: recorded, and the test fails
            errors.append(f"{key}={value}: {type(exc).__name__}: {exc}")
            continue
        last[key] = value
        check = f"k{random.randrange(keys)}"  # only this process writes: it must read its last
        if check in last:
            try:
                seen = kv.get(check)
            except TaskspaceError as exc:
                errors.append(f"read {check}: {type(exc).__name__}: {exc}")
                continue
            checks += 1
            if seen != last[check]:
                stale.append(f"{check}: read {seen}, last written {last[check]}")
    result = {"last": last, "writes": value, "errors": errors, "checks": checks,
              "stale": stale, "map_versions": [first, kv.map_version]}  # fmt: skip
    kv.close()
    return result


def reader(coord: str, work: Path, keys: int) -> dict[str, Any]:
    kv = ShardedKV(coordinator=coord, wait=20.0)
    seen: dict[str, int] = {}
    reads = backwards = 0
    errors: list[str] = []
    _ready(work, "reader")
    deadline = time.monotonic() + RUN_LIMIT_S
    stop = work / "stop"
    i = 0
    while not stop.exists() and time.monotonic() < deadline:
        key = f"k{i % keys}"
        i += 1
        try:
            value = kv.get(key)
        except TaskspaceError as exc:
            errors.append(f"{key}: {type(exc).__name__}: {exc}")
            continue
        reads += 1
        if value is not None:
            if value < seen.get(key, 0):
                backwards += 1
            seen[key] = max(value, seen.get(key, 0))
        elif key in seen:
            backwards += 1  # a key once seen never disappears in this test
    kv.close()
    return {"reads": reads, "backwards": backwards, "errors": errors}


def rebalance_until(coord: str, work: Path, step: str, nth: int) -> None:
    kv = ShardedKV(coordinator=coord)
    count = 0

    def on_step(name: str, move: Move) -> None:
        nonlocal count
        if name == step:
            count += 1
            if count == nth:
                (work / "at-step").touch()
                time.sleep(RUN_LIMIT_S)  # killed here

    _ready(work, "rebalance")
    kv.rebalance(batch_slots=256, lock_ttl=1.0, on_step=on_step)


if __name__ == "__main__":
    role, coordinator, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if role == "writer":
        print(json.dumps(writer(coordinator, workdir, int(sys.argv[4]))), flush=True)
    elif role == "reader":
        print(json.dumps(reader(coordinator, workdir, int(sys.argv[4]))), flush=True)
    elif role == "rebalance":
        rebalance_until(coordinator, workdir, sys.argv[4], int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown role {role!r}")
