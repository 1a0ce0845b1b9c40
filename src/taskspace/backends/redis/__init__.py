"""Redis backend: one Space across many machines.

Atomicity: every store operation is one Lua script (``lua/``), which Redis
runs without interleaving any other command; reads that need no decision
are single commands. Exceptions, each documented where it happens: a large
``push`` runs as several scripts of at most 1,000 tasks (atomic and durable
per chunk, so no script blocks Redis for more than about 50 ms), and
``list``/``purge`` walk the task index in steps (atomic per step).

Keys: every key of a space starts with ``ts:{<namespace>}:``. The braces are
a hash tag, so all keys of a space live in one slot and the scripts work on
Redis Cluster; several spaces share one Redis under different namespaces.
Ready tasks are kept per (queue, task name), so a claim for some names costs
the same however many tasks of other names wait (see ``lua/claim.lua``).

Clock: the lease clock is the Redis server's ``TIME``, read inside each
script, so client clock skew cannot extend or steal a lease; a high-water
mark kept in the space (``P..'clock'``, rewritten at most once a second)
keeps it from going backwards when the server's clock steps back (see
``clock()`` in ``lua/common.lua``). Fencing tokens come from one counter per
space (``next_tokens``), never below the wall clock in microseconds.

Identity: ``P..'space'`` holds the space id, set by the first open with
``create=True``; ``check_space`` raises SpaceLost once it is gone (FLUSHALL,
a restart without persistence) or replaced.

Wake-ups: idle workers block in ``BLPOP`` on per-queue and per-(queue, name)
wake lists that every enqueue fills (bounded); result waiters register
interest and block in ``BLPOP`` on a per-task done list that the finishing
script fills only when someone registered, with the final record itself, so
the waiter's next ``get`` needs no round trip. Nothing sleep-polls. A wait
returns, or raises BackendError, within about its timeout even behind a
stalled connection (see ``conn.py``).

Storage stays bounded: a settled task with a ``result_ttl`` is deleted by
``queue.reap`` once it has passed, and its hash carries an EXPIRE an hour
later as a backstop (reap still fixes counts and indexes then).

Faults: every Redis error surfaces as :class:`~taskspace.errors.BackendError`;
workers retry with backoff and resume when Redis returns. Every claim's
request id is remembered for ten minutes with what it leased: a retried claim
(its reply was lost) returns the tasks the first call leased, and a late
duplicate leases nothing, so no task is leased to nobody. A finish whose reply
was lost and that is retried is answered True again with no second effect
(the task keeps the token of its accepted finish). Durability is Redis's:
with ``appendonly yes`` and ``appendfsync always`` nothing acknowledged is
lost across a Redis crash; with ``everysec`` up to about one second of
acknowledged writes can be.
"""

from __future__ import annotations

from taskspace.backends.redis.clock import RedisClock
from taskspace.backends.redis.conn import RedisConnection, check_namespace, split_namespace
from taskspace.backends.redis.identity import check_space, open_space
from taskspace.backends.redis.kv import RedisKV
from taskspace.backends.redis.leases import RedisLeases
from taskspace.backends.redis.pubsub import RedisPubSub
from taskspace.backends.redis.queue import RedisQueue
from taskspace.backends.redis.streams import RedisStreams

__all__ = ["RedisStore", "check_namespace", "split_namespace"]


class RedisStore:
    """A space on Redis: one object per protocol (``queue``, ``leases``,
    ``kv``, ``streams``, ``pubsub``, ``clock``) on one connection.

    Opening reads the space id (``space_id``): ``create=True`` creates the
    space if the namespace holds none; ``create=False`` raises SpaceNotFound
    for an empty namespace. BackendError if Redis cannot be reached;
    InvalidURL for a malformed URL or namespace."""

    def __init__(self, url: str, namespace: str | None = None, create: bool = True) -> None:
        self.url = url
        self.conn = RedisConnection(url, namespace)
        try:
            self.space_id: str = open_space(self.conn, create)
        except BaseException:
            self.conn.close()
            raise
        self.queue = RedisQueue(self.conn)
        self.leases = RedisLeases(self.conn)
        self.kv = RedisKV(self.conn)
        self.streams = RedisStreams(self.conn)
        self.pubsub = RedisPubSub(self.conn)
        self.clock = RedisClock(self.conn)

    @property
    def prefix(self) -> str:
        """The key prefix of the space (``ts:{<namespace>}:``)."""
        return self.conn.prefix

    def check_space(self) -> None:
        """SpaceLost if the space was wiped or replaced since it was opened;
        BackendError if Redis cannot be read."""
        check_space(self.conn, self.space_id)

    def close(self) -> None:
        """Close the subscriptions and connections; idempotent."""
        self.pubsub.close()
        self.conn.close()
