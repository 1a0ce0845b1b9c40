"""Huey: RedisHuey (blocking BRPOP dequeue), ``huey_consumer -k process -w 2``.

Huey pops a task off the queue before running it: a worker that dies mid-task loses
it (at-most-once). Variants: ``default`` (a waiting ``Result.get(blocking=True)`` polls
the result hash every 50 ms) and ``notify`` (``notify_result=True``: the worker pushes a
notification the waiter BLPOPs).
"""

from __future__ import annotations

from typing import Any

from huey import RedisHuey  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import (
    PeerError,
    Recorder,
    chunks,
    python_module,
    redis_url,
    time_each,
    variant,
)

RECORDER = Recorder()
VARIANTS = ("default", "notify")
huey: Any = RedisHuey("bench", url=redis_url(), notify_result=variant() == "notify")


def noop(x: int) -> int:
    RECORDER.mark()
    return x


noop_task: Any = huey.task(name="noop")(noop)


class HueyPeer:
    batch_api = "task.map(items): one LPUSH per task (no bulk enqueue)"
    record_mode = "process"

    def __init__(self, variant: str) -> None:
        if variant not in VARIANTS:
            raise PeerError(f"unknown Huey variant {variant!r}; valid: {', '.join(VARIANTS)}")
        notify = variant == "notify"
        self.label = "huey-notify" if notify else "huey"
        self.config = "-k process -w {n}, RedisHuey" + (", notify_result=True" if notify else "")
        self.notes = (
            "at-most-once (task popped before it runs)",
            "result wait: BLPOP on a notify key" if notify else "result wait polls every 50 ms",
        )

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            noop_task(i)

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            noop_task.map(part)

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        return time_each(n, lambda i: noop_task(i).get(blocking=True, timeout=timeout))

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            python_module(
                "huey.bin.huey_consumer", "bench.peerapps.huey_app.huey", "-k", "process",
                "-w", str(workers), "--quiet",
            )
        ]  # fmt: skip


def make_peer(variant: str) -> HueyPeer:
    return HueyPeer(variant)
