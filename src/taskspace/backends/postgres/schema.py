"""The PostgreSQL schema of a space: versioned, idempotent migrations under
the space's schema name, and the SQL functions the statements use.

``migrate`` runs under a transaction-level advisory lock keyed by the schema
name, so concurrent openers (and ``taskspace db upgrade``) apply each
migration exactly once; a schema written by a newer taskspace (its
``schema_version`` above SCHEMA_VERSION) is refused with ConfigError and
nothing is changed.

Tables of the queue (the rest are PGSTATE's, ``state_schema.STATE_DDL``):

- ``tasks``: the HOT table, live tasks only (queued and running). Ready tasks
  sit in partial indexes that hold no delayed task (``waiting``), so a claim
  reads the first rows of one index range however many delayed tasks pile up.
  Small, rewritten all the time: autovacuum is told to visit it often.
- ``done``: finished tasks (results), moved there by the finish that ends
  them, insert-then-delete only (``queue.reap`` deletes in batches), so the
  hot table never carries them and their dead tuples.
- ``claim_requests``: request ids of claims and what they leased (kept
  REQUEST_ID_TTL_S).
- ``waiters``: UNLOGGED; who may be waiting on which key until when, so
  writers NOTIFY only when someone may wait (waiter.py).
- ``meta`` (schema_version, space_id, stale_finishes) and ``clock`` (the lease
  clock's high-water mark and offset).
- SEQUENCEs ``tokens`` (fencing tokens, shared with leases) and ``task_seq``
  (submission order).

The ``next_token`` rule (``max(last + 1, wall µs)``) is kept as: ``tokens``
starts at the wall clock in microseconds, and ``bump_counters()`` (run on
every new connection, under an advisory lock) moves it and ``kv_revision`` up
to the wall clock when they are more than a second behind it. A sequence
only loses values through a restore or a failover to a replica that missed
them, and every connection after either is new, so the first token handed
out afterwards is above every earlier one (which were below the wall clock
of their time, as long as fewer than a million are taken per second).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from taskspace.backends.postgres.state_schema import STATE_DDL
from taskspace.errors import ConfigError, SpaceNotFound

if TYPE_CHECKING:
    import psycopg

    from taskspace.backends.postgres.conn import PgConn

SCHEMA_VERSION = 1

# Columns of tasks and done (same layout: a finish moves a row as it is).
TASK_TABLE = """(
    seq bigint PRIMARY KEY,
    id text COLLATE "C" NOT NULL UNIQUE,
    name text COLLATE "C" NOT NULL,
    payload bytea NOT NULL,
    codec text NOT NULL,
    queue text COLLATE "C" NOT NULL,
    priority integer NOT NULL,
    max_attempts integer NOT NULL,
    lease_s double precision NOT NULL,
    timeout double precision,
    dedup_key text COLLATE "C",
    state text NOT NULL,
    ready_at double precision NOT NULL,
    waiting boolean NOT NULL DEFAULT false,
    attempts integer NOT NULL DEFAULT 0,
    lost integer NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0,
    worker text,
    lease_expires double precision,
    result bytea,
    error jsonb,
    progress_done double precision,
    progress_total double precision,
    cancel_requested smallint NOT NULL DEFAULT 0,
    created double precision NOT NULL,
    started double precision,
    finished double precision,
    result_ttl double precision,
    reap_at double precision,
    finish_token bigint
)"""

# The lease clock in SQL (clock.py documents it): the server's
# clock_timestamp() plus the space's offset, held at the high-water mark
# `mark` when the server's clock stepped back; the mark is rewritten at most
# about once a second, skipping when another session holds the row (never a
# wait on it), so a caller pays one primary-key read.
LEASE_NOW = """
CREATE OR REPLACE FUNCTION {s}.lease_now() RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    t double precision := extract(epoch FROM clock_timestamp());
    m double precision;
    o double precision;
    n double precision;
