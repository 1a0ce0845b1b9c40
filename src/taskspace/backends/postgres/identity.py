"""The identity record of a PostgreSQL space (``meta.space_id`` in its
schema): created with the schema, read when a store opens it, compared by
``check_space``."""

from __future__ import annotations

from typing import Any

from taskspace.backends.postgres.conn import PgConn
from taskspace.backends.postgres.schema import migrate
from taskspace.errors import SpaceLost


def open_space(conn: PgConn, create: bool) -> str:
    """The space id of ``conn``'s schema, migrating the schema first (see
    schema.migrate): SpaceNotFound without ``create`` for a schema that holds
    no space, ConfigError for a newer schema, BackendError on failure."""
    return migrate(conn, create)


def check_space(conn: PgConn, space_id: str) -> None:
    """SpaceLost if the schema, its identity record, or the record's value
    changed (the schema was dropped, or recreated by someone else);
    BackendError if it cannot be read."""

    def read(cur: Any) -> str | None:
        cur.execute("SELECT to_regclass('meta') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute("SELECT value FROM meta WHERE key = 'space_id'")
        row = cur.fetchone()
        return None if row is None else str(row[0])

    current = conn.run(read, "reading the space id")
    if current != space_id:
        now = "gone" if current is None else f"now {current}"
        raise SpaceLost(
            f"the space at {conn.display} (schema {conn.schema!r}) was wiped or replaced"
            f" since this client opened it (space {space_id}, {now}); what it held is lost"
        )
