"""PostgreSQL backend specifics: URLs, schema and migrations, identity,
transactional enqueue, the claim's index staying flat behind delayed tasks,
and the SQL transition table generated from outcomes.

Runs against the machine's PostgreSQL (tests/services.py: a database per
run, a schema per test); skipped without it unless TASKSPACE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from taskspace import Space
from taskspace.backends import open_store, validate_url
from taskspace.backends.base import Outcome, TaskSpec
from taskspace.backends.outcomes import RUNNING_TRANSITIONS, running_transition
from taskspace.backends.postgres import PostgresStore
from taskspace.backends.postgres.conn import PgConn, map_error, parse_url
from taskspace.backends.postgres.queue import sql_transition
from taskspace.backends.postgres.schema import SCHEMA_VERSION, migrate, status
from taskspace.errors import (
    BackendError,
    ConfigError,
    InvalidURL,
    MissingDependency,
    SpaceLost,
    SpaceNotFound,
)
from tests.services import postgres_url

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def url() -> str:
    return postgres_url()


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    s = open_store(url)
    assert isinstance(s, PostgresStore)
    yield s
    s.close()


def base_of(url: str) -> str:
    return url.split("?", 1)[0]


# -- URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form", ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"]
)
def test_every_url_form_is_accepted(form: str) -> None:
    settings = parse_url(form + "?schema=abc&sslmode=disable&pool_max=3")
    assert validate_url(form) == form.split("://")[0]
    assert settings.schema == "abc" and settings.pool_max == 3
    assert settings.conninfo == "postgresql://u@h/db?sslmode=disable"


def test_namespace_is_an_alias_of_schema() -> None:
    assert parse_url("postgresql://h/db?namespace=x1").schema == "x1"
    assert parse_url("postgresql://h/db").schema == "taskspace"


@pytest.mark.parametrize(
    "query",
    ["schema=Bad-Name", "schema=a&namespace=b", "pool_max=0", "pool_min=5&pool_max=2",
     "statement_timeout=x", "connect_timeout=-1"],
)  # fmt: skip
def test_bad_options_are_one_clear_error(query: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_url(f"postgresql://h/db?{query}")
    assert "postgresql://h/db" in str(info.value)


def test_missing_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingDependency, match=r"pip install 'taskspace\[postgres\]'"):
        PgConn(parse_url("postgresql://h/db"))


def test_driver_errors_map_to_taskspace_errors() -> None:
    overflow = psycopg.errors.NumericValueOutOfRange("out of range")
    assert isinstance(map_error(overflow, "x"), ConfigError)
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    err = map_error(lost, "claim", "postgresql://h/db")
    assert isinstance(err, BackendError) and "claim" in str(err) and "h/db" in str(err)


def test_a_server_that_is_not_there_is_a_backend_error_within_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(BackendError):
        open_store("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")
    assert time.monotonic() - started < 5


# -- schema, migrations, identity ---------------------------------------------------


def test_migrations_are_idempotent_and_versioned(store: PostgresStore, url: str) -> None:
    assert migrate(store.conn) == store.space_id  # again: nothing changes
    info = status(store.conn)
    assert info["version"] == SCHEMA_VERSION == info["current"]
    assert info["space_id"] == store.space_id
    with open_store(url) as again:
        assert again.space_id == store.space_id


def test_a_newer_schema_is_refused_and_left_alone(store: PostgresStore, url: str) -> None:
    store.conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError, match="newer"):
        open_store(url)
    assert store.conn.read("SELECT value FROM meta WHERE key = 'schema_version'") == [("999",)]


def test_open_without_create_finds_no_space_and_creates_nothing(url: str) -> None:
    with pytest.raises(SpaceNotFound):
        open_store(url, create=False)
    schema = parse_url(url).schema
    with psycopg.connect(base_of(url)) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchall()
    assert found == []


def test_a_dropped_schema_is_space_lost(store: PostgresStore) -> None:
    store.check_space()
    store.conn.execute(f'DROP SCHEMA "{store.schema}" CASCADE')
    with pytest.raises(SpaceLost):
        store.check_space()


def test_spaces_in_two_schemas_of_one_database_are_separate(url: str) -> None:
    other = f"{base_of(url)}?schema=t{uuid.uuid4().hex[:12]}"
    with open_store(url) as a, open_store(other) as b:
        a.queue.push([TaskSpec("x", "job", b"{}")])
        assert a.space_id != b.space_id
        assert b.queue.get("x") is None and a.queue.get("x") is not None


def test_tokens_start_at_the_wall_clock_and_the_clock_never_goes_back(
    store: PostgresStore,
) -> None:
    store.queue.push([TaskSpec("a", "job", b"{}")])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert rec.token >= int((time.time() - 60) * 1e6)
    # The server's clock "steps back" 100 s: the offset moves the lease clock to the mark.
    before = store.clock.now()
    store.conn.execute('UPDATE clock SET mark = mark + 100, "offset" = "offset"')
    assert store.clock.now() >= before + 99


# -- the transition table in SQL ----------------------------------------------------------


@pytest.mark.parametrize("event", list(RUNNING_TRANSITIONS))
def test_sql_transition_is_the_table(store: PostgresStore, event: str) -> None:
    expr = sql_transition("%(event)s", "%(cancel)s", "%(attempts)s", "%(max)s")
    for cancel in (False, True):
        for attempts, top in ((1, 2), (2, 2)):
            args = {"event": event, "cancel": cancel, "attempts": attempts, "max": top}
            ((got,),) = store.conn.read(f"SELECT {expr}", args)
            assert got == running_transition(event, cancel, attempts, top)  # type: ignore[arg-type]


# -- transactional enqueue ------------------------------------------------------------------


def _space(url: str) -> Space:
    space = Space(url)

    @space.task(name="pg.add")
    def add(a: int, b: int) -> int:
        return a + b

    return space


def test_rollback_means_no_task_and_commit_means_it_runs(url: str) -> None:
    space = _space(url)
    add = space.get_task("pg.add")
    try:
        with psycopg.connect(base_of(url), autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE orders (id int)")
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (1)")
                gone = add.submit(1, 2, connection=conn)
                assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
                raise psycopg.Rollback()
            assert space.store.queue.get(gone.id) is None
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
            with conn.transaction():
                conn.execute("INSERT INTO orders VALUES (2)")
                kept = add.submit_in(conn, 2, 3)
                # Not visible to anyone else before the commit.
                assert space.store.queue.get(kept.id) is None
            assert space.store.queue.state(kept.id) == "queued"
        report = space.run_worker(burst=True, install_signal_handlers=False)
        assert kept.result(timeout=10) == 5
        assert report is not None
        assert space.store.queue.get(gone.id) is None
    finally:
        space.close()


def test_a_commit_wakes_an_idle_worker_waiting_in_another_store(url: str) -> None:
    with open_store(url) as waiter, open_store(url) as writer:
        assert isinstance(writer, PostgresStore)
        waiter.queue.claim(["default"], "w", 1)  # the schema exists, the listener is not up yet
        with psycopg.connect(base_of(url), autocommit=True) as conn:
            with conn.transaction():
                writer.push_in(conn, [TaskSpec("t1", "job", b"{}")])
                time.sleep(0.05)
            started = time.monotonic()
        got = waiter.queue.claim(["default"], "w", 1, wait=5.0)
        assert [r.id for r in got] == ["t1"]
        assert time.monotonic() - started < 2.0


def test_submit_in_refuses_a_space_not_on_postgres(tmp_path: object) -> None:
    space = Space("memory://")
    task = space.task(lambda: 1, name="x")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        task.submit_in(object())
    space.close()


def test_a_task_with_a_connection_parameter_keeps_its_argument(url: str) -> None:
    space = Space(url)

    def uses(connection: str) -> str:
        return connection

    task = space.task(uses, name="pg.uses")
    try:
        handle = task.submit(connection="mine")
        assert space.store.queue.state(handle.id) == "queued"
    finally:
        space.close()


# -- claims stay flat behind delayed tasks ---------------------------------------------------


def test_claims_do_not_walk_delayed_or_other_names_tasks(store: PostgresStore) -> None:
    delayed = [TaskSpec(f"d{i}", "job", b"{}", delay=3600, priority=9) for i in range(5000)]
    others = [TaskSpec(f"o{i}", "other", b"{}", priority=9) for i in range(5000)]
    store.queue.push(delayed + others + [TaskSpec("ready", "job", b"{}")])
    store.conn.execute("ANALYZE tasks")
    got = store.queue.claim(["default"], "w", 1, names=["job"])
    assert [r.id for r in got] == ["ready"]
    plan = "\n".join(
        row[0]
        for row in store.conn.read(
            "EXPLAIN SELECT seq FROM tasks t WHERE t.queue = 'default' AND t.name = 'job'"
            " AND t.state = 'queued' AND NOT t.waiting ORDER BY priority DESC, seq LIMIT 10"
        )
    )
    assert "tasks_ready_by_name" in plan


def test_store_transaction_sends_every_push_of_the_block_to_the_callers_transaction(
    url: str,
) -> None:
    space = _space(url)
    add = space.get_task("pg.add")
    store = space.store
    assert isinstance(store, PostgresStore)
    try:
        with psycopg.connect(base_of(url), autocommit=True) as conn:
            with conn.transaction(), store.transaction(conn):
                assert store.in_caller_transaction()
                one = add.submit(1, 1)
                many = add.submit_many([(2, 2), (3, 3)])
                raise psycopg.Rollback()
            assert not store.in_caller_transaction()
            assert [space.store.queue.get(h.id) for h in [one, *many]] == [None] * 3
            with conn.transaction(), store.transaction(conn):
                kept = add.submit(4, 4)
            assert space.store.queue.state(kept.id) == "queued"
        outside = add.submit(5, 5)  # the block is over: the store's own connection
        assert space.store.queue.state(outside.id) == "queued"
    finally:
        space.close()


# -- waking waiters ---------------------------------------------------------------------------


def _notifications(conn: object, timeout: float) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=timeout)]  # type: ignore[attr-defined]


def test_a_push_notifies_only_when_someone_waits(store: PostgresStore, url: str) -> None:
    from taskspace.backends.postgres.waiter import channel_name

    with psycopg.connect(base_of(url), autocommit=True) as spy:
        spy.execute(f'LISTEN "{channel_name(store.schema)}"')
        store.queue.push([TaskSpec("nobody", "job", b"{}")])
        assert _notifications(spy, 0.3) == []  # nobody waits: no NOTIFY at all
        store.queue.claim(["default"], "w", 1)
        done = threading.Event()
        waiter = threading.Thread(
            target=lambda: (store.queue.claim(["default"], "w", 1, wait=5.0), done.set())
        )
        waiter.start()
        deadline = time.monotonic() + 5
        while not store.conn.read("SELECT 1 FROM waiters WHERE key = 'q:default'"):
            assert time.monotonic() < deadline, "the waiter never registered"
            time.sleep(0.01)
        store.queue.push([TaskSpec("someone", "job", b"{}")])
        assert done.wait(5.0)
        assert "q:default" in _notifications(spy, 1.0)
        waiter.join()


def test_no_wake_up_is_lost_between_a_registration_and_a_write(url: str) -> None:
    """Round trips with a claimer that idles in claim(wait=) and a result
    waiter: each must take milliseconds, never the idle timeout (a writer that
    checked registrations inside its own transaction lost about 1 in 100)."""
    with open_store(url) as client, open_store(url) as worker:
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                got = worker.queue.claim(["rt"], "w", 1, wait=2.0, request_id=uuid.uuid4().hex)
                if got:
                    worker.queue.finish([(got[0].lease, Outcome("succeeded", result=b"1"))])

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        slowest = 0.0
        try:
            for i in range(300):
                started = time.monotonic()
                client.queue.push([TaskSpec(f"rt{i}", "job", b"{}", queue="rt")])
                while client.queue.state(f"rt{i}") != "succeeded":
                    client.queue.wait_for_finish([f"rt{i}"], 2.0)
                slowest = max(slowest, time.monotonic() - started)
        finally:
            stop.set()
            thread.join(timeout=5)
        assert slowest < 1.0, f"a round trip took {slowest:.2f} s: a wake-up was lost"


def test_a_worker_sizes_the_pool_for_its_slots_unless_the_url_sets_it(url: str) -> None:
    """Issue 10: the pool is sized from the worker's concurrency (each task may
    use the space), and a pool_max given in the URL is kept as it is."""
    from taskspace.worker.worker import POOL_CONNECTIONS_OF_LOOPS

    space = Space(url)
    try:
        space.run_worker(burst=True, concurrency=24, install_signal_handlers=False)
        store = space.store
        assert isinstance(store, PostgresStore)
        assert store.conn.pool().max_size == 24 + POOL_CONNECTIONS_OF_LOOPS
        store.fit_pool(4)  # never shrinks
        assert store.conn.pool().max_size == 24 + POOL_CONNECTIONS_OF_LOOPS
    finally:
        space.close()
    fixed = Space(f"{url}&pool_max=5")
    try:
        fixed.run_worker(burst=True, concurrency=24, install_signal_handlers=False)
        store = fixed.store
        assert isinstance(store, PostgresStore)
        assert store.conn.pool().max_size == 5
    finally:
        fixed.close()


def test_a_push_racing_the_finish_of_the_same_id_never_inserts_it_twice(
    store: PostgresStore,
) -> None:
    """A push of an id is idempotent also while a finish moves that task to
    ``done``: the push either sees the running task or its ``done`` row, never
    neither (which would insert the id a second time, and the second finish
    would then fail on ``done``'s unique id for ever)."""
    spec = TaskSpec(id="", name="f", payload=b"[]", queue="q")
    rounds = 150
    for i in range(rounds):
        spec.id = f"race-{i}"
        store.queue.push([spec])
        (record,) = store.queue.claim(["q"], "w", 1)
        pushers = [threading.Thread(target=store.queue.push, args=([spec],)) for _ in range(2)]
        for thread in pushers:
            thread.start()
        assert store.queue.finish([(record.lease, Outcome("succeeded", b"1"))]) == [True]
        for thread in pushers:
            thread.join()
    rows = store.queue._c.read(
        "SELECT id, count(*) FROM (SELECT id FROM tasks UNION ALL SELECT id FROM done) ids"
        " GROUP BY id HAVING count(*) > 1",
        (),
    )
    assert rows == [], f"ids stored twice: {rows}"
    assert store.queue.stats().total("succeeded") == rounds
