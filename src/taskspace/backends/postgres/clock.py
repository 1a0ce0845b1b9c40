"""The store's clocks on PostgreSQL: the server's, never a client's."""

from __future__ import annotations

from taskspace.backends.postgres.conn import PgConn

# The lease clock in SQL; every statement that compares an expiry computes it
# once (a CTE or a parameter), never per row.
LEASE_NOW_SQL = "lease_now()"
# The wall clock in SQL: Unix epoch seconds of the server.
WALL_SQL = "extract(epoch FROM clock_timestamp())::double precision"


class PgClock:
    """``now()`` is the lease clock every statement uses (the schema function
    ``lease_now()``, see schema.py): the server's ``clock_timestamp()`` plus
    the space's offset, held at a high-water mark stored in the space when the
    server's clock steps back, so it never goes backwards (a step back under a
    second may go unnoticed, as on Redis); the mark follows backups, restores
    and failovers with the data. ``wall()`` is the server's clock as Unix epoch
    seconds. Both raise BackendError when the server fails."""

    def __init__(self, conn: PgConn) -> None:
        self._conn = conn

    def now(self) -> float:
        return float(self._conn.read(f"SELECT {LEASE_NOW_SQL}")[0][0])

    def wall(self) -> float:
        return float(self._conn.read(f"SELECT {WALL_SQL}")[0][0])
