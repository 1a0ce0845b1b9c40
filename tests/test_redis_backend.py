"""Redis backend specifics on private redis-servers: bounded lost-lease history
(issue 6 item 7), FIFO at the priority bounds (items 4/14), chunked pushes
(item 12), every Redis error as BackendError (item 3, 12), and a subscription
that says when it lost its connection (item 3)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest

from taskspace.backends.base import (
    ERROR_HISTORY_MAX,
    PRIORITY_MAX,
    PRIORITY_MIN,
    PUSH_CHUNK_TASKS,
    Outcome,
    TaskSpec,
)
from taskspace.backends.redis import RedisStore
from taskspace.errors import BackendError, SubscriptionLost
from tests.services import RedisServer

LOSSES = 1100  # Redis's cjson refuses nesting deeper than 1000


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.close()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(server.namespaced_url())
    yield s
    s.close()


def spec(name: str = "job", **kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    kw.setdefault("payload", b"[]")
    return TaskSpec(name=name, **kw)  # type: ignore[arg-type]


def raw(store: RedisStore, *command: object) -> object:
    return store.call(lambda: store.client.execute_command(*command))


def lose_lease(store: RedisStore, task_id: str) -> None:
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert rec.id == task_id
    deadline = time.monotonic() + 2
    while store.queue.requeue_expired() == 0:
        assert time.monotonic() < deadline, "the lease never expired"


# -- item 7: repeated lease losses -----------------------------------------------------


@pytest.mark.timeout(60)
def test_a_task_losing_its_lease_1100_times_keeps_a_flat_bounded_error(
    store: RedisStore,
) -> None:
    (task_id,) = store.queue.push([spec(max_attempts=LOSSES + 10, lease_s=0.002)])
    for _ in range(LOSSES):
        lose_lease(store, task_id)
    rec = store.queue.get(task_id)
    assert rec is not None and rec.state == "queued" and rec.lost == LOSSES
    assert rec.error is not None and rec.error["type"] == "WorkerLost"
    assert f"attempt {LOSSES} of" in rec.error["message"]
    history = rec.error["history"]
    assert len(history) == ERROR_HISTORY_MAX
    assert all("history" not in h and "previous" not in h for h in history)
    assert f"attempt {LOSSES - 1} of" in history[0]["message"]
    assert len(orjson.dumps(rec.error)) < 4096
    assert store.queue.stats().counts["default"] == {"queued": 1}


def test_an_unreadable_earlier_error_never_leaves_a_task_half_moved(store: RedisStore) -> None:
    """A legacy error nested 1,500 deep (cjson cannot read it) and a corrupt one:
    requeue still moves both tasks whole, and handles the healthy task too."""
    nested = '{"type": "E", "message": "m", "traceback": ""}'
    for _ in range(1500):
        nested = f'{{"type": "WorkerLost", "message": "m", "traceback": "", "previous": {nested}}}'
    ids = store.queue.push([spec(lease_s=0.002, max_attempts=5) for _ in range(3)])
    recs = store.queue.claim(["default"], "w", 3)
    assert len(recs) == 3
    raw(store, "HSET", f"{store.prefix}t:{ids[0]}", "error", nested)
    raw(store, "HSET", f"{store.prefix}t:{ids[1]}", "error", b"{not json")
    time.sleep(0.01)
    assert store.queue.requeue_expired() == 3
    for task_id in ids:
        rec = store.queue.get(task_id)
        assert rec is not None and rec.state == "queued" and rec.lost == 1
        assert rec.error is not None and rec.error["type"] == "WorkerLost"
        assert len(rec.error.get("history", [])) <= 1
    assert raw(store, "ZCARD", f"{store.prefix}running") == 0
    assert len(store.queue.claim(["default"], "w", 10)) == 3
    assert store.queue.stats().counts["default"] == {"running": 3}


# -- items 4 and 14: FIFO at the priority bounds ---------------------------------------


def test_fifo_is_exact_at_the_priority_bounds_near_seq_2_32(store: RedisStore) -> None:
    raw(store, "SET", f"{store.prefix}seq", 2**32 - 20)  # the documented room: seq < 2^32
    order = [PRIORITY_MAX, PRIORITY_MIN, PRIORITY_MAX - 1, PRIORITY_MIN + 1, 0]
    specs = [spec(id=f"{p}-{i}", priority=p) for i in range(3) for p in order]
    store.queue.push(specs)
    got = [r.id for r in store.queue.claim(["default"], "w", len(specs))]
    expected = [f"{p}-{i}" for p in sorted(order, reverse=True) for i in range(3)]
    assert got == expected


# -- item 12: large pushes run as short scripts ----------------------------------------


def test_a_large_push_runs_as_short_scripts(store: RedisStore) -> None:
    store.queue.push([spec()])  # loads the script: no NOSCRIPT round in what is measured
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 0)
    raw(store, "CONFIG", "SET", "slowlog-max-len", 100_000)
    raw(store, "SLOWLOG", "RESET")
    n = 5 * PUSH_CHUNK_TASKS + 7
    ids = store.queue.push([spec(payload=b"[1, 2, 3]") for _ in range(n)])
    entries = store.call(lambda: store.client.slowlog_get(100_000))
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 10_000)
    pushes = [e for e in entries if e["command"].startswith(b"EVALSHA")]
    micros = sorted(e["duration"] for e in pushes)
    print(f"push of {n} tasks: {len(pushes)} scripts, longest {micros[-1] / 1000:.1f} ms")
    assert len(ids) == len(set(ids)) == n
    assert len(pushes) == 6  # five full chunks and the rest
    # Redis's own timing of each script; the median, since a loaded test machine
    # can stretch any single one.
    assert micros[len(micros) // 2] < 50_000
    assert store.queue.stats().counts["default"] == {"queued": n + 1}


# -- items 3 and 12: every Redis error is a BackendError -------------------------------


def test_every_call_raises_backend_error_while_redis_is_down_and_works_after_restart(
    server: RedisServer, store: RedisStore
) -> None:
    store.queue.push([spec(id="before")])
    server.stop()
    calls = [
        lambda: store.queue.push([spec()]), lambda: store.queue.claim(["default"], "w", 1),
        store.queue.stats, lambda: store.queue.get("before"), lambda: store.queue.state("before"),
        lambda: store.queue.list(), lambda: store.queue.wait_for_tasks(["default"], 0.1),
        lambda: store.queue.wait_for_finish(["before"], 0.1),
        store.queue.requeue_expired, store.queue.reap,
        lambda: store.subscribe(["c"]), lambda: store.kv_get("k"), store.clock.now,
        lambda: store.publish("c", b"x"), lambda: store.queue.purge("default", ["queued"]),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(BackendError):
            call()
    server.restart()  # no persistence: empty, and its script cache too (NOSCRIPT)
    (task_id,) = store.queue.push([spec()])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(rec.lease, Outcome("succeeded", result=b"1"))]) == [True]
    assert store.queue.state(task_id) == "succeeded"


def test_a_script_error_is_a_backend_error(store: RedisStore) -> None:
    raw(store, "SET", f"{store.prefix}seq", "not a number")
    with pytest.raises(BackendError, match="ResponseError"):
        store.queue.push([spec()])


# -- item 3: a subscription says when it lost its connection ---------------------------


@pytest.mark.timeout(30)
def test_subscription_reports_a_lost_connection_then_resubscribes(
    server: RedisServer, store: RedisStore
) -> None:
    with store.subscribe(["c"]) as sub:
        store.publish("c", b"one")
        message = sub.get(timeout=2)
        assert message is not None and message.data == b"one"

        server.stop()
        started = time.monotonic()
        with pytest.raises(SubscriptionLost):
            sub.get(timeout=5)
        assert time.monotonic() - started < 2
        for _ in range(2):  # while Redis is away: BackendError, within the timeout
            started = time.monotonic()
            with pytest.raises(BackendError) as caught:
                sub.get(timeout=0.5)
            assert not isinstance(caught.value, SubscriptionLost)
            assert time.monotonic() - started < 1.5

        server.restart()
        assert sub.get(timeout=0.2) is None  # resubscribed; nothing published since
        store.publish("c", b"two")
        message = sub.get(timeout=2)
        assert message is not None and message.data == b"two"


# -- the extended contract: costs and bounded storage ----------------------------------


def claim_micros(store: RedisStore, names: list[str], rounds: int = 20) -> float:
    """Median duration (µs, Redis's own SLOWLOG) of a claim-and-release of one task."""
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 0)
    raw(store, "SLOWLOG", "RESET")
    for _ in range(rounds):
        (rec,) = store.queue.claim(["default"], "w", 1, names=names)
        store.queue.finish([(rec.lease, Outcome("release"))])
    entries = store.call(lambda: store.client.slowlog_get(10 * rounds))
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 10_000)
    sha = store._scripts["claim"].sha.encode()
    micros = sorted(e["duration"] for e in entries if sha in e["command"])
    return micros[len(micros) // 2]


def test_claim_by_names_costs_the_same_however_many_other_tasks_wait(store: RedisStore) -> None:
    store.queue.push([spec("mine") for _ in range(3)])
    alone = claim_micros(store, ["mine", "also"])
    for _ in range(20):
        store.queue.push([spec("other") for _ in range(1000)])
    crowded = claim_micros(store, ["mine", "also"])
    print(f"claim by names: {alone} us alone, {crowded} us behind 20,000 other tasks")
    assert crowded < max(3 * alone, 500)
    assert store.queue.stats().counts["default"] == {"queued": 20_003}


@pytest.mark.timeout(30)
def test_an_idle_wait_for_some_names_ignores_tasks_of_other_names(store: RedisStore) -> None:
    store.queue.push([spec("other")])
    assert store.queue.claim(["default"], "w", 1, names=["mine"]) == []
    started = time.monotonic()
    store.queue.wait_for_tasks(["default"], 0.5)  # no spin on a task it cannot run
    assert time.monotonic() - started >= 0.45
    pusher = threading.Timer(0.2, lambda: store.queue.push([spec("mine")]))
    pusher.start()
    started = time.monotonic()
    store.queue.wait_for_tasks(["default"], 5)  # woken by its own name
    pusher.join()
    assert time.monotonic() - started < 2
    assert len(store.queue.claim(["default"], "w", 5, names=["mine"])) == 1


def test_state_reads_only_the_state(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec(payload=b"x" * 20_000_000)])

    def sent() -> int:
        info = store.call(lambda: store.reads.info("stats"))
        return int(info["total_net_output_bytes"])

    before = sent()
    assert store.queue.state(task_id) == "queued"
    assert sent() - before < 10_000
    assert store.queue.state("no-such-task") is None


