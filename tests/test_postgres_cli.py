"""`taskspace db upgrade` and `taskspace db status` on the machine's PostgreSQL."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from taskspace.cli import main
from tests.services import postgres_url

pytest.importorskip("psycopg")


def test_status_then_upgrade_then_status(tmp_path: object) -> None:
    url = postgres_url()
    runner = CliRunner()
    before = runner.invoke(main, ["db", "status", "--url", url, "--json"])
    assert before.exit_code == 1, before.output  # needs an upgrade
    assert orjson.loads(before.output)["version"] == 0
    first = runner.invoke(main, ["db", "upgrade", "--url", url])
    assert first.exit_code == 0 and "migrated from version 0" in first.output
    again = runner.invoke(main, ["db", "upgrade", "--url", url])
    assert again.exit_code == 0 and "up to date" in again.output
    after = runner.invoke(main, ["db", "status", "--url", url, "--json"])
    assert after.exit_code == 0, after.output
    doc = orjson.loads(after.output)
    assert doc["version"] == doc["current"] and doc["space_id"]
    assert set(doc["sizes"]) >= {"tasks", "done"}


def test_a_newer_schema_is_one_clear_error() -> None:
    url = postgres_url()
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade", "--url", url]).exit_code == 0
    from taskspace.backends.postgres.conn import PgConn, parse_url

    conn = PgConn(parse_url(url))
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    result = runner.invoke(main, ["db", "upgrade", "--url", url])
    assert result.exit_code == 2
    assert "newer than this taskspace knows" in result.output


def test_other_backends_have_nothing_to_upgrade(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["db", "upgrade", "--url", "memory://"])
    assert result.exit_code == 0 and "nothing to do" in result.output
