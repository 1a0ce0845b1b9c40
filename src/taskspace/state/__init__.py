"""Shared state on the store protocols: the KV blackboard (``space.kv``)."""
