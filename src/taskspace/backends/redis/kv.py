"""KVStore on Redis (contract v2; work in progress)."""

from __future__ import annotations

from collections.abc import Sequence

from taskspace.backends.base import Change, Compare, TxnResult, Versioned, Write
from taskspace.backends.redis.conn import RedisConnection


def _ttl_ms(ttl: float | None) -> str:
    return "" if ttl is None else str(max(1, round(ttl * 1000)))


def _float(value: bytes | None) -> float | None:
    return None if not value else float(value)


class RedisKV:
    """Versioned keys (see base.KVStore)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    def get(self, key: str) -> Versioned | None:
        reply = self._conn.run("kv_get", [key])
        if reply is None:
            return None
        return Versioned(reply[0], int(reply[1]), int(reply[1]), _float(reply[2]))

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        return [self.get(k) for k in keys]

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        version = int(self._conn.run("kv_set", [key, "put", "", value, _ttl_ms(ttl)]))
        return Versioned(value, version, version, None)

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        expected = "" if expected_version is None else str(expected_version)
        reply = self._conn.run("kv_set", [key, "cas", expected, value, _ttl_ms(ttl)])
        return None if reply is None else Versioned(value, int(reply), int(reply), None)

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        return int(self._conn.run("kv_incr", [key, delta, _ttl_ms(ttl)]))

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        expected = "" if expected_version is None else str(expected_version)
        return bool(self._conn.run("kv_delete", [key, expected]))

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        raise NotImplementedError

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        flat = self._conn.run("kv_scan", [prefix, limit])
        return [
            (
                flat[i].decode(),
                Versioned(flat[i + 1], int(flat[i + 2]), int(flat[i + 2]), _float(flat[i + 3])),
            )
            for i in range(0, len(flat), 4)
        ]

    def txn(
        self, compares: Sequence[Compare], writes: Sequence[Write], request_id: str | None = None
    ) -> TxnResult:
        raise NotImplementedError

    def revision(self) -> int:
        raise NotImplementedError

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        raise NotImplementedError

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        raise NotImplementedError

    def reap(self, limit: int = 1000) -> int:
        return 0
