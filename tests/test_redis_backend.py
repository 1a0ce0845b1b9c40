"""Redis backend specifics on private redis-servers: bounded lost-lease history
(issue 6 item 7), FIFO at the priority bounds (items 4/14), chunked pushes
(item 12), every Redis error as BackendError (item 3, 12), a subscription
that says when it lost its connection (item 3), and contract v2: the lease
clock's high-water mark, the space's identity, tokens that survive a wiped
space, idempotent finishes and follow-ups."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from taskspace.backends import open_store
from taskspace.backends.base import (
    ERROR_HISTORY_MAX,
    PRIORITY_MAX,
    PRIORITY_MIN,
    PUSH_CHUNK_TASKS,
    REQUEST_ID_TTL_S,
    Gap,
    Lease,
    Message,
    Outcome,
    TaskSpec,
)
from taskspace.backends.redis import RedisStore
from taskspace.errors import BackendError, SpaceLost, SpaceNotFound
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
    return store.conn.call(lambda: store.conn.client.execute_command(*command))


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
    store.queue.push([spec()])  # loads the functions: no such round in what is measured
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 0)
    raw(store, "CONFIG", "SET", "slowlog-max-len", 100_000)
    raw(store, "SLOWLOG", "RESET")
    n = 5 * PUSH_CHUNK_TASKS + 7
    ids = store.queue.push([spec(payload=b"[1, 2, 3]") for _ in range(n)])
    entries = store.conn.call(lambda: store.conn.client.slowlog_get(100_000))
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 10_000)
    pushes = [e for e in entries if e["command"].startswith(b"FCALL")]
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
    calls: list[Callable[[], object]] = [
        lambda: store.queue.push([spec()]), lambda: store.queue.claim(["default"], "w", 1),
        store.queue.stats, lambda: store.queue.get("before"), lambda: store.queue.state("before"),
        lambda: store.queue.list(), lambda: store.queue.wait_for_tasks(["default"], 0.1),
        lambda: store.queue.wait_for_finish(["before"], 0.1),
        store.queue.requeue_expired, store.queue.reap,
        lambda: store.pubsub.subscribe(["c"]), lambda: store.kv.get("k"), store.clock.now,
        store.clock.wall, lambda: store.pubsub.publish("c", b"x"), store.check_space,
        lambda: store.queue.purge("default", ["queued"]), lambda: store.queue.get_many(["x"]),
        lambda: RedisStore(server.namespaced_url()),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(BackendError):
            call()
    server.restart()  # no persistence: empty, and without our functions too
    with pytest.raises(SpaceLost):
        store.check_space()
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
def test_subscription_reports_a_lost_connection_as_one_gap_then_resubscribes(
    server: RedisServer, store: RedisStore
) -> None:
    with store.pubsub.subscribe(["c"]) as sub:
        store.pubsub.publish("c", b"one")
        message = sub.get(timeout=2)
        assert isinstance(message, Message) and message.data == b"one"

        server.stop()
        gaps = 0
        for _ in range(3):  # while Redis is away: a Gap or BackendError, within the timeout
            started = time.monotonic()
            try:
                got = sub.get(timeout=0.5)
                assert got == Gap("reconnect")
                gaps += 1
            except BackendError:
                pass
            assert time.monotonic() - started < 1.5

        server.restart()
        deadline = time.monotonic() + 10
        while True:  # resubscribed by itself: what is published from now on arrives
            assert time.monotonic() < deadline, "never resubscribed"
            store.pubsub.publish("c", b"two")
            try:
                got = sub.get(timeout=0.2)
            except BackendError:
                continue
            if isinstance(got, Gap):
                gaps += 1
            elif got is not None:
                break
        assert isinstance(got, Message) and got.data == b"two"
        assert gaps == 1


# -- the extended contract: costs and bounded storage ----------------------------------


def claim_micros(store: RedisStore, names: list[str], rounds: int = 20) -> float:
    """Median duration (µs, Redis's own SLOWLOG) of a claim-and-release of one task."""
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 0)
    raw(store, "SLOWLOG", "RESET")
    for _ in range(rounds):
        (rec,) = store.queue.claim(["default"], "w", 1, names=names)
        store.queue.finish([(rec.lease, Outcome("release"))])
    entries = store.conn.call(lambda: store.conn.client.slowlog_get(10 * rounds))
    raw(store, "CONFIG", "SET", "slowlog-log-slower-than", 10_000)
    function = store.conn.function("claim").encode()
    micros = sorted(e["duration"] for e in entries if function in e["command"])
    return float(micros[len(micros) // 2])


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
    store.queue.wait_for_tasks(["default"], 0.5, names=["mine"])  # no spin on other names
    assert time.monotonic() - started >= 0.45
    started = time.monotonic()
    store.queue.wait_for_tasks(["default"], 5)  # names=None: any name, whatever was claimed
    assert time.monotonic() - started < 0.2
    pusher = threading.Timer(0.2, lambda: store.queue.push([spec("mine")]))
    pusher.start()
    started = time.monotonic()
    store.queue.wait_for_tasks(["default"], 5, names=["mine"])  # woken by its own name
    pusher.join()
    assert time.monotonic() - started < 2
    assert len(store.queue.claim(["default"], "w", 5, names=["mine"])) == 1


def test_state_reads_only_the_state(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec(payload=b"x" * 20_000_000)])

    def sent() -> int:
        info = store.conn.call(lambda: store.conn.reads.info("stats"))
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


# -- contract v2: the lease clock never goes backwards ---------------------------------


def clock_mark(store: RedisStore) -> float:
    value = raw(store, "HGET", f"{store.prefix}clock", "mark")
    assert isinstance(value, bytes)
    return float(value)


def test_the_lease_clock_never_goes_backwards_when_the_server_clock_steps_back(
    store: RedisStore,
) -> None:
    """A mark 10 s ahead of TIME is what a server whose clock stepped back 10 s
    finds: now() resumes at the mark, expiries stay ahead of earlier ones, and
    the clock runs on from there."""
    store.queue.push([spec(lease_s=30), spec(lease_s=30)])
    before = store.clock.now()
    (first,) = store.queue.claim(["default"], "w", 1)
    assert first.lease_expires is not None
    ahead = clock_mark(store) + 10
    raw(store, "HSET", f"{store.prefix}clock", "mark", repr(ahead))
    stepped = store.clock.now()
    assert stepped >= ahead > before
    (second,) = store.queue.claim(["default"], "w", 1)
    assert second.lease_expires is not None and second.lease_expires >= ahead + 30
    assert store.queue.renew([first.lease]) == {first.id: "held"}
    renewed = store.queue.get(first.id)
    assert renewed is not None and renewed.lease_expires is not None
    assert renewed.lease_expires >= max(first.lease_expires, ahead + 30)
    times = [store.clock.now() for _ in range(20)]
    assert times == sorted(times) and times[0] >= stepped
    # The wall clock is TIME, untouched: the offset only moves the lease clock.
    assert abs(store.clock.wall() - time.time()) < 5
    assert second.started is not None and abs(second.started - time.time()) < 5


def test_the_clock_mark_is_written_about_once_a_second_not_per_call(store: RedisStore) -> None:
    store.clock.now()
    marks = set()
    started = time.monotonic()
    for _ in range(50):
        now = store.clock.now()
        mark = clock_mark(store)
        assert now <= mark  # the mark is above every time handed out
        marks.add(mark)
    if time.monotonic() - started < 0.9:
        assert len(marks) <= 2


# -- contract v2: the space's identity -------------------------------------------------


def test_a_wiped_space_is_lost_and_a_missing_one_is_not_created(server: RedisServer) -> None:
    url = server.namespaced_url()
    with pytest.raises(SpaceNotFound, match="no space at"):
        RedisStore(url, create=False)
    with pytest.raises(SpaceNotFound):
        open_store(url, create=False)
    assert raw_url(server, "KEYS", "*") == []  # nothing was created
    store = RedisStore(url)
    try:
        reader = open_store(url, create=False)
        assert isinstance(reader, RedisStore) and reader.space_id == store.space_id
        reader.close()
        store.check_space()
        raw(store, "FLUSHALL")
        with pytest.raises(SpaceLost, match="wiped or replaced"):
            store.check_space()
        replaced = RedisStore(url)  # a new space under the same name
        assert replaced.space_id != store.space_id
        replaced.close()
        with pytest.raises(SpaceLost):
            store.check_space()
    finally:
        store.close()


def raw_url(server: RedisServer, *command: object) -> object:
    import redis

    client: Any = redis.Redis.from_url(server.url)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


def test_tokens_after_a_wiped_space_are_above_every_earlier_one(server: RedisServer) -> None:
    url = server.namespaced_url()
    store = RedisStore(url)
    try:
        store.queue.push([spec() for _ in range(3)])
        tokens = [r.token for r in store.queue.claim(["default"], "w", 3)]
        assert len(set(tokens)) == 3 and tokens == sorted(tokens)
        raw(store, "FLUSHALL")
        again = RedisStore(url)
        again.queue.push([spec()])
        (rec,) = again.queue.claim(["default"], "w", 1)
        again.close()
        assert rec.token > max(tokens)
    finally:
        store.close()


# -- contract v2: idempotent finishes, follow-ups only when accepted -------------------


def test_a_finish_repeated_after_a_lost_reply_is_accepted_once(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec()])
    (rec,) = store.queue.claim(["default"], "w", 1)
    outcome = Outcome("succeeded", result=b"1", followups=(spec(id="next"),))
    assert store.queue.finish([(rec.lease, outcome)]) == [True]
    finished = store.queue.get(task_id)
    # The reply was lost: the worker sends the same finish again.
    assert store.queue.finish([(rec.lease, outcome)]) == [True]
    assert store.queue.get(task_id) == finished
    assert store.queue.stats().stale_finishes == 0
    assert store.queue.stats().counts["default"] == {"succeeded": 1, "queued": 1}
    # A finish of another token is still refused and counted.
    assert store.queue.finish([(Lease(task_id, rec.token + 1), outcome)]) == [False]
    assert store.queue.stats().stale_finishes == 1


