"""The task app the fault-injection tests run in real worker processes.

Workers load it as ``tests.faults.app:make_space`` (through the CLI) or through
:mod:`tests.faults.runner`. Every attempt of every task leaves marker files in
a directory passed as its first argument: ``<task id>.<token>.<event>`` holding
the pid that wrote it. Markers live outside the store under test, so they are
an independent record of what really ran (and they work on any backend).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskspace import Space, current_task

LEASE_S = 1.0
STEP_S = 0.02


def mark(marks: str, event: str, **extra: Any) -> None:
    """Leave a marker for the current attempt: ``<id>.<token>.<event>`` holding the pid."""
    ctx = current_task()
    body = " ".join([str(os.getpid()), *(f"{k}={v}" for k, v in sorted(extra.items()))])
    final = Path(marks) / f"{ctx.id}.{ctx.fencing_token}.{event}"
    partial = final.with_name(final.name + ".part")
    partial.write_text(body)
    partial.rename(final)  # atomic: a reader never sees a half-written marker


def _duration(marks: str, first_s: float, then_s: float) -> float:
    """``first_s`` for the first run of this task, ``then_s`` once an earlier run left a
    marker (the attempt counter is no guide: a released claim does not count)."""
    ctx = current_task()
    mine = f"{ctx.id}.{ctx.fencing_token}.start"
    earlier = any(p.name != mine for p in Path(marks).glob(f"{ctx.id}.*.start"))
    return then_s if earlier else first_s


def _attempt_result() -> dict[str, Any]:
    ctx = current_task()
    return {"pid": os.getpid(), "token": ctx.fencing_token, "attempt": ctx.attempt}


def work(marks: str, first_s: float, then_s: float) -> dict[str, Any]:
    """Sleep ``first_s`` on the first run and ``then_s`` on later ones (not cooperative:
    ignores cancellation, like a task stuck in a C call); returns who ran it."""
    mark(marks, "start")
    time.sleep(_duration(marks, first_s, then_s))
    mark(marks, "end")
    return _attempt_result()


def cooperative(marks: str, first_s: float, then_s: float) -> dict[str, Any]:
    """Like :func:`work`, but stops early (raising TaskCancelled) once cancelled."""
    mark(marks, "start")
    ctx = current_task()
    deadline = time.monotonic() + _duration(marks, first_s, then_s)
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(STEP_S)
    mark(marks, "end")
    return _attempt_result()


def spin(marks: str, first_s: float, then_s: float) -> dict[str, Any]:
    """Like :func:`cooperative`, but checks the flag in a tight loop (no sleep), so it
    stops the instant the flag turns on."""
    mark(marks, "start")
    ctx = current_task()
    deadline = time.monotonic() + _duration(marks, first_s, then_s)
    while time.monotonic() < deadline:
        ctx.check_cancelled()
    mark(marks, "end")
    return _attempt_result()


def square(marks: str, x: int, sleep_s: float) -> dict[str, Any]:
    """The soak task: records the attempt, works a little, returns x squared and who ran it."""
    mark(marks, "start")
    time.sleep(sleep_s)
    result = {"x": x, "square": x * x, **_attempt_result()}
    mark(marks, "end")
    return result


def hang(marks: str, seconds: float) -> int:
    """Runs in a forked child (isolation=process): records the child's pid, then hangs."""
    mark(marks, "start")
    time.sleep(seconds)
    mark(marks, "end")
    return os.getpid()


def make_space(url: str | None = None) -> Space:
    """A Space with the fault tasks registered (``url`` None: ``$TASKSPACE_URL``)."""
    space = Space(url)
    space.task(work, name="faults.work", lease=LEASE_S, max_attempts=3)
    space.task(cooperative, name="faults.cooperative", lease=LEASE_S, max_attempts=3)
    space.task(spin, name="faults.spin", lease=LEASE_S, max_attempts=5, retry_backoff=0.0)
    space.task(square, name="faults.square", lease=LEASE_S, max_attempts=25, retry_backoff=0.0)
    space.task(
        hang,
        name="faults.hang",
        lease=LEASE_S,
        timeout=0.5,
        max_attempts=2,
        retry_backoff=0.0,
        isolation="process",
    )
    # The same functions under other options, for the scenarios that need them.
    space.task(hang, name="faults.hang_untimed", lease=LEASE_S, max_attempts=3, isolation="process")
    space.task(work, name="faults.work_timeout", lease=LEASE_S, timeout=0.2, max_attempts=1)
    space.task(work, name="faults.once", lease=LEASE_S, max_attempts=1)
    # A lease that outlives a short backend outage: its outcome must wait, not be lost.
    space.task(work, name="faults.long_lease", lease=10.0, max_attempts=1)
    return space
