"""Workers announce themselves in the space's KV so `taskspace status` can list them.

An entry lives for three heartbeats; a worker that dies simply stops
renewing it, so the list never shows a dead worker for long.
"""

from __future__ import annotations

from typing import Any

import orjson

from taskspace.backends.base import Store

PREFIX = "taskspace/workers/"


def announce(store: Store, name: str, info: dict[str, Any], ttl: float) -> None:
    """Create or refresh this worker's entry for ``ttl`` seconds."""
    store.kv_put(PREFIX + name, orjson.dumps(info), ttl=ttl)


def withdraw(store: Store, name: str) -> None:
    """Remove this worker's entry (graceful exit)."""
    store.kv_delete(PREFIX + name)


def live_workers(store: Store) -> list[dict[str, Any]]:
    """Every worker whose entry has not expired."""
    return [orjson.loads(item.value) for _, item in store.kv_scan(PREFIX)]
