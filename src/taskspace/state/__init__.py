"""Shared state on the store protocols:

- the KV blackboard (``space.kv``: :class:`KV`, :class:`Txn`, :class:`Watch`);
- ``ShardedKV``, one key space spread over several spaces by hash slot
  (``key_slot``: CRC16 of the key or its ``{tag}``, modulo 16,384, as Redis
  Cluster), with online rebalancing (``taskspace.state.sharding``);
- the two-level cache (``space.cache``: :class:`Cache`) and memoization with
  single-flight (``space.cached``: :func:`cached`), with the eviction policies
  of ``taskspace.state.policies``.

Everything but ``key_slot`` is imported on first use (some of it imports
``taskspace.space``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskspace.state.slots import NUM_SLOTS, key_slot

if TYPE_CHECKING:
    from taskspace.state.cache import Cache, CacheStats
    from taskspace.state.kv import KV, Txn, TxnOutcome, Watch, WatchEvent
    from taskspace.state.memo import cached
    from taskspace.state.sharding import ShardedKV

_LAZY = {
    "Cache": "taskspace.state.cache",
    "CacheStats": "taskspace.state.cache",
    "KV": "taskspace.state.kv",
    "Txn": "taskspace.state.kv",
    "TxnOutcome": "taskspace.state.kv",
    "Watch": "taskspace.state.kv",
    "WatchEvent": "taskspace.state.kv",
    "cached": "taskspace.state.memo",
    "ShardedKV": "taskspace.state.sharding",
}

__all__ = [
    "KV",
    "NUM_SLOTS",
    "Cache",
    "CacheStats",
    "ShardedKV",
    "Txn",
    "TxnOutcome",
    "Watch",
    "WatchEvent",
    "cached",
    "key_slot",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
