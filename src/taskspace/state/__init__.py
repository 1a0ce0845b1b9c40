"""Shared state on the store protocols: the KV blackboard (``space.kv``) and
``ShardedKV``, one key space spread over several spaces by hash slot
(``key_slot``: CRC16 of the key or its ``{tag}``, modulo 16,384, as Redis
Cluster), with online rebalancing (``taskspace.state.sharding``).

``ShardedKV`` is imported on first use (it imports ``taskspace.space``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskspace.state.slots import NUM_SLOTS, key_slot

if TYPE_CHECKING:
    from taskspace.state.sharding import ShardedKV

__all__ = ["NUM_SLOTS", "ShardedKV", "key_slot"]


def __getattr__(name: str) -> Any:
    if name == "ShardedKV":
        from taskspace.state.sharding import ShardedKV

        return ShardedKV
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
