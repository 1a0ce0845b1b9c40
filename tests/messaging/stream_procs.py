"""Child processes of the stream tests (``python -m tests.messaging.stream_procs``).

- ``hold URL WORKDIR N VISIBILITY``: a consumer of group ``g`` of stream
  ``jobs`` claims N messages in one fetch, writes their ids to
  ``WORKDIR/held.json`` and then holds them unacked until it is killed.
- ``drain URL WORKDIR NAME``: a consumer named NAME of group ``g`` waits at
  the start line (``WORKDIR/go``), then fetches and acks until nothing came
  for IDLE_S, and writes the ids it got to ``WORKDIR/NAME.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from taskspace import Space

GO_WAIT_S = 20.0
IDLE_S = 0.5


def hold(url: str, workdir: Path, n: int, visibility: float) -> None:
    space = Space(url)
    consumer = (
        space.stream("jobs")
        .group("g", start="earliest", visibility=visibility)
        .consumer("holder", prefetch=n)
    )
    got = consumer.fetch(n, timeout=10.0)
    (workdir / "held.tmp").write_text(json.dumps([m.id for m in got]))
    (workdir / "held.tmp").rename(workdir / "held.json")
    while True:
        time.sleep(60)  # killed by the test


def drain(url: str, workdir: Path, name: str) -> None:
    space = Space(url)
    consumer = space.stream("jobs").group("g", start="earliest").consumer(name, prefetch=10)
    space.store.kv.get("warm-up")
    (workdir / f"ready.{name}").touch()
    deadline = time.monotonic() + GO_WAIT_S
    while not (workdir / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    ids: list[int] = []
    while True:
        got = consumer.fetch(10, timeout=IDLE_S)
        if not got:
            break
        for msg in got:
            ids.append(msg.id)
            msg.ack()
    consumer.close()
    (workdir / f"{name}.tmp").write_text(json.dumps(ids))
    (workdir / f"{name}.tmp").rename(workdir / f"{name}.json")
    space.close()


if __name__ == "__main__":
    mode, url, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "hold":
        hold(url, work, int(sys.argv[4]), float(sys.argv[5]))
    else:
        drain(url, work, sys.argv[4])
