"""LeaseStore on PostgreSQL: a grant is a row of ``lease_grants``; every
acquire of a name first locks that name's row of ``lease_names``.

Capacity under READ COMMITTED: an acquire runs ``SELECT … FOR UPDATE`` on the
name's row (inserting it the first time) in a statement of its own, so the
statements after it take their snapshots once every earlier acquire of the
name has committed; it then counts the live grants and inserts its own before
it commits and lets the next one in. A renew locks the names it renews
``FOR SHARE`` (renewals of one name never wait for each other, but never
overlap an acquire), so a renewal cannot revive a grant an acquire already
counted as expired. Expired grants never count (every query compares
``expires`` with the lease clock); the next acquire of the name deletes them,
and ``kv.reap`` (maintenance) prunes the expired grants and idle names of
every other name in small batches.

Tokens come from the space's one fencing counter (``PgConn.tokens``), shared
with task claims. A release wakes ``wait`` in every process through the
waiter (a NOTIFY only when a process is waiting on the name).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import Grant
from taskspace.backends.checks import check_acquire, check_ttl
from taskspace.backends.postgres.clock import LEASE_NOW_SQL
from taskspace.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

    from taskspace.backends.postgres.conn import PgConn
    from taskspace.backends.postgres.waiter import Waiter

GRANT_COLUMNS = "name, id, holder, token, expires, data"
# The lease clock, read once per statement.
NOW = f"t AS MATERIALIZED (SELECT {LEASE_NOW_SQL} AS now)"
# Expired grants and idle names one prune (kv.reap) deletes at most.
PRUNE_BATCH = 1000


def _grant(row: Sequence[Any]) -> Grant:
    return Grant(str(row[0]), str(row[1]), str(row[2]), int(row[3]), float(row[4]), bytes(row[5]))


def wait_key(name: str) -> str:
    """The waiter key a release of lease ``name`` notifies."""
    return f"l:{name}"


class PgLeases:
    """Named leases (see base.LeaseStore and the module docstring)."""

    def __init__(self, conn: PgConn, waiter: Waiter) -> None:
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
        gid = grant_id or uuid.uuid4().hex

        def body(cur: psycopg.Cursor[Any]) -> Grant | None:
            self._lock_name(cur, name)
            # After the lock (a statement of its own: a fresh snapshot and clock):
            # delete the name's expired grants, read its live ones and a live
            # grant with this id.
            cur.execute(
                f"WITH {NOW}, gone AS (DELETE FROM lease_grants g USING t"
                " WHERE g.name = %(name)s AND g.expires <= t.now)"
                " SELECT t.now, g.name, g.id, g.holder, g.token, g.expires, g.data, g.capacity"
                " FROM t LEFT JOIN lease_grants g"
                " ON (g.name = %(name)s OR g.id = %(gid)s) AND g.expires > t.now",
                {"name": name, "gid": gid},
            )
            found = cur.fetchall()
            now = float(found[0][0])
            rows = [row[1:] for row in found if row[1] is not None]
            for row in rows:
                if row[1] == gid:
                    if row[0] != name:
                        raise ConfigError(
                            f"grant_id={gid!r} is a live grant of lease {row[0]!r}, not of {name!r}"
                        )
                    return _grant(row)  # a retried acquire: the grant unchanged
            live = [row for row in rows if row[0] == name]
            stored = max((int(row[6]) for row in live), default=None)
            if stored is not None and stored != capacity:
                raise ConfigError(
                    f"lease {name!r} is held with capacity {stored}; acquire asked for"
                    f" capacity {capacity} (every holder must agree on the size)"
                )
            if len(live) >= capacity:
                return None
            (token,) = self._c.tokens(cur, 1)
            expires = now + ttl
            # An expired grant with this id (of any name) is replaced; a live one
            # of another name that appeared since the read above is refused.
            cur.execute(
                "INSERT INTO lease_grants (id, name, holder, token, expires, data, capacity)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " name = EXCLUDED.name, holder = EXCLUDED.holder, token = EXCLUDED.token,"
                " expires = EXCLUDED.expires, data = EXCLUDED.data, capacity = EXCLUDED.capacity"
                " WHERE lease_grants.expires <= %s RETURNING id",
                (gid, name, holder, token, expires, data, capacity, now),
            )
            if cur.fetchone() is None:
                raise ConfigError(f"grant_id={gid!r} is a live grant of another lease")
            return Grant(name, gid, holder, token, expires, data)

        return self._c.run(body, "leases.acquire")

    @staticmethod
    def _lock_name(cur: psycopg.Cursor[Any], name: str) -> None:
        """Lock the name's row (creating it the first time) in a statement of its
        own, so the statements after it see every earlier acquire of the name."""
        while True:
            cur.execute("SELECT 1 FROM lease_names WHERE name = %s FOR UPDATE", (name,))
            if cur.fetchone() is not None:
                return
            # First use of the name (or a prune just deleted it): create it; a
            # concurrent creator makes this wait for its commit, then do nothing.
            cur.execute(
                "INSERT INTO lease_names (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                (name,),
            )

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        check_ttl(ttl, optional=False)
        if not grants:
            return []
        names = sorted({g.name for g in grants})

        def body(cur: psycopg.Cursor[Any]) -> list[Grant | None]:
            # FOR SHARE, in name order: never while an acquire of one of them runs.
            cur.execute(
                "SELECT name FROM lease_names WHERE name = ANY(%s) ORDER BY name FOR SHARE",
                (names,),
            )
            cur.execute(
                f"WITH {NOW}"
                " UPDATE lease_grants g SET expires = t.now + %s"
                " FROM t, unnest(%s::text[], %s::bigint[], %s::text[]) AS r(id, token, name)"
                " WHERE g.id = r.id AND g.token = r.token AND g.name = r.name"
                " AND g.expires > t.now RETURNING g.id, g.token, g.expires",
                (
                    ttl,
                    [g.id for g in grants],
                    [g.token for g in grants],
                    [g.name for g in grants],
                ),
            )
            renewed = {(str(i), int(t)): float(e) for i, t, e in cur.fetchall()}
            out: list[Grant | None] = []
            for g in grants:
                expires = renewed.get((g.id, g.token))
                out.append(
                    None
                    if expires is None
                    else Grant(g.name, g.id, g.holder, g.token, expires, g.data)
                )
            return out

        return self._c.run(body, "leases.renew")

    def release(self, grant: Grant) -> bool:
        def body(cur: psycopg.Cursor[Any]) -> bool:
            cur.execute(
                f"WITH {NOW} DELETE FROM lease_grants USING t WHERE id = %s AND token = %s"
                " AND name = %s AND expires > t.now",
                (grant.id, grant.token, grant.name),
            )
            released = cur.rowcount == 1
            if released:
                self._waiter.notify(cur, [wait_key(grant.name)])
            return released

        return self._c.run(body, "leases.release")

    def holders(self, name: str) -> list[Grant]:
        rows = self._c.read(
            f"WITH {NOW} SELECT {GRANT_COLUMNS} FROM lease_grants, t"
            " WHERE name = %s AND expires > t.now ORDER BY token",
            (name,),
        )
        return [_grant(row) for row in rows]

    def wait(self, name: str, timeout: float) -> None:
        """Returns on a release of ``name`` (a NOTIFY through the waiter), by the
        earliest live grant's expiry, or at ``timeout``."""

        def ready() -> float | None:
            held, capacity, until = self._c.read(
                f"WITH {NOW} SELECT count(*), max(capacity), min(expires) - min(t.now)"
                " FROM lease_grants, t WHERE name = %s AND expires > t.now",
                (name,),
            )[0]
            if held == 0 or (capacity is not None and held < capacity):
                return None  # a slot is free now
            return max(0.0, float(until))

        self._waiter.until([wait_key(name)], ready, timeout)


def prune_leases(cur: psycopg.Cursor[Any], now: float) -> None:
    """Delete up to PRUNE_BATCH expired grants and names without grants,
    skipping rows another transaction holds (run by kv.reap)."""
    cur.execute(
        "DELETE FROM lease_grants WHERE id IN (SELECT id FROM lease_grants"
        " WHERE expires <= %s LIMIT %s FOR UPDATE SKIP LOCKED)",
        (now, PRUNE_BATCH),
    )
    cur.execute(
        "DELETE FROM lease_names WHERE name IN (SELECT n.name FROM lease_names n"
        " WHERE NOT EXISTS (SELECT 1 FROM lease_grants g WHERE g.name = n.name)"
        " LIMIT %s FOR UPDATE SKIP LOCKED)",
        (PRUNE_BATCH,),
    )
