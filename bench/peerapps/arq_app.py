"""arq: ``arq`` worker processes (asyncio, ``max_jobs=10`` each, the default).

arq polls: a worker looks for jobs every ``poll_delay`` (default 0.5 s) and
``Job.result()`` polls every ``poll_delay`` (default 0.5 s). At the defaults a no-op
round trip takes about half a second and a drain is capped near ``queue_read_limit``
jobs per poll, so this benchmark lowers both to 1 ms (the knobs arq documents; 1 ms gave
a lower p50 and a faster drain than 5 ms here); everything else is default. Jobs may run
more than once (at-least-once, ``in-progress`` key with a timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from arq import create_pool  # type: ignore[import-not-found, unused-ignore]
from arq.connections import RedisSettings  # type: ignore[import-not-found, unused-ignore]
from arq.worker import func  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import PeerError, Recorder, chunks, python_module, redis_url

RECORDER = Recorder()
POLL_DELAY_S = 0.001
RESULT_POLL_S = 0.001
IN_FLIGHT = 50  # concurrent enqueue_job calls in the "batched" phase (each is a transaction)
T = TypeVar("T")

LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


async def noop(ctx: dict[str, Any], x: int) -> int:
    RECORDER.mark()
    return x


class WorkerSettings:
    functions = [func(noop, name="noop")]
    redis_settings = RedisSettings.from_dsn(redis_url())
    poll_delay = POLL_DELAY_S


class ArqPeer:
    label = "arq"
    config = f"{{n}} processes, max_jobs=10 (default), poll_delay={POLL_DELAY_S * 1000:g} ms"
    notes = (
        "at-least-once (job may run again after in-progress timeout)",
        f"polls: worker every {POLL_DELAY_S * 1000:g} ms,"
        f" Job.result every {RESULT_POLL_S * 1000:g} ms (defaults 500 ms)",
    )
    batch_api = f"no bulk API: enqueue_job calls gathered, {IN_FLIGHT} in flight"
    record_mode = "process"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: Any = self._run(create_pool(WorkerSettings.redis_settings))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def enqueue_each(self, n: int) -> None:
        async def go() -> None:
            for i in range(n):
                await self.pool.enqueue_job("noop", i)

        self._run(go())

    def enqueue_batched(self, n: int, batch: int) -> None:
        async def go() -> None:
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one(i: int) -> None:
                async with gate:
                    await self.pool.enqueue_job("noop", i)

            for part in chunks(n, batch):
                await asyncio.gather(*(one(i) for i in part))

        self._run(go())

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        async def go() -> list[float]:
            samples = []
            for i in range(n):
                start = self.loop.time()
                job = await self.pool.enqueue_job("noop", i)
                value = await job.result(timeout=timeout, poll_delay=RESULT_POLL_S)
                samples.append((self.loop.time() - start) * 1000.0)
                if value != i:
                    raise PeerError(f"round trip {i} returned {value!r}")
            return samples

        return self._run(go())

    def worker_commands(self, workers: int) -> list[list[str]]:
        command = python_module(
            "arq", "bench.peerapps.arq_app.WorkerSettings",
            "--custom-log-dict", "bench.peerapps.arq_app.LOG_CONFIG",
        )  # fmt: skip
        return [command for _ in range(workers)]


def make_peer(variant: str) -> ArqPeer:
    return ArqPeer()
