"""RQ: ``rq worker-pool -n 2`` on one queue; results in RQ's Redis result streams.

Variants: ``fork`` (RQ's default ``Worker``: a work horse is forked for every job, so a
job that crashes cannot take the worker down) and ``simple`` (``SimpleWorker``: jobs run
in the worker process itself, no fork). RQ keeps per-job bookkeeping in Redis (status,
registries, heartbeats, a result stream): rq 3.0 sent about 57 Redis commands per job here.
"""

from __future__ import annotations

from typing import Any

from redis import Redis  # type: ignore[import-not-found, unused-ignore]
from rq import Queue, get_current_job  # type: ignore[import-not-found, unused-ignore]
from rq.worker import SimpleWorker, Worker  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import (
    PeerError,
    Recorder,
    chunks,
    python_module,
    redis_url,
    time_each,
)

RECORDER = Recorder()
QUEUE_NAME = "bench"
# Naming the worker classes through this module makes the worker process import it before
# it forks, so a work horse does not import the job's module again for every job (RQ's
# advice: preload what jobs import in the worker).
ForkWorker: Any = Worker
NoForkWorker: Any = SimpleWorker
WORKER_CLASSES = {"fork": f"{__name__}.ForkWorker", "simple": f"{__name__}.NoForkWorker"}


def noop(x: int) -> int:
    # A fork-per-job horse reuses RQ's connection rather than opening one of its own.
    RECORDER.mark(get_current_job().connection if RECORDER.direct else None)
    return x


class RQPeer:
    batch_api = "Queue.enqueue_many(prepare_data ...): one Redis pipeline per batch"

    def __init__(self, variant: str) -> None:
        if variant not in WORKER_CLASSES:
            raise PeerError(f"unknown RQ variant {variant!r}; valid: {', '.join(WORKER_CLASSES)}")
        self.variant = variant
        self.conn: Any = Redis.from_url(redis_url())
        self.queue: Any = Queue(QUEUE_NAME, connection=self.conn)
        fork = variant == "fork"
        self.label = "rq" if fork else "rq-simple"
        self.config = (
            "worker-pool -n {n}, default Worker (fork per job)"
            if fork
            else "worker-pool -n {n} -w SimpleWorker (no fork)"
        )
        self.notes = (
            "job lost if its worker dies mid-job (moved to failed by the cleanup)",
            "drain timed by an RPUSH per job on RQ's connection (a horse lives one job);"
            " job module preloaded before the fork"
            if fork
            else "results via Job.latest_result(timeout) (XREAD)",
        )
        # A work horse exits right after its job: no thread of it can publish counts later.
        self.record_mode = "direct" if fork else "process"

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            self.queue.enqueue(noop, i)

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            self.queue.enqueue_many([Queue.prepare_data(noop, (i,)) for i in part])

    def _pair(self, i: int, timeout: float) -> object:
        job = self.queue.enqueue(noop, i)
        result = job.latest_result(timeout=max(1, int(timeout)))
        if result is None:
            raise PeerError(f"no result for job {job.id} within {timeout} s")
        return result.return_value

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        return time_each(n, lambda i: self._pair(i, timeout))

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            python_module(
                "rq.cli", "worker-pool", QUEUE_NAME, "-n", str(workers), "--url", redis_url(),
                "-w", WORKER_CLASSES[self.variant], "--quiet",
            )
        ]  # fmt: skip


def make_peer(variant: str) -> RQPeer:
    return RQPeer(variant)
