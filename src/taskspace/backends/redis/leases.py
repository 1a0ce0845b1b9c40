"""LeaseStore on Redis (contract v2; work in progress)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from taskspace.backends.base import Grant
from taskspace.backends.redis.conn import RedisConnection


class RedisLeases:
    """Named leases (see base.LeaseStore)."""

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
        gid = grant_id or uuid.uuid4().hex
        reply = self._conn.run("lease_acquire", [name, gid, capacity, repr(float(ttl))])
        if reply is None:
            return None
        return Grant(name, gid, holder, int(reply[0]), float(reply[1]), data)

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        out: list[Grant | None] = []
        for g in grants:
            reply = self._conn.run("lease_renew", [g.name, g.id, g.token, repr(float(ttl))])
            out.append(
                None
                if reply is None
                else Grant(g.name, g.id, g.holder, g.token, float(reply), g.data)
            )
        return out

    def release(self, grant: Grant) -> bool:
        return bool(self._conn.run("lease_release", [grant.name, grant.id, grant.token]))

    def holders(self, name: str) -> list[Grant]:
        flat = self._conn.run("lease_holders", [name])
        grants = [
            Grant(name, flat[i].decode(), flat[i].decode(), int(flat[i + 1]), float(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        return sorted(grants, key=lambda g: g.token)

    def wait(self, name: str, timeout: float) -> None:
        self._conn.block([f"{self._conn.prefix}leasewake:{name}"], min(timeout, 0.05))