def test_a_retried_finish_is_stale_once_the_task_was_claimed_again(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec(max_attempts=3)])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(rec.lease, Outcome("retry"))]) == [True]
    (again,) = store.queue.claim(["default"], "w", 1)
    assert again.id == task_id and again.token > rec.token
    assert store.queue.finish([(rec.lease, Outcome("retry"))]) == [False]
    assert store.queue.state(task_id) == "running"


def test_follow_ups_of_a_stale_finish_are_never_pushed(store: RedisStore) -> None:
    a, b = store.queue.push([spec(), spec()])
    recs = {r.id: r for r in store.queue.claim(["default"], "w", 2)}
    stale = Lease(a, recs[a].token - 1)
    items = [
        (stale, Outcome("succeeded", followups=(spec(id="never"),))),
        (recs[b].lease, Outcome("failed", followups=(spec(id="then", name="undo"),))),
    ]
    assert store.queue.finish(items) == [False, True]
    got = store.queue.get_many(["never", "then", a])
    assert got[0] is None
    assert got[1] is not None and got[1].state == "queued" and got[1].name == "undo"
    assert got[2] is not None and got[2].state == "running"
    assert store.queue.stats().stale_finishes == 1


def test_get_many_is_one_round_trip(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = store.queue.push([spec() for _ in range(50)])
    reads = store.conn.reads
    executed: list[int] = []
    make_pipeline = reads.pipeline

    def pipeline(*args: Any, **kw: Any) -> Any:
        pipe = make_pipeline(*args, **kw)
        run = pipe.execute

        def execute(*a: Any, **k: Any) -> Any:
            executed.append(len(pipe))
            return run(*a, **k)

        pipe.execute = execute
        return pipe

    def single(*args: Any, **kw: Any) -> Any:
        raise AssertionError(f"a command sent on its own: {args[:1]}")

    monkeypatch.setattr(reads, "pipeline", pipeline)
    monkeypatch.setattr(reads, "execute_command", single)
    recs = store.queue.get_many([*ids, "missing"])
    assert executed == [51]  # every read in one pipeline: one round trip
    assert [r.id for r in recs if r is not None] == ids and recs[-1] is None
    assert store.queue.get_many([]) == []


# -- fewer hops: the finisher hands the final record to the waiter ---------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ended_before_the_wait", [False, True])
def test_a_wait_for_finish_brings_the_final_record_for_the_next_get(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, ended_before_the_wait: bool
) -> None:
    (task_id,) = store.queue.push([spec(payload=b"")])
    result = b"1:-R\x00" * 100

    def finish() -> None:
        (rec,) = store.queue.claim(["default"], "w", 1)
        store.queue.finish([(rec.lease, Outcome("succeeded", result=result))])

    if ended_before_the_wait:
        finish()
        store.queue.wait_for_finish([task_id], 5)
    else:
        worker = threading.Timer(0.2, finish)
        worker.start()
        store.queue.wait_for_finish([task_id], 5)
        worker.join()
    fresh = RedisStore(store.url)
    expected = fresh.queue.get(task_id)
    fresh.close()
    assert expected is not None and expected.state == "succeeded"

    def single(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a read after the wait")

    monkeypatch.setattr(store.conn.reads, "hmget", single)
    assert store.queue.get(task_id) == expected
    monkeypatch.undo()
    # It serves one read: the next get reads the store again.
    raw(store, "HSET", f"{store.prefix}t:{task_id}", "codec", "changed")
    again = store.queue.get(task_id)
    assert again is not None and again.codec == "changed"


@pytest.mark.timeout(30)
def test_a_record_nobody_took_is_never_served_after_a_retry(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec()])
    (rec,) = store.queue.claim(["default"], "w", 1)
    store.queue.wait_for_finish([task_id], 0.05)  # registers, then gives up
    store.queue.finish([(rec.lease, Outcome("failed", error={"type": "E"}))])
    assert store.queue.retry(task_id) == "queued"
    started = time.monotonic()
    store.queue.wait_for_finish([task_id], 0.3)
    assert time.monotonic() - started >= 0.25  # nothing ended: no early wake
    again = store.queue.get(task_id)
    assert again is not None and again.state == "queued"


@pytest.mark.timeout(30)
def test_a_wait_after_redis_lost_its_functions_loads_them_and_waits(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec()])
    store.queue.wait_for_finish([task_id], 0.01)
    raw(store, "FUNCTION", "FLUSH")  # as a restarted Redis without persistence has none
    started = time.monotonic()
    store.queue.wait_for_finish([task_id], 0.3)
    assert 0.25 <= time.monotonic() - started < 2
    (rec,) = store.queue.claim(["default"], "w", 1)
    store.queue.finish([(rec.lease, Outcome("succeeded", result=b"7"))])
    raw(store, "FUNCTION", "FLUSH")
    store.queue.wait_for_finish([task_id], 5)  # ended: returns at once, with the record
    got = store.queue.get(task_id)
    assert got is not None and got.result == b"7"


