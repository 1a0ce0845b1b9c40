"""Procrastinate 3.10: ``procrastinate worker --concurrency 30`` per process.

A job's status moves to ``doing`` when a worker fetches it; a worker SIGKILLed
mid-job leaves it ``doing`` until someone retries it (by hand, or a stalled-job
sweep the application runs itself). Procrastinate keeps no return values, so
the round trip waits for the job's status to become ``succeeded`` (polled
every millisecond on one connection). Batched enqueue: ``task.batch_defer``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import procrastinate  # type: ignore[import-not-found, unused-ignore]
import psycopg  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import PeerError, Recorder, chunks, python_module, time_each
from bench.peerapps.pgcommon import pg_url

RECORDER = Recorder()
CONCURRENCY = 30
app: Any = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=pg_url()))


@app.task(name="noop")
def noop(x: int) -> int:
    RECORDER.mark()
    return x


class ProcrastinatePeer:
    label = "procrastinate"
    config = "{n} processes x concurrency 30, psycopg connector"
    notes = (
        "a SIGKILLed worker's job stays 'doing' until retried by hand",
        "no result store: round trip polls the job's status every 1 ms",
    )
    batch_api = "task.batch_defer(*kwargs): one statement per batch"
    record_mode = "process"
    phases = ("single", "batched", "drain", "roundtrip")

    def __init__(self) -> None:
        self.app = app.open()
        self.conn: Any = psycopg.connect(pg_url(), autocommit=True)
        exists = self.conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0]
        if exists is None:
            self.app.schema_manager.apply_schema()

    def reset(self) -> None:
        self.conn.execute(
            "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers"
            " CASCADE"
        )

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            noop.defer(x=i)

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            noop.batch_defer(*({"x": i} for i in part))

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        def pair(i: int) -> int:
            job_id = noop.defer(x=i)
            deadline = time.monotonic() + timeout
            while True:
                row = self.conn.execute(
                    "SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,)
                ).fetchone()
                if row is not None and row[0] == "succeeded":
                    return i
                if row is not None and row[0] in ("failed", "cancelled", "aborted"):
                    raise PeerError(f"job {job_id} ended {row[0]}")
                if time.monotonic() > deadline:
                    raise PeerError(f"job {job_id} not done after {timeout:.0f} s")
                time.sleep(0.001)

        return time_each(n, pair)

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [
            python_module(
                "procrastinate", "--app=bench.peerapps.procrastinate_app.app", "worker",
                f"--concurrency={CONCURRENCY}",
            )
            for _ in range(workers)
        ]  # fmt: skip


def make_peer(variant: str) -> ProcrastinatePeer:
    if variant != "default":
        raise PeerError(f"unknown Procrastinate variant {variant!r}; valid: default")
    return ProcrastinatePeer()


if __name__ == "__main__":
    sys.exit("run through bench.peerapps.pgdriver")
