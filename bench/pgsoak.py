"""PostgreSQL bloat soak: ``python -m bench.pgsoak [--tasks 200000] [--url …]``.

Pushes ``--tasks`` no-op tasks in batches while ``--claimers`` threads claim
and finish them (batches of ``--claim``, SKIP LOCKED against each other), and
a maintainer reaps finished tasks past a short ``result_ttl`` (as a worker's
maintainer does every second) — the steady state of a queue that runs for
weeks, compressed. Prints table and index sizes (``pg_relation_size``,
``pg_indexes_size``, ``pg_total_relation_size``), live and dead tuples and
autovacuum runs of the queue's tables at every tenth of the run and at the
end, in a fresh schema that is dropped afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from typing import Any

from taskspace.backends import open_store
from taskspace.backends.base import Outcome, TaskSpec
from taskspace.backends.postgres import PostgresStore

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = ("tasks", "done", "claim_requests", "waiters")
SIZES_SQL = (
    "SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid),"
    " pg_total_relation_size(c.oid), COALESCE(s.n_live_tup, 0), COALESCE(s.n_dead_tup, 0),"
    " COALESCE(s.autovacuum_count, 0) + COALESCE(s.vacuum_count, 0)"
    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
    " WHERE n.nspname = %s AND c.relname = ANY(%s::text[]) ORDER BY c.relname"
)


def sizes(store: PostgresStore) -> list[tuple[Any, ...]]:
    """(table, heap bytes, index bytes, total bytes, live, dead, vacuums) per table."""
    return [tuple(r) for r in store.conn.read(SIZES_SQL, (store.schema, list(TABLES)))]


def show(label: str, rows: list[tuple[Any, ...]]) -> None:
    print(f"-- {label}")
    print(f"   {'table':<15}{'heap KiB':>10}{'index KiB':>11}{'total KiB':>11}"
          f"{'live':>9}{'dead':>9}{'vacuums':>9}")  # fmt: skip
    for name, heap, index, total, live, dead, vacuums in rows:
        print(f"   {name:<15}{heap / 1024:>10,.0f}{index / 1024:>11,.0f}{total / 1024:>11,.0f}"
              f"{live:>9,}{dead:>9,}{vacuums:>9}")  # fmt: skip


def claimer(store: PostgresStore, n: int, stop: threading.Event, done: list[int]) -> None:
    """Claim and finish batches until ``stop``; counts finished tasks in ``done``."""
    me = f"soak-{threading.get_ident()}"
    while not stop.is_set():
        got = store.queue.claim(["soak"], me, n, request_id=uuid.uuid4().hex, wait=0.2)
        if got:
            store.queue.finish([(r.lease, Outcome("succeeded", result=b"null")) for r in got])
            done.append(len(got))


def soak(
    url: str, tasks: int, batch: int, claim: int, claimers: int, ttl: float, vacuum_every: float
) -> None:
    schema = f"soak_{uuid.uuid4().hex[:10]}"
    store = open_store(f"{url}{'&' if '?' in url else '?'}schema={schema}&pool_max=20")
    assert isinstance(store, PostgresStore)
    stop = threading.Event()
    done: list[int] = []
    threads = [
        threading.Thread(target=claimer, args=(store, claim, stop, done), daemon=True)
        for _ in range(claimers)
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    reaped = 0
    checkpoint = max(batch, tasks // 10)
    pushed = 0
    vacuumed = time.monotonic()
    try:
        while pushed < tasks:
            count = min(batch, tasks - pushed)
            store.queue.push([TaskSpec(uuid.uuid4().hex, "noop", b"[]", queue="soak",
                                       result_ttl=ttl) for _ in range(count)])  # fmt: skip
            pushed += count
            while pushed - sum(done) > 5 * batch:  # a bounded backlog, like a real stream
                reaped += store.queue.reap(1000)
                time.sleep(0.01)
            reaped += store.queue.reap(1000)
            if vacuum_every and time.monotonic() - vacuumed >= vacuum_every:
                # What autovacuum does on this table every autovacuum_naptime.
                store.conn.execute("VACUUM tasks")
                store.conn.execute("VACUUM done")
                vacuumed = time.monotonic()
            if pushed % checkpoint < batch:
                show(f"{pushed:,} pushed, {sum(done):,} finished, {reaped:,} reaped,"
                     f" {time.monotonic() - started:.0f} s", sizes(store))  # fmt: skip
        while sum(done) < tasks:
            reaped += store.queue.reap(1000)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(timeout=5)
        show(f"all {tasks:,} finished in {elapsed:.1f} s ({tasks / elapsed:,.0f} tasks/s),"
             f" {reaped:,} reaped", sizes(store))  # fmt: skip
        time.sleep(max(0.0, ttl + 0.5))
        while (n := store.queue.reap(1000)) > 0:
            reaped += n
        show(f"after reaping the rest ({reaped:,} reaped in all)", sizes(store))
        store.conn.execute("VACUUM tasks")
        store.conn.execute("VACUUM done")
        show("after a plain VACUUM of tasks and done", sizes(store))
    finally:
        stop.set()
        if not ARGS.keep:
            store.conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        store.close()


ARGS = argparse.Namespace(keep=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="tasks per push")
    parser.add_argument("--claim", type=int, default=100, help="tasks per claim")
    parser.add_argument("--claimers", type=int, default=2)
    parser.add_argument("--ttl", type=float, default=5.0, help="result_ttl of every task (s)")
    parser.add_argument("--keep", action="store_true", help="keep the schema")
    parser.add_argument(
        "--vacuum-every", type=float, default=0.0,
        help="VACUUM tasks and done every this many seconds, as autovacuum does every"
        " autovacuum_naptime (0: leave it to the server's autovacuum)",
    )  # fmt: skip
    args = parser.parse_args()
    ARGS.keep = args.keep
    soak(args.url, args.tasks, args.batch, args.claim, args.claimers, args.ttl, args.vacuum_every)


if __name__ == "__main__":
    main()
