"""Named leases, versioned KV, streams and pubsub on Redis."""

from __future__ import annotations

from collections.abc import Sequence

from taskspace.backends.base import Grant, StreamEntry, Versioned
from taskspace.backends.redis.conn import RedisConnection
from taskspace.backends.redis.subscription import RedisSubscription


def _float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _ttl_ms(ttl: float | None) -> str:
    return "" if ttl is None else str(max(1, round(ttl * 1000)))


class OtherOps(RedisConnection):
    """LeaseStore, KVStore, StreamStore and PubSub."""

    # -- LeaseStore ---------------------------------------------------------

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        reply = self.run("lease_acquire", [name, holder, capacity, repr(float(ttl))])
        return None if reply is None else Grant(name, holder, int(reply[0]), float(reply[1]))

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        args = [grant.name, grant.holder, grant.token, repr(float(ttl))]
        reply = self.run("lease_renew", args)
        return None if reply is None else Grant(grant.name, grant.holder, grant.token, float(reply))

    def release(self, grant: Grant) -> bool:
        return bool(self.run("lease_release", [grant.name, grant.holder, grant.token]))

    def holders(self, name: str) -> list[Grant]:
        flat = self.run("lease_holders", [name])
        grants = [
            Grant(name, flat[i].decode(), int(flat[i + 1]), float(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]
        return sorted(grants, key=lambda g: g.token)

    # -- KVStore ------------------------------------------------------------

    def kv_get(self, key: str) -> Versioned | None:
        reply = self.run("kv_get", [key])
        if reply is None:
            return None
        return Versioned(reply[0], int(reply[1]), _float(reply[2]))

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        return int(self.run("kv_set", [key, "put", "", value, _ttl_ms(ttl)]))

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        expected = "" if expected_version is None else str(expected_version)
        reply = self.run("kv_set", [key, "cas", expected, value, _ttl_ms(ttl)])
        return None if reply is None else int(reply)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        return int(self.run("kv_incr", [key, delta, _ttl_ms(ttl)]))

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        expected = "" if expected_version is None else str(expected_version)
        return bool(self.run("kv_delete", [key, expected]))

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        flat = self.run("kv_scan", [prefix, -1 if limit is None else limit])
        return [
            (
                flat[i].decode(),
                Versioned(flat[i + 1], int(flat[i + 2]), _float(flat[i + 3] or None)),
            )
            for i in range(0, len(flat), 4)
        ]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        return int(self.run("append", [stream, data, "" if maxlen is None else maxlen]))

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        key = f"{self.prefix}s:{stream}"
        rows = self.call(lambda: self.reads.xrange(key, min=f"{after + 1}-0", count=limit))
        return [
            StreamEntry(int(entry_id.split(b"-")[0]), fields[b"d"], float(fields[b"t"]))
            for entry_id, fields in rows
        ]

    def trim(self, stream: str, maxlen: int) -> int:
        key = f"{self.prefix}s:{stream}"
        return int(self.call(lambda: self.client.xtrim(key, maxlen=maxlen, approximate=False)))

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        self.call(lambda: self.client.publish(f"{self.prefix}ch:{channel}", data))

    def subscribe(self, channels: Sequence[str]) -> RedisSubscription:
        return RedisSubscription(self, channels)
