"""Dramatiq: RedisBroker, default middleware plus Results (Redis backend), 2 processes
with the default 8 threads each. Messages are acked after they ran (at-least-once)."""

from __future__ import annotations

from typing import Any

import dramatiq  # type: ignore[import-not-found, unused-ignore]
from dramatiq.brokers.redis import RedisBroker  # type: ignore[import-not-found, unused-ignore]
from dramatiq.results import Results  # type: ignore[import-not-found, unused-ignore]
from dramatiq.results.backends import RedisBackend  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import Recorder, chunks, python_module, redis_url, time_each

RECORDER = Recorder()
broker: Any = RedisBroker(url=redis_url())
broker.add_middleware(Results(backend=RedisBackend(url=redis_url())))
dramatiq.set_broker(broker)


def noop(x: int) -> int:
    RECORDER.mark()
    return x


noop_actor: Any = dramatiq.actor(noop, actor_name="noop", store_results=True)


class DramatiqPeer:
    label = "dramatiq"
    config = "{n} processes x 8 threads (default), redis broker + Results middleware"
    notes = (
        "at-least-once (ack after run)",
        "idle consumers poll with backoff up to dramatiq_worker_timeout (1 s)",
    )
    batch_api = "group(messages).run(): one enqueue script call per message"
    record_mode = "process"

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            noop_actor.send(i)

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            dramatiq.group(noop_actor.message(i) for i in part).run()

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        ms = int(timeout * 1000)
        return time_each(n, lambda i: noop_actor.send(i).get_result(block=True, timeout=ms))

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            python_module(
                "dramatiq", "bench.peerapps.dramatiq_app", "--processes", str(workers),
                "--threads", "8",
            )
        ]  # fmt: skip


def make_peer(variant: str) -> DramatiqPeer:
    return DramatiqPeer()