BEGIN
    SELECT mark, "offset" INTO m, o FROM {s}.clock WHERE id = 1;
    n := t + o;
    IF n < m - 1.0 THEN
        -- the server's clock stepped back: resume at the mark
        n := m;
        UPDATE {s}.clock SET mark = n + 1.0, "offset" = n - t
        WHERE id = (SELECT id FROM {s}.clock WHERE id = 1 FOR UPDATE SKIP LOCKED);
    ELSIF n > m THEN
        UPDATE {s}.clock SET mark = n + 1.0
        WHERE id = (SELECT id FROM {s}.clock WHERE id = 1 FOR UPDATE SKIP LOCKED)
          AND mark < n + 1.0;
    END IF;
    RETURN n;
END $$"""

# The next_token rule for SEQUENCEs (see the module docstring); the advisory
# lock serialises the check and the setval so two bumps can never go back.
BUMP_COUNTERS = """
CREATE OR REPLACE FUNCTION {s}.bump_counters() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    seq text;
    last bigint;
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    FOREACH seq IN ARRAY ARRAY['{s}.tokens', '{s}.kv_revision'] LOOP
        IF to_regclass(seq) IS NOT NULL THEN
            EXECUTE 'SELECT last_value FROM ' || seq INTO last;
            IF last < w - 1000000 THEN
                PERFORM setval(seq, w);
            END IF;
        END IF;
    END LOOP;
