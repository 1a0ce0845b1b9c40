"""What the PostgreSQL peer drivers add to :mod:`bench.peerapps.common`.

The phases and the execution recorder are common.py's, unchanged: each worker
process counts its own executions and publishes the counts to the private
Redis the orchestrator starts (``BENCH_REDIS_URL``), so recording never touches
the PostgreSQL being measured. Each peer gets a fresh database of its own on
that PostgreSQL (``BENCH_PG_URL``); ``reset()`` empties its queue before every
phase. Runs in the peers' virtual environments (psycopg and redis-py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bench.peerapps.common import (
    Options,
    PeerError,
    connect,
    phase_batched,
    phase_drain,
    phase_roundtrip,
    phase_single,
    progress,
)

ENV_PG_URL = "BENCH_PG_URL"


def pg_url() -> str:
    try:
        return os.environ[ENV_PG_URL]
    except KeyError:
        raise PeerError(f"{ENV_PG_URL} is not set; run python -m bench.peers_pg") from None


class PgPeer(Protocol):
    """A peer of common.Peer's shape that can also empty its queue; ``phases``
    names the phases it takes part in (the raw loop has no result to wait for)."""

    label: str
    config: str
    notes: tuple[str, ...]
    batch_api: str
    record_mode: str
    phases: tuple[str, ...]

    def reset(self) -> None: ...


def run_pg_phases(peer: Any, opts: Options) -> dict[str, Any]:
    """Every phase the peer takes part in, each on an emptied queue and a flushed
    recorder; a failed phase is reported, the others still run."""
    conn = connect(opts.url)
    out: dict[str, Any] = {
        "label": peer.label, "config": peer.config.format(n=opts.workers),
        "notes": list(peer.notes), "batch_api": peer.batch_api, "errors": {},
    }  # fmt: skip
    phases: Sequence[tuple[str, Callable[[], object]]] = (
        ("single", lambda: phase_single(peer, opts)),
        ("batched", lambda: phase_batched(peer, opts) if peer.batch_api else None),
        ("drain", lambda: phase_drain(peer, opts, conn)),
        ("roundtrip", lambda: phase_roundtrip(peer, opts)),
    )
    for name, phase in phases:
        if name not in peer.phases:
            continue
        conn.flushdb()
        peer.reset()
        progress(name)
        try:
            out[name] = phase()
        except Exception as exc:  # noqa: BLE001 - a peer's failure is reported in its row
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
    conn.flushdb()
    return out
