"""The floor: a raw psycopg ``FOR UPDATE SKIP LOCKED`` claim + finish loop.

One table; a worker claims up to 100 jobs in one ``UPDATE … WHERE id IN
(SELECT … FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING``, runs them, and marks
them done with their results in one more statement. No leases, no retries, no
fencing, no wake-ups (an idle worker sleeps 10 ms): the cost of the queue
itself, nothing else. It has no result mechanism, so no round trip.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psycopg  # type: ignore[import-not-found, unused-ignore]

from bench.peerapps.common import PeerError, Recorder, chunks, python_module
from bench.peerapps.pgcommon import pg_url

RECORDER = Recorder()
CLAIM = 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_jobs (
    id bigserial PRIMARY KEY, args integer NOT NULL, status smallint NOT NULL DEFAULT 0,
    result integer
);
CREATE INDEX IF NOT EXISTS raw_jobs_ready ON raw_jobs (id) WHERE status = 0;
"""
CLAIM_SQL = (
    "UPDATE raw_jobs j SET status = 1 WHERE j.id IN (SELECT id FROM raw_jobs WHERE status = 0"
    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING j.id, j.args"
)
FINISH_SQL = (
    "UPDATE raw_jobs j SET status = 2, result = r.result"
    " FROM unnest(%s::bigint[], %s::integer[]) AS r(id, result) WHERE j.id = r.id"
)


def noop(x: int) -> int:
    RECORDER.mark()
    return x


class RawPeer:
    label = "raw SKIP LOCKED loop"
    config = "{n} processes, 100 per claim, psycopg"
    notes = ("the floor: no leases, retries or fencing", "no result wait: no round trip")
    batch_api = "INSERT … SELECT unnest(%s): one statement per batch"
    record_mode = "process"
    phases = ("single", "batched", "drain")

    def __init__(self) -> None:
        self.conn: Any = psycopg.connect(pg_url(), autocommit=True)
        self.conn.execute(SCHEMA)

    def reset(self) -> None:
        self.conn.execute("TRUNCATE raw_jobs")

    def enqueue_each(self, n: int) -> None:
        for i in range(n):
            self.conn.execute("INSERT INTO raw_jobs (args) VALUES (%s)", (i,))

    def enqueue_batched(self, n: int, batch: int) -> None:
        for part in chunks(n, batch):
            self.conn.execute(
                "INSERT INTO raw_jobs (args) SELECT unnest(%s::integer[])", (list(part),)
            )

    def roundtrips(self, n: int, timeout: float) -> list[float]:
        raise PeerError("the raw loop has no result mechanism")

    def worker_commands(self, workers: int) -> list[list[str]]:
        return [python_module("bench.peerapps.rawpg_app", "worker") for _ in range(workers)]


def worker() -> None:
    conn = psycopg.connect(pg_url(), autocommit=True)
    while True:
        rows = conn.execute(CLAIM_SQL, (CLAIM,)).fetchall()
        if not rows:
            time.sleep(0.01)
            continue
        results = [noop(args) for _, args in rows]
        conn.execute(FINISH_SQL, ([r[0] for r in rows], results))


def make_peer(variant: str) -> RawPeer:
    if variant != "default":
        raise PeerError(f"unknown raw loop variant {variant!r}; valid: default")
    return RawPeer()


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    worker()