END $$"""

CORE_DDL: list[str] = [
    "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS clock (
        id integer PRIMARY KEY CHECK (id = 1),
        mark double precision NOT NULL,
        "offset" double precision NOT NULL DEFAULT 0
    )""",
    "INSERT INTO clock VALUES (1, extract(epoch FROM clock_timestamp()), 0)"
    " ON CONFLICT (id) DO NOTHING",
    "CREATE SEQUENCE IF NOT EXISTS tokens AS bigint",
    "CREATE SEQUENCE IF NOT EXISTS task_seq AS bigint",
    # The hot table: vacuumed early and often (it is small and churns).
    f"""CREATE TABLE IF NOT EXISTS tasks {TASK_TABLE} WITH (
        fillfactor = 90,
        autovacuum_vacuum_scale_factor = 0.0,
        autovacuum_vacuum_threshold = 2000,
        autovacuum_vacuum_insert_scale_factor = 0.0,
        autovacuum_vacuum_insert_threshold = 10000,
        autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0
    )""",
    f"CREATE TABLE IF NOT EXISTS done {TASK_TABLE}",
    # Claims with names: one index range per (queue, name), ready tasks only.
    "CREATE INDEX IF NOT EXISTS tasks_ready_by_name ON tasks (queue, name, priority DESC, seq)"
    " WHERE state = 'queued' AND NOT waiting",
    # Claims of any name: one index range per queue.
    "CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, priority DESC, seq)"
    " WHERE state = 'queued' AND NOT waiting",
    # Delayed tasks, by due time (promotion).
    "CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks (ready_at)"
    " WHERE state = 'queued' AND waiting",
    # Running tasks, by lease expiry (requeue_expired).
    "CREATE INDEX IF NOT EXISTS tasks_running ON tasks (lease_expires) WHERE state = 'running'",
    # Every task in tasks is live: dedup keys are unique among them.
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_dedup ON tasks (dedup_key)"
    " WHERE dedup_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS tasks_state ON tasks (queue, state)",
    "CREATE INDEX IF NOT EXISTS done_reap ON done (reap_at) WHERE reap_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS done_state ON done (queue, state)",
    """CREATE TABLE IF NOT EXISTS claim_requests (
        id text COLLATE "C" PRIMARY KEY,
        tasks text[] NOT NULL,
        tokens bigint[] NOT NULL,
        expires double precision NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS claim_requests_expires ON claim_requests (expires)",
    """CREATE UNLOGGED TABLE IF NOT EXISTS waiters (
        key text COLLATE "C" PRIMARY KEY,
        until double precision NOT NULL
    )""",
]


def lock_key(schema: str) -> str:
    """SQL for the advisory-lock key of ``schema`` (its migrations and counters)."""
    return f"hashtext('taskspace:{schema}')"


def functions(schema: str) -> list[str]:
    """The SQL functions of the schema (CREATE OR REPLACE: run by every migration)."""
    s = f'"{schema}"'
    return [
        LEASE_NOW.replace("{s}", s),
        BUMP_COUNTERS.replace("{s}", s).replace("{lock}", lock_key(schema)),
    ]


# Each migration: (version it produces, statements). Statements run with
# search_path = the schema; every one is idempotent.
def migrations(schema: str) -> list[tuple[int, list[str]]]:
    first = [
        *CORE_DDL,
        # Tokens start at the wall clock in microseconds (base.next_token).
        "SELECT setval('tokens', GREATEST((SELECT last_value FROM tokens),"
        " (extract(epoch FROM clock_timestamp()) * 1000000)::bigint))",
        *STATE_DDL,
        *functions(schema),
    ]
    return [(1, first)]


def _read_meta(cur: psycopg.Cursor[Any], schema: str) -> dict[str, str] | None:
    """The meta rows of ``schema``, or None if it has no meta table."""
    cur.execute("SELECT to_regclass(%s)", (f'"{schema}".meta',))
    row = cur.fetchone()
    if row is None or row[0] is None:
        return None
    cur.execute(f'SELECT key, value FROM "{schema}".meta')
    return {str(k): str(v) for k, v in cur.fetchall()}


def stored_version(meta: dict[str, str] | None) -> int:
    """The schema version ``meta`` records (0: no schema yet)."""
    if meta is None:
        return 0
    return int(meta.get("schema_version", "0"))


def status(conn: PgConn) -> dict[str, Any]:
    """What the database holds for the space: ``schema``, ``version`` (0: none),
    ``current`` (SCHEMA_VERSION), ``space_id`` (or None)."""
    meta = conn.run(lambda cur: _read_meta(cur, conn.schema), "reading the schema version")
    return {
        "schema": conn.schema,
        "version": stored_version(meta),
        "current": SCHEMA_VERSION,
        "space_id": None if meta is None else meta.get("space_id"),
    }


def _refuse_newer(version: int, conn: PgConn) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"schema {conn.schema!r} at {conn.display} has version {version}, newer than"
            f" this taskspace knows ({SCHEMA_VERSION}); upgrade taskspace to open it"
        )


def migrate(conn: PgConn, create: bool = True) -> str:
    """Bring the space's schema up to SCHEMA_VERSION and return its space id.

    Reads first (a current schema costs one query and takes no lock); else, in
    one transaction under the schema's advisory lock, creates the schema and
    applies each missing migration. ``create=False``: a schema without a
    space raises SpaceNotFound and nothing is created. ConfigError for a
    newer schema; BackendError when the server fails."""
    schema = conn.schema

    def current(cur: psycopg.Cursor[Any]) -> dict[str, str] | None:
        return _read_meta(cur, schema)

    meta = conn.run(current, "reading the schema version")
    version = stored_version(meta)
    _refuse_newer(version, conn)
    if meta is not None and version == SCHEMA_VERSION and "space_id" in meta:
        return meta["space_id"]
    if not create and (meta is None or "space_id" not in meta):
        raise SpaceNotFound(f"no space at {conn.display} (schema {schema!r}): nothing was created")

    def upgrade(cur: psycopg.Cursor[Any]) -> str:
        cur.execute(f"SELECT pg_advisory_xact_lock({lock_key(schema)})")
        cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        cur.execute(f'SET LOCAL search_path TO "{schema}"')
        meta = _read_meta(cur, schema)
        version = stored_version(meta)
        _refuse_newer(version, conn)
        for target, statements in migrations(schema):
            if target > version:
                for statement in statements:
                    cur.execute(statement)
        space_id = (meta or {}).get("space_id") or uuid.uuid4().hex
        cur.execute(
            "INSERT INTO meta VALUES ('schema_version', %s), ('space_id', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION), space_id),
        )
        return space_id

    return conn.run(upgrade, "migrating the schema")
