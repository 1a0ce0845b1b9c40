"""PgQueuer 1.6: one ``PgQueuer`` per process on the asyncpg driver, ``batch_size=100``.

(On its psycopg driver an idle worker picked a new job up only after 2-3 s
here: its LISTEN wake-up did not fire; asyncpg wakes it within ~0.1 s.)
Enqueues use the synchronous psycopg queries.

A worker that dies mid-job leaves it picked until its heartbeat goes stale
(``heartbeat_timeout``, 30 s by default), then another worker re-picks it.
PgQueuer keeps no return values; the round trip waits with its
``CompletionWatcher`` (LISTEN/NOTIFY on status changes, coalesced per 50 ms
debounce window). Batched enqueue: ``Queries.enqueue`` with lists (one
statement per batch).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg  # type: ignore[import-not-found, unused-ignore]
import psycopg  # type: ignore[import-not-found, unused-ignore]
from pgqueuer import (  # type: ignore[import-not-found, unused-ignore]
    AsyncpgDriver,
    PgQueuer,
    PsycopgDriver,
    Queries,
)
from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver  # type: ignore[import-not-found, unused-ignore]
from pgqueuer.core.completion import CompletionWatcher  # type: ignore[import-not-found, unused-ignore]
from pgqueuer.queries import SyncQueries  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import PeerError, Recorder, chunks, python_module
from bench.peerapps.pgcommon import pg_url

RECORDER = Recorder()
BATCH = 100


class PgQueuerPeer:
    label = "pgqueuer"
    config = "{n} processes, batch_size 100, asyncpg driver"
    notes = (
        "a SIGKILLed worker's job is re-picked after its heartbeat goes stale (30 s)",
        "no result store: round trip waits with CompletionWatcher",
    )
    batch_api = "Queries.enqueue(lists): one statement per batch"
    record_mode = "process"
    phases = ("single", "batched", "drain", "roundtrip")

    def __init__(self) -> None:
        self.conn: Any = psycopg.connect(pg_url(), autocommit=True)
        self.queries: Any = SyncQueries(SyncPsycopgDriver(self.conn))
        exists = self.conn.execute("SELECT to_regclass('pgqueuer')").fetchone()[0]
        if exists is None:
            asyncio.run(self._install())

    @staticmethod
    async def _install() -> None:
        conn = await psycopg.AsyncConnection.connect(pg_url(), autocommit=True)
        try:
            await Queries(PsycopgDriver(conn)).install()
        finally:
            await conn.close()

    def reset(self) -> None:
        self.conn.execute("TRUNCATE pgqueuer, pgqueuer_log")

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            self.queries.enqueue("noop", str(i).encode())

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            k = len(part)
            self.queries.enqueue(["noop"] * k, [str(i).encode() for i in part], [0] * k)

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        return asyncio.run(self._roundtrips(n, timeout))

    async def _roundtrips(self, n: int, timeout: float) -> list[float]:
        conn = await asyncpg.connect(pg_url())
        listen = await asyncpg.connect(pg_url())
        queries = Queries(AsyncpgDriver(conn))
        samples: list[float] = []
        loop = asyncio.get_running_loop()
        try:
            async with CompletionWatcher(AsyncpgDriver(listen), queries=queries) as watcher:
                for i in range(n):
                    start = loop.time()
                    (job_id,) = await queries.enqueue("noop", str(i).encode())
                    status = await asyncio.wait_for(watcher.wait_for(job_id), timeout)
                    samples.append((loop.time() - start) * 1000.0)
                    if status != "successful":
                        raise PeerError(f"job {job_id} ended {status}")
        finally:
            await conn.close()
            await listen.close()
        return samples

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [python_module("bench.peerapps.pgqueuer_app", "worker") for _ in range(workers)]


async def worker() -> None:
    conn = await asyncpg.connect(pg_url())
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        RECORDER.mark()

    await pgq.run(batch_size=BATCH)


def make_peer(variant: str) -> PgQueuerPeer:
    if variant != "default":
        raise PeerError(f"unknown PgQueuer variant {variant!r}; valid: default")
    return PgQueuerPeer()


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    asyncio.run(worker())
