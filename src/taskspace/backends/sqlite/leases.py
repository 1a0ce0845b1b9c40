"""LeaseStore of the SQLite backend: one row per grant."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence

from taskspace.backends.base import Grant
from taskspace.backends.checks import (
    check_acquire,
    check_ttl,
)
from taskspace.backends.sqlite.base import SQLiteConn
from taskspace.backends.sqlite.waiter import Waiter
from taskspace.errors import ConfigError

GRANT_COLUMNS = "name, id, holder, token, expires, data"


def _grant(row: Sequence[object]) -> Grant:
    return Grant(str(row[0]), str(row[1]), str(row[2]), int(row[3]), float(row[4]), bytes(row[5]))  # type: ignore[arg-type,call-overload]


class SQLiteLeases:
    """Named leases: a grant is a row (id, name, holder, token, expires, data,
    capacity); a name's capacity is the one its live grants carry. Expired grants
    are deleted by the next acquire; they never count before that either."""

    def __init__(self, conn: SQLiteConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter

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
        with self._c.write() as db:
            now = self._c.clock.now()
            db.execute("DELETE FROM lease_grants WHERE expires <= ?", (now,))
            if grant_id is not None:
                row = db.execute(
                    f"SELECT {GRANT_COLUMNS} FROM lease_grants WHERE id = ?", (grant_id,)
                ).fetchone()
                if row is not None:
                    if row[0] != name:
                        raise ConfigError(
                            f"grant_id={grant_id!r} is a live grant of lease {row[0]!r},"
                            f" not of {name!r}"
                        )
                    return _grant(row)
            held, stored = self._live(db, name)
            if stored is not None and stored != capacity:
                raise ConfigError(
                    f"lease {name!r} is held with capacity {stored}; acquire asked for"
                    f" capacity {capacity} (every holder must agree on the size)"
                )
            if held >= capacity:
                return None
            (token,) = self._c.tokens(db, 1)
            grant = Grant(name, grant_id or uuid.uuid4().hex, holder, token, now + ttl, data)
            db.execute(
                "INSERT INTO lease_grants (id, name, holder, token, expires, data, capacity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (grant.id, name, holder, token, grant.expires, data, capacity),
            )
            return grant

    @staticmethod
    def _live(db: sqlite3.Connection, name: str) -> tuple[int, int | None]:
        """How many grants of ``name`` are live (expired ones were just deleted) and
        the capacity they carry (None: no grant, or only migrated ones)."""
        held, capacity = db.execute(
            "SELECT COUNT(*), MAX(capacity) FROM lease_grants WHERE name = ?", (name,)
        ).fetchone()
        return int(held), None if capacity is None else int(capacity)

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        check_ttl(ttl, optional=False)
        if not grants:
            return []
        out: list[Grant | None] = []
        with self._c.write() as db:
            now = self._c.clock.now()
            for grant in grants:
                cur = db.execute(
                    "UPDATE lease_grants SET expires = ? WHERE id = ? AND token = ?"
                    " AND name = ? AND expires > ?",
                    (now + ttl, grant.id, grant.token, grant.name, now),
                )
                out.append(
                    Grant(grant.name, grant.id, grant.holder, grant.token, now + ttl, grant.data)
                    if cur.rowcount
                    else None
                )
        return out

    def release(self, grant: Grant) -> bool:
        with self._c.write() as db:
            cur = db.execute(
                "DELETE FROM lease_grants WHERE id = ? AND token = ? AND name = ? AND expires > ?",
                (grant.id, grant.token, grant.name, self._c.clock.now()),
            )
            return cur.rowcount == 1

    def holders(self, name: str) -> list[Grant]:
        rows = self._c.read(
            f"SELECT {GRANT_COLUMNS} FROM lease_grants WHERE name = ? AND expires > ?"
            " ORDER BY token",
            (name, self._c.clock.now()),
        )
        return [_grant(row) for row in rows]

    def wait(self, name: str, timeout: float) -> None:
        def ready() -> float | None:
            held, capacity, earliest = self._c.read(
                "SELECT COUNT(*), MAX(capacity), MIN(expires) FROM lease_grants"
                " WHERE name = ? AND expires > ?",
                (name, self._c.clock.now()),
            )[0]
            if held == 0 or (capacity is not None and held < capacity):
                return None  # a slot is free now
            return float(earliest) - self._c.clock.now()

        self._waiter.until(ready, timeout)
