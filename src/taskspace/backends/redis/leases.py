"""LeaseStore on Redis: named leases with capacity, fencing tokens and waits.

Layout and retention (keys under the space prefix P; see ``lua/_lease.lua``):

- ``lz:<name>`` (zset grant id -> expiry), ``lg:<name>\\n<id>`` (hash per
  grant) and ``lc:<name>`` (the capacity): the live grants. Each key carries a
  Redis expiry one second past the grant(s) it holds, and every acquire or
  wait prunes a name's expired grants, so nothing outlives its grants by more
  than a second.
- ``lwq:<name>`` / ``lw:<waiter>``: the waiters of a name (deleted by a
  release, else expiring with the longest wait) and each waiter's own wake
  list, where a release pushes one token (expiring within seconds).

Tokens come from the space's one fencing counter (``next_tokens`` in
``lua/common.lua``), shared with task claims.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from taskspace.backends.base import Grant
from taskspace.backends.checks import (
    check_acquire,
    check_ttl,
)
from taskspace.backends.redis.conn import RedisConnection
from taskspace.errors import ConfigError

# One BLPOP of a wait lasts at most this long (below the reads client's socket
# timeout, conn.READ_TIMEOUT_S), so a stalled connection fails a wait quickly.
WAIT_STEP_S = 0.5


def pop_wake(conn: RedisConnection, key: str, timeout: float) -> bool:
    """BLPOP ``key`` for up to ``timeout`` s (below conn.READ_TIMEOUT_S) on the
    reads client; True if a wake token was popped."""
    return conn.call(lambda: conn.reads.blpop([key], timeout=timeout)) is not None


def _grant(name: str, row: Sequence[bytes]) -> Grant:
    gid, holder, token, expires, data = row
    return Grant(name, gid.decode(), holder.decode(), int(token), float(expires), data)


class RedisLeases:
    """Named leases (see base.LeaseStore); every call is one Lua script."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def acquire(
        self,
        name: str,
        holder: str,
        ttl: float,
        capacity: int = 1,
        data: bytes = b"",
        grant_id: str | None = None,
    ) -> Grant | None:
        check_acquire(name, ttl, capacity, grant_id)
        gid = grant_id or uuid.uuid4().hex
        args = [name, gid, holder, int(capacity), repr(float(ttl)), data]
        # Lease scripts are O(1) and safe to repeat (acquire by grant id, renew and
        # release by token), so they run on the short-timeout client: a stalled
        # Redis costs a caller READ_TIMEOUT_S, never the scripts' 10 s timeout
        # ("try once" stays quick; a holder's renewals keep their deadline).
        reply = self._conn.run("lease_acquire", args, read=True)
        kind = reply[0]
        if kind == b"ok":
            return _grant(name, reply[1:])
        if kind == b"capacity":
            raise ConfigError(
                f"lease {name!r} is held with capacity {int(reply[1])}, "
                f"not {capacity}: every acquirer must agree on a name's capacity"
            )
        if kind == b"grant_id":
            raise ConfigError(
                f"grant_id={gid!r} is a live grant of lease {reply[1].decode()!r}, not of {name!r}"
            )
        return None

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        check_ttl(ttl, optional=False)
        if not grants:
            return []
        args: list[object] = [repr(float(ttl))]
        for g in grants:
            args += [g.name, g.id, g.token]
        replies = self._conn.run("lease_renew", args, read=True)
        return [
            None if reply is None else Grant(g.name, g.id, g.holder, g.token, float(reply), g.data)
            for g, reply in zip(grants, replies, strict=True)
        ]

    def release(self, grant: Grant) -> bool:
        args = [grant.name, grant.id, grant.token]
        return bool(self._conn.run("lease_release", args, read=True))

    def holders(self, name: str) -> list[Grant]:
        rows = self._conn.run("lease_holders", [name], read=True)
        return sorted((_grant(name, row) for row in rows), key=lambda g: g.token)

    def wait(self, name: str, timeout: float) -> None:
        """Registers this wait with the name, then blocks in BLPOP (steps of
        WAIT_STEP_S on the reads client) on its own wake list, which a
        ``release`` fills, until a release, the earliest live grant's expiry
        or ``timeout`` (Redis ends a BLPOP on its event-loop tick: up to about
        100 ms late at the default ``hz 10``)."""
        conn = self._conn
        waiter = uuid.uuid4().hex
        key = f"{conn.prefix}lw:{waiter}"
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            step = min(left, WAIT_STEP_S)
            # On the reads client: a stalled server fails the wait within about a second.
            args = [name, waiter, repr(step)]
            until_expiry = float(conn.run("lease_wait", args, read=True))
            if until_expiry <= 0:
                return
            block = max(0.001, min(step, until_expiry))
            if pop_wake(conn, key, block):
                return
            if until_expiry <= step:
                return
