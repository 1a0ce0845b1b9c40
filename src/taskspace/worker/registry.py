"""Workers register themselves in the service registry as ``taskspace.worker``
so ``taskspace status`` and ``taskspace services`` can list them.

The instance's meta is the worker's info (queues, concurrency, current load
``running``, task names, counters); its tags are ``queue:<name>``. It lives
for the TTL the worker gives (three heartbeats): a worker that dies simply
stops refreshing it, so the list never shows a dead worker for long.

**Cost, and the change feed.** The worker calls :func:`announce` every
heartbeat. When nothing but its load changed (``running`` and the counters)
since the last write, or the last write is younger than LOAD_WRITE_MIN_S,
the call is a ``kv.touch``: no new revision. A real write (one revision on
the change feed) happens only when the queues, concurrency or task names
change, or when the load changed and LOAD_WRITE_MIN_S has passed. So a
worker adds at most one change per LOAD_WRITE_MIN_S seconds to the feed
(plus its registration and its removal), however short its heartbeat: a
fleet of N workers at most N / LOAD_WRITE_MIN_S changes per second. The load
a reader sees is therefore at most LOAD_WRITE_MIN_S old.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import orjson

from taskspace.backends.base import Store
from taskspace.coordination.registry import (
    INSTANCE_RE,
    WORKER_SERVICE,
    instance_key,
    list_instances,
    scan_all,
    write_instance,
)

# Workers of an earlier release announce themselves here; they are still
# listed during a rolling upgrade (nothing new is written under it).
LEGACY_PREFIX = "taskspace/workers/"
PREFIX = LEGACY_PREFIX  # the old name, for code that imported it
SCAN_PAGE = 1000
LOAD_WRITE_MIN_S = 5.0
# Info fields that change with the load: a change of only these is written at
# most every LOAD_WRITE_MIN_S.
VOLATILE = frozenset({"running", "succeeded", "failed"})

_lock = threading.Lock()
# (space id, instance key) -> (stable info, volatile info, monotonic time of the last write)
_written: dict[tuple[str, str], tuple[bytes, bytes, float]] = {}


def worker_instance_id(name: str) -> str:
    """The registry instance id of a worker name (the name itself when it is a
    valid id; otherwise percent-quoted)."""
    if INSTANCE_RE.fullmatch(name):
        return name
    quoted = quote(name, safe="._:@~-")
    return quoted if INSTANCE_RE.fullmatch(quoted) else "w" + quoted[:199]


def _split_info(info: dict[str, Any]) -> tuple[bytes, bytes]:
    stable = {k: v for k, v in info.items() if k not in VOLATILE}
    volatile = {k: v for k, v in info.items() if k in VOLATILE}
    return orjson.dumps(stable, option=orjson.OPT_SORT_KEYS), orjson.dumps(
        volatile, option=orjson.OPT_SORT_KEYS
    )


def announce(store: Store, name: str, info: dict[str, Any], ttl: float) -> None:
    """Create or refresh this worker's registration for ``ttl`` seconds: a
    ``kv.touch`` when only the load changed recently, else one write (see the
    module docstring)."""
    key = instance_key(WORKER_SERVICE, worker_instance_id(name))
    cache_key = (store.space_id, key)
    stable, volatile = _split_info(info)
    now = time.monotonic()
    with _lock:
        last = _written.get(cache_key)
    touch = last is not None and last[0] == stable
    touch = touch and last is not None and (last[1] == volatile or now - last[2] < LOAD_WRITE_MIN_S)
    if touch and store.kv.touch(key, ttl) is not None:
        return  # no revision: only the TTL moved
    started = info.get("started")
    doc = {
        "service": WORKER_SERVICE,
        "id": worker_instance_id(name),
        "address": str(info.get("host") or name),
        "tags": [f"queue:{q}" for q in info.get("queues", ())],
        "meta": info,
        "check": None,
        "interval": ttl,
        "timeout": ttl,
        "ttl": ttl,
        "deregister_after": None,
        "registered": float(started) if isinstance(started, int | float) else 0.0,
    }
    write_instance(store, doc, ttl)
    with _lock:
        _written[cache_key] = (stable, volatile, now)


def withdraw(store: Store, name: str) -> None:
    """Remove this worker's registration (graceful exit)."""
    key = instance_key(WORKER_SERVICE, worker_instance_id(name))
    with _lock:
        _written.pop((store.space_id, key), None)
    store.kv.delete(key)
    store.kv.delete(LEGACY_PREFIX + name)


def live_workers(store: Store) -> list[dict[str, Any]]:
    """The info of every live worker (read page by page), with its registry
    ``health`` added; workers of an earlier release (LEGACY_PREFIX) included."""
    workers: list[dict[str, Any]] = [
        {**inst.meta, "health": inst.status} for inst in list_instances(store, WORKER_SERVICE)
    ]
    for _, item in scan_all(store, LEGACY_PREFIX):
        workers.append({**orjson.loads(item.value), "health": "passing"})
    return workers