def test_a_settled_task_expires_as_a_backstop_and_reap_keeps_counts_right(
    store: RedisStore,
) -> None:
    kept, reaped = store.queue.push([spec(result_ttl=None), spec(result_ttl=0.05)])
    for rec in store.queue.claim(["default"], "w", 2):
        store.queue.finish([(rec.lease, Outcome("succeeded", result=b"1"))])
    ttl = raw(store, "TTL", f"{store.prefix}t:{reaped}")
    assert isinstance(ttl, int) and 3600 <= ttl <= 3601  # well after the reap time
    assert raw(store, "TTL", f"{store.prefix}t:{kept}") == -1
    raw(store, "DEL", f"{store.prefix}t:{reaped}")  # as the backstop EXPIRE would
    time.sleep(0.06)
    assert store.queue.reap() == 1
    assert store.queue.stats().counts["default"] == {"succeeded": 1}
    assert [r.id for r in store.queue.list()] == [kept]
    assert raw(store, "ZCARD", f"{store.prefix}idx") == 1


def test_reap_drops_expired_kv_keys_from_the_kv_index(store: RedisStore) -> None:
    store.kv_put("a", b"1", ttl=0.05)
    store.kv_incr("b", 1, ttl=0.05)
    store.kv_put("c", b"1")
    time.sleep(0.1)
    assert store.queue.reap() == 2
    assert raw(store, "ZRANGE", f"{store.prefix}kvidx", 0, -1) == [b"c"]
    assert raw(store, "ZCARD", f"{store.prefix}kvexp") == 0
