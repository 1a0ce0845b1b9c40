"""Celery: Redis broker and Redis result backend, one worker with a prefork pool.

Variants: ``default`` (acks on receipt: a task whose worker dies is lost) and
``acks_late`` (``task_acks_late=True``: acked after it ran, redelivered after the
visibility timeout if the worker dies: at-least-once).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, group  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import (
    Recorder,
    chunks,
    python_module,
    redis_url,
    time_each,
    variant,
)

RECORDER = Recorder()
app: Any = Celery("bench", broker=redis_url(), backend=redis_url())
app.conf.update(
    task_acks_late=variant() == "acks_late",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def noop(x: int) -> int:
    RECORDER.mark()
    return x


noop_task: Any = app.task(name="bench.noop")(noop)


class CeleryPeer:
    record_mode = "process"
    batch_api = "group(...).apply_async(): one publish per task on one connection"

    def __init__(self, variant: str) -> None:
        late = variant == "acks_late"
        self.label = "celery-acks-late" if late else "celery"
        self.config = (
            f"prefork -c {{n}}, {'task_acks_late=True' if late else 'default acks (early)'},"
            " redis broker + redis results"
        )
        self.notes = (
            ("at-least-once (acks late)" if late else "at-most-once on worker loss (acks early)"),
            "prefetch x4, --without-gossip/mingle/heartbeat",
            "one consumer (the worker's main process) feeds the pool",
        )

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            noop_task.delay(i)

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            group(noop_task.s(i) for i in part).apply_async()

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        return time_each(n, lambda i: noop_task.delay(i).get(timeout=timeout))

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            python_module(
                "celery", "-A", "bench.peerapps.celery_app", "worker", "--pool", "prefork",
                "--concurrency", str(workers), "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--loglevel", "WARNING", "-n", "bench@%h",
            )
        ]  # fmt: skip


def make_peer(variant: str) -> CeleryPeer:
    return CeleryPeer(variant)