# -- review fixes ------------------------------------------------------------------------


def test_retry_clears_started_as_every_backend_does(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec()])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.get(task_id).started is not None  # type: ignore[union-attr]
    store.queue.finish([(rec.lease, Outcome("failed", error={"type": "E", "message": "m"}))])
    assert store.queue.retry(task_id) == "queued"
    again = store.queue.get(task_id)
    assert again is not None and again.started is None and again.finished is None


def test_a_huge_result_ttl_settles_the_task_whole(store: RedisStore) -> None:
    (task_id,) = store.queue.push([spec(result_ttl=1e16, dedup_key="d")])
    (rec,) = store.queue.claim(["default"], "w", 1)
    assert store.queue.finish([(rec.lease, Outcome("succeeded"))]) == [True]
    assert store.queue.state(task_id) == "succeeded"
    assert store.queue.stats().counts["default"] == {"succeeded": 1}
    ttl = raw(store, "PTTL", f"{store.prefix}t:{task_id}")
    assert isinstance(ttl, int) and ttl > 10**12  # the backstop, clamped
    assert store.queue.push([spec(dedup_key="d")]) != [task_id]  # the dedup key was freed


def test_claim_request_ids_expire_and_a_repeat_leases_nothing_more(store: RedisStore) -> None:
    store.queue.push([spec(), spec()])
    first = store.queue.claim(["default"], "w", 1, request_id="r1")
    assert len(first) == 1
    assert store.queue.claim(["default"], "w", 1, request_id="r1") == first  # a retry
    assert store.queue.claim(["default"], "w", 5, request_id="r1") == first  # never more
    empty = store.queue.claim(["nothing"], "w", 1, request_id="r2")
    assert empty == []
    store.queue.push([spec(queue="nothing")])
    assert store.queue.claim(["nothing"], "w", 1, request_id="r2") == []  # a late duplicate
    for family in ("claimreq", "claimreqexp"):
        ttl = raw(store, "PTTL", f"{store.prefix}{family}")
        assert isinstance(ttl, int) and 0 < ttl <= (REQUEST_ID_TTL_S + 1) * 1000


