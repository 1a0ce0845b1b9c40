"""Measure one peer configuration; write its figures as JSON.

    .bench-venv/bin/python -m bench.peerapps.driver PEER VARIANT --url redis://127.0.0.1:PORT/0 \
        --out result.json [--tasks 20000 --singles 2000 --batch 1000 --roundtrips 300 --workers 2]

Run by :mod:`bench.peers` in the peers' virtual environment; progress lines start with ``@``.
The database at ``--url`` is flushed before every phase.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from pathlib import Path

from bench.peerapps.common import ENV_URL, ENV_VARIANT, Options, Peer, run_phases

PEERS = ("celery", "rq", "dramatiq", "huey", "arq")


def load_peer(name: str, variant: str, url: str) -> Peer:
    """Import ``bench.peerapps.<name>_app`` with the URL and variant in the environment,
    where it (and the worker processes it starts, which inherit it) reads them."""
    os.environ[ENV_URL] = url
    os.environ[ENV_VARIANT] = variant
    module = importlib.import_module(f"bench.peerapps.{name}_app")
    peer: Peer = module.make_peer(variant)
    return peer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.peerapps.driver")
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("variant")
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-peer-logs-"))
    peer = load_peer(args.peer, args.variant, args.url)
    opts = Options(
        url=args.url, tasks=args.tasks, singles=args.singles, batch=args.batch,
        roundtrips=args.roundtrips, workers=args.workers, log_dir=log_dir,
    )  # fmt: skip
    args.out.write_text(json.dumps(run_phases(peer, opts)))


if __name__ == "__main__":
    main()
