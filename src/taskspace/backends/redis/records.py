"""Task records as the Redis scripts return them (HMGET of FIELDS)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from taskspace.backends.base import TaskRecord

FIELDS = (
    "id", "name", "payload", "codec", "queue", "priority", "max_attempts", "lease_s", "timeout",
    "dedup_key", "state", "ready_at", "attempts", "lost", "token", "worker", "lease_expires",
    "result", "error", "pdone", "ptotal", "cancel", "created", "started", "finished",
    "result_ttl",
)  # fmt: skip


def record(v: Sequence[bytes | None]) -> TaskRecord:
    """A TaskRecord from HMGET of FIELDS (in that order); on the hot path, so indexed.
    An absent payload reads as b"", an absent result_ttl as None (kept forever)."""
    done, total = v[19], v[20]
    return TaskRecord(
        id=v[0].decode(), name=v[1].decode(), payload=v[2] or b"",  # type: ignore[union-attr]
        codec=v[3].decode(), queue=v[4].decode(),  # type: ignore[union-attr]
        priority=int(v[5] or 0), max_attempts=int(v[6] or 1), lease_s=float(v[7] or 0),
        timeout=None if v[8] is None else float(v[8]),
        dedup_key=None if v[9] is None else v[9].decode(),
        state=v[10].decode(), ready_at=float(v[11] or 0),  # type: ignore[arg-type,union-attr]
        attempts=int(v[12] or 0), lost=int(v[13] or 0), token=int(v[14] or 0),
        worker=None if v[15] is None else v[15].decode(),
        lease_expires=None if v[16] is None else float(v[16]), result=v[17],
        error=None if v[18] is None else orjson.loads(v[18]),
        progress=None if done is None or total is None else (float(done), float(total)),
        cancel_requested=v[21] is not None and v[21] != b"0", created=float(v[22] or 0),
        started=None if v[23] is None else float(v[23]),
        finished=None if v[24] is None else float(v[24]),
        result_ttl=None if v[25] is None else float(v[25]),
    )  # fmt: skip


def number(value: float | None) -> str:
    """A float as script argument text; '' for None."""
    return "" if value is None else repr(float(value))
