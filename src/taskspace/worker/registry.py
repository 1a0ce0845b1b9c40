"""Workers announce themselves in the space's KV so `taskspace status` can list them.

An entry lives for three heartbeats; a worker that dies simply stops
renewing it, so the list never shows a dead worker for long.
"""

from __future__ import annotations

from typing import Any

import orjson

from taskspace.backends.base import Store

PREFIX = "taskspace/workers/"
SCAN_PAGE = 1000


def announce(store: Store, name: str, info: dict[str, Any], ttl: float) -> None:
    """Create or refresh this worker's entry for ``ttl`` seconds."""
    store.kv.put(PREFIX + name, orjson.dumps(info), ttl=ttl)


def withdraw(store: Store, name: str) -> None:
    """Remove this worker's entry (graceful exit)."""
    store.kv.delete(PREFIX + name)


def live_workers(store: Store) -> list[dict[str, Any]]:
    """Every worker whose entry has not expired (read page by page)."""
    workers: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = store.kv.scan(PREFIX, after_key=after, limit=SCAN_PAGE)
        workers += [orjson.loads(item.value) for _, item in page]
        if len(page) < SCAN_PAGE:
            return workers
        after = page[-1][0]
