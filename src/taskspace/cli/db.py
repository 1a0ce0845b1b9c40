"""The ``taskspace db`` commands: ``upgrade`` creates or migrates a PostgreSQL
space's schema (versioned, idempotent migrations under an advisory lock; a
schema newer than this taskspace is refused and left alone), ``status``
reports its version, space id and table sizes without changing anything.
Other backends migrate themselves when opened: nothing to do for them."""

from __future__ import annotations

import os
from typing import Any

import click

from taskspace.cli.common import URL_HELP, echo_json, guard

DB_TABLES = ("tasks", "done", "claim_requests", "waiters")


def _postgres_url(url: str | None) -> str | None:
    """The URL to use, or None when it does not name a PostgreSQL space."""
    from taskspace.backends import POSTGRES_SCHEMES, validate_url

    chosen = url or os.environ.get("TASKSPACE_URL") or "sqlite:///.taskspace/space.db"
    scheme = validate_url(chosen)
    return chosen if scheme in POSTGRES_SCHEMES else None


def _sizes(conn: Any) -> dict[str, int]:
    """pg_total_relation_size (table, indexes, TOAST) of the queue's tables."""
    rows = conn.read(
        "SELECT t, pg_total_relation_size(to_regclass(t)) FROM unnest(%s::text[]) AS t"
        " WHERE to_regclass(t) IS NOT NULL",
        (list(DB_TABLES),),
    )
    return {str(name): int(size) for name, size in rows}


@click.group()
def db() -> None:
    """Create, migrate and inspect a PostgreSQL space's schema."""


@db.command()
@click.option("--url", default=None, help=URL_HELP)
@guard
def upgrade(url: str | None) -> None:
    """Create the space's schema, or migrate it to this taskspace's version."""
    from taskspace.backends.postgres.conn import PgConn, parse_url
    from taskspace.backends.postgres.schema import SCHEMA_VERSION, migrate, status

    pg_url = _postgres_url(url)
    if pg_url is None:
        click.echo("nothing to do: only PostgreSQL spaces are migrated by this command")
        return
    conn = PgConn(parse_url(pg_url))
    try:
        before = status(conn)["version"]
        space_id = migrate(conn, create=True)
    finally:
        conn.close()
    if before == SCHEMA_VERSION:
        click.echo(f"schema {conn.schema!r} is up to date (version {SCHEMA_VERSION})")
    else:
        click.echo(
            f"schema {conn.schema!r} migrated from version {before} to {SCHEMA_VERSION}"
            f" (space {space_id})"
        )


@db.command("status")
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@guard
def status_command(url: str | None, as_json: bool) -> None:
    """Report the schema's version, space id and table sizes; changes nothing.
    Exit code 1 when the schema needs `taskspace db upgrade`."""
    from taskspace.backends.postgres.conn import PgConn, parse_url
    from taskspace.backends.postgres.schema import status

    pg_url = _postgres_url(url)
    if pg_url is None:
        click.echo("not a PostgreSQL space: it migrates itself when opened")
        return
    conn = PgConn(parse_url(pg_url))
    try:
        info = status(conn)
        info["sizes"] = _sizes(conn) if info["version"] else {}
    finally:
        conn.close()
    if as_json:
        echo_json(info)
    else:
        click.echo(f"schema      {info['schema']}")
        click.echo(f"version     {info['version']} (this taskspace: {info['current']})")
        click.echo(f"space id    {info['space_id'] or '-'}")
        for table, size in info["sizes"].items():
            click.echo(f"{table:<11} {size / 1024:,.0f} KiB (with indexes)")
    if info["version"] != info["current"]:
        raise SystemExit(1)


def register(main: click.Group) -> None:
    """Add this module's commands to ``main``."""
    main.add_command(db)
