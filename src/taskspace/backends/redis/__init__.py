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

Clock: the Redis server's ``TIME``, read inside each script, so client clock
skew cannot extend or steal a lease.

Wake-ups: idle workers block in ``BLPOP`` on per-queue and per-(queue, name)
wake lists that every enqueue fills (bounded); result waiters register
interest and block in ``BLPOP`` on a per-task done list that the finishing
script fills only when someone registered. Nothing sleep-polls. A wait
returns, or raises BackendError, within about its timeout even behind a
stalled connection (see ``conn.py``).

Storage stays bounded: a settled task with a ``result_ttl`` is deleted by
``reap`` once it has passed, and its hash carries an EXPIRE an hour later as
a backstop (reap still fixes counts and indexes then); ``reap`` also drops
expired KV keys from the KV index.

Faults: every Redis error surfaces as :class:`~taskspace.errors.BackendError`;
workers retry with backoff and resume when Redis returns. Every claim's
request id is remembered for ten minutes with what it leased: a retried claim
(its reply was lost) returns the tasks the first call leased, and a late
duplicate leases nothing, so no task is leased to nobody. (A finish whose
reply was lost and that is retried is refused as stale the second time; the
first one took effect.) Durability is Redis's: with ``appendonly yes`` and
``appendfsync always`` nothing acknowledged is lost across a Redis crash; with
``everysec`` up to about one second of acknowledged writes can be.
"""

from __future__ import annotations

from typing import Self

from taskspace.backends.redis.conn import check_namespace, split_namespace
from taskspace.backends.redis.other import OtherOps
from taskspace.backends.redis.queue import QueueOps

__all__ = ["RedisStore", "check_namespace", "split_namespace"]


class RedisStore(QueueOps, OtherOps):
    """All five store protocols on Redis (see the module docstring)."""

    # Transitional: callers use ``store.queue`` and ``store.clock`` (contract v2)
    # while the per-protocol objects are being built.
    @property
    def queue(self) -> Self:
        return self

    @property
    def clock(self) -> Self:
        return self

    def now(self) -> float:
        seconds, micros = self.call(self.reads.time)
        return float(seconds) + float(micros) / 1e6
