"""Three processes share a GPU semaphore and a rate-limited model; one elected
process writes a report every second.

Each worker process opens the same space (SQLite in a temporary directory; a
redis:// URL works the same across machines) and runs JOBS jobs: it holds one
of the GPU_SLOTS slots of the semaphore "gpu" for a short "inference", then
calls a "model" (a local function with a delay) behind the global rate limit
"model" (burst 1: calls spaced evenly). Every process also campaigns in the
election "reporter"; the leader writes a report every second, fenced by its
term, and steps down after two so that another process takes over.

The parent prints who held the GPU when, the rate the model saw and who led,
and exits 1 unless the GPU never had more than GPU_SLOTS holders and the model
calls kept to the rate. Run: python examples/coordination.py
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from typing import Any

from taskspace import LockTimeout, Space

WORKERS = 3
JOBS = 6
GPU_SLOTS = 2
GPU_S = 0.15  # one "inference" on the GPU
RATE, PER_S = 8, 1.0  # the model's budget: 8 calls a second, burst 1
REPORT_EVERY_S = 1.0
REPORTS_PER_TERM = 2


def model(x: int) -> int:
    """The rate-limited "model": a local function with a delay."""
    time.sleep(0.02)
    return x * x


def reporter(space: Space, who: str, stop: threading.Event, out: Any) -> None:
    """Campaign for "reporter"; while leading, report every second (a fenced write)."""
    election = space.election("reporter")
    while not stop.is_set():
        try:
            term = election.campaign(identity=who, ttl=2.0, wait=0.5)
        except LockTimeout:
            continue  # someone else leads: campaign again
        with term:  # resigns on exit: the next candidate in line leads at once
            for _ in range(REPORTS_PER_TERM):
                if not term.active or stop.is_set():
                    break
                jobs = space.kv.get("example/jobs", 0)
                space.kv.put("example/report", {"jobs": jobs, "by": who}, fence=term.lease)
                out.put(("report", who, term.number, jobs, time.monotonic()))
                stop.wait(REPORT_EVERY_S)
        stop.wait(0.2)  # let a waiting candidate take over


def worker(url: str, index: int, out: Any) -> None:
    space = Space(url)
    who = f"worker-{index}:{os.getpid()}"
    gpu = space.semaphore("gpu", limit=GPU_SLOTS, ttl=5)
    limiter = space.rate_limit("model", rate=f"{RATE}/{PER_S:g}s", burst=1)
    stop = threading.Event()
    thread = threading.Thread(target=reporter, args=(space, who, stop, out))
    thread.start()
    try:
        for job in range(JOBS):
            with gpu as lease:
                began = time.monotonic()
                time.sleep(GPU_S)  # the GPU work
                out.put(("gpu", who, lease.token, began, time.monotonic()))
            with limiter.acquire(wait=30) as permit:
                model(job)
                out.put(("model", who, permit.admitted_at))
            space.kv.incr("example/jobs")
    finally:
        stop.set()
        thread.join()
        space.close()
        out.put(("done", who))


def max_holders(holds: list[tuple[float, float]]) -> int:
    """The most GPU intervals open at one instant."""
    edges = sorted([(b, 1) for b, _ in holds] + [(e, -1) for _, e in holds])
    most = now = 0
    for _, step in edges:  # an end sorts before a begin at the same instant
        now += step
        most = max(most, now)
    return most


def busiest_window(stamps: list[float], width: float) -> int:
    """The most model calls admitted within any ``width`` seconds."""
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps[i:] if t < s + width) for i, s in enumerate(stamps))


def main() -> int:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="taskspace-coordination-") as tmp:
        url = f"sqlite:///{tmp}/space.db"
        start = time.monotonic()
        procs = [ctx.Process(target=worker, args=(url, i + 1, out)) for i in range(WORKERS)]
        for p in procs:
            p.start()
        messages: list[tuple[Any, ...]] = []
        while sum(1 for m in messages if m[0] == "done") < WORKERS:
            messages.append(out.get(timeout=60))
        for p in procs:
            p.join(10)
    holds = [m for m in messages if m[0] == "gpu"]
    print(f"GPU (semaphore, limit {GPU_SLOTS}):")
    for _, who, token, began, ended in sorted(holds, key=lambda m: m[3]):
        print(f"  {began - start:6.2f}-{ended - start:5.2f} s  {who}  (token {token})")
    most = max_holders([(m[3], m[4]) for m in holds])
    print(f"most GPU holders at once: {most} (limit {GPU_SLOTS})")

    stamps = [m[2] for m in messages if m[0] == "model"]
    span = max(stamps) - min(stamps)
    busiest = busiest_window(stamps, PER_S)
    allowed = RATE + 1  # rate x window + burst
    print(f"model: {len(stamps)} calls in {span:.2f} s = {(len(stamps) - 1) / span:.1f}/s"
          f" (limit {RATE}/s, burst 1); busiest {PER_S:g} s: {busiest} calls"
          f" (allowed {allowed})")  # fmt: skip

    for _, who, term, jobs, at in (m for m in messages if m[0] == "report"):
        print(f"report at {at - start:5.2f} s by {who} (term {term}): {jobs} jobs done")
    leaders = dict.fromkeys(m[1] for m in messages if m[0] == "report")
    print("leaders in turn:", ", ".join(leaders))

    ok = most <= GPU_SLOTS and busiest <= allowed and len(holds) == WORKERS * JOBS
    print("OK" if ok else "VIOLATION")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
