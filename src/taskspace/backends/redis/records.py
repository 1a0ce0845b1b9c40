"""Task records as the Redis scripts return them (HMGET of FIELDS)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from taskspace.backends.base import LIVE_STATES, TaskRecord

# The task hash fields a record is read from, in this order. The scripts get
# the same list (and a name -> index map) from lua_fields(), so it is stated
# once.
FIELDS = (
    "id", "name", "payload", "codec", "queue", "priority", "max_attempts", "lease_s", "timeout",
    "dedup_key", "state", "ready_at", "attempts", "lost", "token", "worker", "lease_expires",
    "result", "error", "pdone", "ptotal", "cancel", "created", "started", "finished",
    "result_ttl",
)  # fmt: skip


def lua_fields() -> str:
    """FIELDS as Lua source: ``FIELDS`` (the list), ``FIELD`` (name -> index),
    and ``LIVE_STATES`` (base.LIVE_STATES as a set)."""
    names = ", ".join(f"'{name}'" for name in FIELDS)
    index = ", ".join(f"{name} = {i}" for i, name in enumerate(FIELDS, 1))
    live = ", ".join(f"{state} = true" for state in sorted(LIVE_STATES))
    return (
        f"local FIELDS = {{{names}}}\nlocal FIELD = {{{index}}}\nlocal LIVE_STATES = {{{live}}}\n"
    )


# A record packed into one string by packed_record() in lua/common.lua: this
# prefix, then per field of FIELDS either b"-" (absent) or b"<length>:<bytes>".
PACKED = b"R"


def unpack_record(data: bytes) -> list[bytes | None]:
    """The HMGET row of FIELDS that ``data`` (PACKED + fields) carries."""
    out: list[bytes | None] = []
    i, end = len(PACKED), len(data)
    while i < end:
        if data[i] == 45:  # b"-": an absent field
            out.append(None)
            i += 1
        else:
            colon = data.index(b":", i)
            start = colon + 1
            i = start + int(data[i:colon])
            out.append(data[start:i])
    return out


def record(v: Sequence[bytes | None]) -> TaskRecord:
    """A TaskRecord from HMGET of FIELDS (in that order). An absent payload
    reads as b"", an absent result_ttl as None (kept forever)."""
    (id_, name, payload, codec, queue, priority, max_attempts, lease_s, timeout, dedup_key,
     state, ready_at, attempts, lost, token, worker, lease_expires, result, error, pdone,
     ptotal, cancel, created, started, finished, result_ttl) = v  # fmt: skip
    return TaskRecord(
        id=id_.decode(), name=name.decode(), payload=payload or b"",  # type: ignore[union-attr]
        codec=codec.decode(), queue=queue.decode(),  # type: ignore[union-attr]
        priority=int(priority or 0), max_attempts=int(max_attempts or 1),
        lease_s=float(lease_s or 0), timeout=None if timeout is None else float(timeout),
        dedup_key=None if dedup_key is None else dedup_key.decode(),
        state=state.decode(), ready_at=float(ready_at or 0),  # type: ignore[arg-type,union-attr]
        attempts=int(attempts or 0), lost=int(lost or 0), token=int(token or 0),
        worker=None if worker is None else worker.decode(),
        lease_expires=None if lease_expires is None else float(lease_expires), result=result,
        error=None if error is None else orjson.loads(error),
        progress=None if pdone is None or ptotal is None else (float(pdone), float(ptotal)),
        cancel_requested=cancel is not None and cancel != b"0", created=float(created or 0),
        started=None if started is None else float(started),
        finished=None if finished is None else float(finished),
        result_ttl=None if result_ttl is None else float(result_ttl),
    )  # fmt: skip


def number(value: float | None) -> str:
    """A float as script argument text; '' for None."""
    return "" if value is None else repr(float(value))