def test_wake_lists_expire_and_zero_counts_are_removed(store: RedisStore) -> None:
    store.queue.push([spec("a"), spec("b", queue="other")])
    wakes = store.conn.client.keys(f"{store.prefix}wake:*")
    assert len(wakes) == 4
    assert all(0 < store.conn.client.ttl(k) <= 60 for k in wakes)
    for rec in store.queue.claim(["default", "other"], "w", 2):
        store.queue.finish([(rec.lease, Outcome("succeeded"))])
    counts = raw(store, "HGETALL", f"{store.prefix}counts")
    assert counts == {b"default\nsucceeded": b"1", b"other\nsucceeded": b"1"}


def test_lease_calls_on_a_stalled_redis_fail_within_the_read_timeout(
    server: RedisServer, store: RedisStore
) -> None:
    """A "try once" acquire, a renewal and a release never wait for the 10 s
    script timeout: lease scripts run on the short-timeout client."""
    grant = store.leases.acquire("gpu", "me", ttl=30)
    assert grant is not None
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for call in (
            lambda: store.leases.acquire("other", "me", ttl=30),
            lambda: store.leases.renew([grant], 30),
            lambda: store.leases.release(grant),
        ):
            began = time.monotonic()
            with pytest.raises(BackendError):
                call()
            assert time.monotonic() - began < 3.0
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert store.leases.release(grant) is True
