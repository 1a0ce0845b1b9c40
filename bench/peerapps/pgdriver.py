"""Measure one PostgreSQL peer; write its figures as JSON.

    .bench-venv/<peer>/bin/python -m bench.peerapps.pgdriver PEER default \
        --url redis://127.0.0.1:PORT/0 --pg-url postgresql://…/db --out result.json \
        [--tasks 20000 --singles 2000 --batch 1000 --roundtrips 300 --workers 2]

Run by :mod:`bench.peers_pg` in the peer's virtual environment; ``--url`` is the
private Redis that records executions, ``--pg-url`` the peer's own database.
Progress lines start with ``@``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.peerapps.common import Options
from bench.peerapps.driver import load_peer
from bench.peerapps.pgcommon import ENV_PG_URL, run_pg_phases

PEERS = ("procrastinate", "pgqueuer", "rawpg")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.peerapps.pgdriver")
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("variant")
    parser.add_argument("--url", required=True)
    parser.add_argument("--pg-url", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-pgpeer-logs-"))
    os.environ[ENV_PG_URL] = args.pg_url  # read by the app module and its workers
    peer = load_peer(args.peer, args.variant, args.url)
    opts = Options(
        url=args.url, tasks=args.tasks, singles=args.singles, batch=args.batch,
        roundtrips=args.roundtrips, workers=args.workers, log_dir=log_dir,
    )  # fmt: skip
    args.out.write_text(json.dumps(run_pg_phases(peer, opts)))


if __name__ == "__main__":
    main()
