"""space.transaction(conn): tasks submitted in the caller's own PostgreSQL
transaction commit with the caller's data or not at all, and run only after
the commit. Other backends refuse it clearly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from taskspace import ConfigError, Space
from tests.services import postgres_url
from tests.test_postgres import base_of


@pytest.fixture
def pg_space() -> Iterator[Space]:
    space = Space(postgres_url())
    yield space
    space.close()


def test_rollback_means_no_task_and_commit_means_the_task_runs(pg_space: Space) -> None:
    @pg_space.task(name="orders.ship")
    def ship(order: int) -> str:
        return f"shipped {order}"

    dsn = base_of(pg_space.url)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.orders_t (id int primary key)")
        conn.commit()
    with psycopg.connect(dsn) as conn:
        with pg_space.transaction(conn):
            conn.execute("INSERT INTO public.orders_t VALUES (1) ON CONFLICT DO NOTHING")
            lost = ship.submit(1)
        conn.rollback()
        with pg_space.transaction(conn):
            conn.execute("INSERT INTO public.orders_t VALUES (2) ON CONFLICT DO NOTHING")
            kept = ship.submit(2)
            assert pg_space.store.queue.state(kept.id) is None  # not visible before the commit
        conn.commit()
    assert pg_space.store.queue.state(lost.id) is None
    assert pg_space.store.queue.state(kept.id) == "queued"
    report = pg_space.run_worker(burst=True, install_signal_handlers=False)
    assert report.succeeded == 1
    assert kept.result(timeout=5) == "shipped 2"


def test_other_backends_refuse_a_transaction(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/s.db")
    try:
        with pytest.raises(ConfigError, match="PostgreSQL"), space.transaction(object()):
            pass
    finally:
        space.close()
