"""The store under every Space: leases with fencing tokens, a fenced KV write,
the KV change feed, and a blocking stream read.

Locks, elections, caches and the registry are built on exactly these calls;
they behave the same on SQLite, Redis and memory. Run: python examples/store_contract.py
"""

from __future__ import annotations

import threading

from taskspace import Space
from taskspace.backends.base import GrantHeld, Put, VersionIs

space = Space("sqlite:///.taskspace/store-example.db")
store = space.store

# A lease: capacity 1 is a lock. Every grant has its own id and a token larger
# than any token the space handed out before (task claims included).
first = store.leases.acquire("report", holder="writer-a", ttl=5.0, data=b"writer-a")
assert first is not None
assert store.leases.acquire("report", holder="writer-b", ttl=5.0) is None  # held

# A fenced write: the txn applies only while the grant is still current.
done = store.kv.txn([GrantHeld(first)], [Put("report/latest", b"v1")])
assert done.ok


# Another process waits for the lock; the release wakes it at once.
tokens: list[int] = []


def second_writer() -> None:
    store.leases.wait("report", timeout=5.0)
    grant = store.leases.acquire("report", holder="writer-b", ttl=5.0)
    if grant is not None:
        tokens.append(grant.token)
        store.leases.release(grant)


waiter = threading.Thread(target=second_writer)
waiter.start()
store.leases.release(first)
waiter.join()
assert tokens and tokens[0] > first.token, tokens  # a later grant, a larger token

# The stale holder's write is refused: its grant is no longer current.
late = store.kv.txn([GrantHeld(first)], [Put("report/latest", b"stale")])
print("stale write refused:", not late.ok, "at compare", late.failed)

# Compare-and-set on versions: a version is never reused, so there is no ABA.
current = store.kv.get("report/latest")
assert current is not None
swap = store.kv.txn([VersionIs("report/latest", current.version)], [Put("report/latest", b"v2")])
print("cas:", swap.ok)

# The change feed: every put, delete and expiry in revision order.
for change in store.kv.changes("report/", after_revision=0):
    print(f"revision {change.revision}: {change.kind} {change.key} = {change.value!r}")

# Streams: a read can block until an entry arrives.
threading.Timer(0.1, lambda: store.streams.append("events", b"hello")).start()
entries = store.streams.read("events", after=0, wait=5.0)
print("stream:", [e.data for e in entries])

space.close()
