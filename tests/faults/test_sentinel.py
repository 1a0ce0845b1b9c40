"""Redis Sentinel failover to a replica that missed the last writes (store contract v2:
fencing tokens never repeat).

A primary, one replica and three sentinels on loopback ports
(``tests/sentinel_cluster.py``); the store is opened with the ``redis+sentinel://``
URL. The workload claims and finishes tasks and takes lease grants, recording every
fencing token, in three phases:

1. **replicated**: the replica confirms it has everything (``WAIT``);
2. **lost**: the replication stream is held back (the primary acknowledges writes the
   replica never receives), then the primary is SIGKILLed; the test checks that these
   writes really are absent after the failover;
3. **after**: once a sentinel has promoted the replica, the same store object (same
   URL) carries on.

The first write of phase 2 is a claim of task ``pin-lost`` and the first token of
phase 3 is its re-claim, so a counter that merely counts (``last + 1``) would hand the
same token out twice and accept the stale finish; ``max(last + 1, wall µs)`` cannot.

Checked: no token granted twice; every token of phase 3 above every token of phases 1
and 2; a finish with a lease from before the failover, of a task re-claimed after it,
is refused (for a task claimed in phase 1 whose lease expired, and for the claim that
was lost); a grant from the lost window cannot be renewed; the lease clock does not
go back.

KV versions/revisions and stream ids follow the tokens' rule too, so the same failover
does not hand them out again (a CAS on a version read from a lost write can never
succeed against a different value): checked by a second test.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from taskspace.backends import open_store
from taskspace.backends.base import Grant, Lease, Outcome, Store, TaskRecord, TaskSpec
from taskspace.backends.redis.conn import split_namespace
from taskspace.backends.redis.sentinel import SentinelSettings, parse_sentinel_url
from taskspace.errors import BackendError, InvalidURL
from tests.faults.harness import FIGURES
from tests.sentinel_cluster import SentinelCluster
from tests.services import free_port

pytestmark = pytest.mark.fault

T = TypeVar("T")
WORKER = "sentinel-test"
ROUNDS = 12  # claim/finish/grant rounds per phase
CLAIM_N = 3
FAILOVER_DEADLINE_S = 20.0
DONE = Outcome("succeeded", result=b"1")


@dataclass
class Run:
    """What the workload did and saw: every token by phase, operation counts, violations."""

    tokens: dict[str, list[tuple[int, str]]] = field(
        default_factory=lambda: {"replicated": [], "lost": [], "after": []}
    )
    ops: Counter[str] = field(default_factory=Counter)
    refused_during_failover: int = 0
    lost_leases: dict[str, Lease] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def record(self, phase: str, token: int, what: str) -> None:
        self.tokens[phase].append((token, what))


def retrying(run: Run, op: Callable[[], T], what: str) -> T:
    """``op()``, retried while it raises BackendError (the primary is gone and no
    sentinel names a new one yet). Every call used here is safe to retry: claims by
    request id, grants by grant id, finishes by accepted token, reads by nature."""
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    while True:
        try:
            return op()
        except BackendError:
            run.refused_during_failover += 1
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: the store did not come back")
            time.sleep(0.05)


def spec(task_id: str, queue: str, lease_s: float = 30.0) -> TaskSpec:
    return TaskSpec(
        id=task_id, name="t", payload=b"{}", queue=queue, lease_s=lease_s, max_attempts=3
    )


def claim(store: Store, run: Run, phase: str, queue: str, n: int = 1) -> list[TaskRecord]:
    request_id = uuid.uuid4().hex
    tasks = retrying(run, lambda: store.queue.claim([queue], WORKER, n, request_id), "claim")
    run.ops["claim"] += 1
    for task in tasks:
        run.record(phase, task.token, f"claim {task.id}")
    return tasks


def finish(store: Store, run: Run, lease: Lease) -> bool:
    run.ops["finish"] += 1
    return retrying(run, lambda: store.queue.finish([(lease, DONE)]), "finish")[0]


def grant(store: Store, run: Run, phase: str, name: str) -> Grant:
    grant_id = uuid.uuid4().hex
    got = retrying(
        run,
        lambda: store.leases.acquire(name, WORKER, ttl=30.0, grant_id=grant_id),
        "acquire",
    )
    assert got is not None, f"lease {name} unexpectedly held"
    run.ops["acquire"] += 1
    run.record(phase, got.token, f"grant {name}")
    return got


def release(store: Store, run: Run, got: Grant) -> bool:
    run.ops["release"] += 1
    return retrying(run, lambda: store.leases.release(got), "release")


def rounds(store: Store, run: Run, phase: str) -> None:
    """Claim and finish tasks of the ``work`` queue, and take and release a lease.
    A task whose claim was lost in the failover is first finished with that lost
    lease, which must be refused."""
    for i in range(ROUNDS):
        for task in claim(store, run, phase, "work", CLAIM_N):
            old = run.lost_leases.get(task.id)
            if phase == "lost":
                run.lost_leases[task.id] = task.lease
            elif old is not None and finish(store, run, old):
                run.violations.append(
                    f"{task.id}: stale finish with lost token {old.token} accepted"
                )
            if not finish(store, run, task.lease):
                run.violations.append(f"{phase}: finish of a current lease refused: {task.id}")
        got = grant(store, run, phase, f"lock-{phase}-{i % 3}")
        if not release(store, run, got):
            run.violations.append(f"{phase}: release of a current grant refused: {got.name}")


def stale_finish_refused(store: Store, run: Run, old: TaskRecord, new: TaskRecord) -> None:
    """``old`` and ``new`` are two claims of one task, ``new`` after the failover:
    the old lease must be refused and the new one accepted."""
    if new.token == old.token:
        run.violations.append(f"{old.id}: re-claimed with the same token {old.token}")
    if finish(store, run, old.lease):
        run.violations.append(
            f"{old.id}: stale finish with pre-failover token {old.token} accepted"
        )
    if not finish(store, run, new.lease):
        run.violations.append(f"{old.id}: finish with the new token {new.token} refused")


def check_tokens(run: Run) -> None:
    every = [t for phase in run.tokens.values() for t, _ in phase]
    for token, n in Counter(every).items():
        if n > 1:
            whats = [w for phase in run.tokens.values() for t, w in phase if t == token]
            run.violations.append(f"token {token} granted {n} times: {whats}")
    before = [t for phase in ("replicated", "lost") for t, _ in run.tokens[phase]]
    after = [t for t, _ in run.tokens["after"]]
    if after and before and min(after) <= max(before):
        run.violations.append(
            f"a token after the failover ({min(after)}) is not above every token before it"
            f" ({max(before)})"
        )


def report(run: Run, faults: list[str]) -> None:
    lines = [
        "sentinel failover: operations "
        + ", ".join(f"{k} {v}" for k, v in sorted(run.ops.items()))
        + f"; tokens {', '.join(f'{k} {len(v)}' for k, v in run.tokens.items())}"
        + f"; calls refused during the failover {run.refused_during_failover}",
        "sentinel failover: faults: " + "; ".join(faults),
        f"sentinel failover: violations: {len(run.violations)}",
        *(f"  VIOLATION {v}" for v in run.violations),
    ]
    for line in lines:
        print(line)
    FIGURES.extend(lines)


@pytest.mark.timeout(60)
def test_tokens_never_repeat_across_failover_with_lost_writes() -> None:
    with SentinelCluster() as cluster:
        store = open_store(cluster.url(namespace=f"t{uuid.uuid4().hex[:12]}"))
        try:
            _failover_run(cluster, store)
        finally:
            store.close()


def _failover_run(cluster: SentinelCluster, store: Store) -> None:
    run, faults = Run(), list[str]()
    try:
        _phases(cluster, store, run, faults)
        check_tokens(run)
    finally:
        report(run, faults)  # also when a step failed: what had happened so far
    assert not run.violations, "\n".join(run.violations)


def _phases(cluster: SentinelCluster, store: Store, run: Run, faults: list[str]) -> None:
    assert cluster.relay is not None
    store.queue.push([spec(f"w{i}", "work") for i in range(3 * ROUNDS * CLAIM_N)])
    store.queue.push([spec("pin-expired", "pin-a", lease_s=0.5), spec("pin-lost", "pin-b")])

    # 1. replicated: everything reaches the replica.
    rounds(store, run, "replicated")
    (expired,) = claim(store, run, "replicated", "pin-a")
    acked = cluster.wait_replicated()
    assert acked == 1, "the replica did not confirm the replicated phase"

    # 2. lost: the primary acknowledges, the replica never receives.
    cluster.relay.hold()
    (lost_claim,) = claim(store, run, "lost", "pin-b")  # the first write the replica misses
    lost_grant = grant(store, run, "lost", "lock-lost")
    rounds(store, run, "lost")
    store.queue.push([spec("marker", "other")])  # the last write before the kill
    clock_before = store.clock.now()
    primary_offset, replica_offset = cluster.repl_offsets()
    cluster.kill_primary()
    faults.append(
        f"replication held back: {primary_offset - replica_offset} bytes acknowledged by the"
        f" primary never reached the replica"
    )
    faults.append("primary SIGKILLed")
    faults.append(f"replica promoted by the sentinels {cluster.wait_promoted():.2f} s after")

    # 3. after: the same store, through the same URL. First a re-claim of pin-lost.
    (reclaimed,) = claim(store, run, "after", "pin-b")
    retrying(run, store.check_space, "check_space")  # the space itself was replicated
    stale_finish_refused(store, run, lost_claim, reclaimed)
    assert retrying(run, lambda: store.queue.get("marker"), "get") is None, (
        "the last write before the kill survived: no writes were lost, the test proves nothing"
    )
    assert reclaimed.attempts == lost_claim.attempts, "the lost claim was not lost"
    if retrying(run, lambda: store.leases.renew([lost_grant], 30.0), "renew") != [None]:
        run.violations.append(f"grant {lost_grant.id} from the lost window renewed")
    clock_after = retrying(run, store.clock.now, "clock")
    if clock_after < clock_before:
        run.violations.append(f"lease clock went back: {clock_before} -> {clock_after}")
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    while retrying(run, lambda: store.queue.state("pin-expired"), "state") != "queued":
        retrying(run, store.queue.requeue_expired, "requeue_expired")  # lease_s 0.5 s
        assert time.monotonic() < deadline, "pin-expired was never requeued"
        time.sleep(0.05)
    (again,) = claim(store, run, "after", "pin-a")
    stale_finish_refused(store, run, expired, again)
    grant(store, run, "after", "lock-lost")
    rounds(store, run, "after")


@pytest.mark.timeout(60)
def test_kv_versions_and_stream_ids_never_repeat_across_failover() -> None:
    run = Run()
    with SentinelCluster() as cluster:
        assert cluster.relay is not None
        store = open_store(cluster.url(namespace=f"t{uuid.uuid4().hex[:12]}"))
        try:
            store.kv.put("k", b"replicated")
            store.streams.append("s", b"replicated")
            if cluster.wait_replicated() != 1:
                pytest.fail("the replica did not confirm the replicated write")
            cluster.relay.hold()
            lost = store.kv.put("k", b"lost")
            lost_id = store.streams.append("s", b"lost")
            cluster.kill_primary()
            cluster.wait_promoted()
            current = retrying(run, lambda: store.kv.get("k"), "get")
            if current is None or current.value != b"replicated":
                pytest.fail(f"the write before the kill was not lost: {current}")
            new = retrying(run, lambda: store.kv.put("k", b"new"), "put")
            (new_id,) = retrying(
                run, lambda: store.streams.append_many("s", [b"new"], request_id="n"), "append"
            )
            # What a reused number would break: a CAS on the version read from the
            # lost write (ABA), and readers resuming from what they last saw.
            aba = retrying(run, lambda: store.kv.cas("k", lost.version, b"aba"), "cas")
            watched = retrying(run, lambda: store.kv.changes("k", lost.revision), "changes")
            read = retrying(run, lambda: store.streams.read("s", after=lost_id), "read")
        finally:
            store.close()
    print(f"lost write: {lost}, stream id {lost_id}; after the failover: {new}, stream id {new_id}")
    assert new.version > lost.version and new.revision > lost.revision and new_id > lost_id
    assert aba is None, "a CAS on the version of a lost write succeeded"
    assert [(c.revision, c.value) for c in watched] == [(new.revision, b"new")]
    assert [(e.id, e.data) for e in read] == [(new_id, b"new")]


@pytest.mark.timeout(60)
def test_password_protected_deployment() -> None:
    """Passwords of the Redis servers (in the URL) and of the sentinels
    (``sentinel_password``) reach the right processes; a wrong one is a BackendError."""
    with SentinelCluster(password="data-pw", sentinel_password="sentinel-pw") as cluster:
        store = open_store(cluster.url(namespace="pw"))
        try:
            store.queue.push([spec("a", "q")])
            (task,) = store.queue.claim(["q"], WORKER, 1)
            assert store.queue.finish([(task.lease, DONE)]) == [True]
        finally:
            store.close()
        for url, names in [
            (cluster.url(password="wrong"), "AuthenticationError"),
            (cluster.url(sentinel_password="wrong"), "No master found"),
        ]:
            with pytest.raises(BackendError, match=names):
                open_store(url)


# -- the URL form ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://:pw@127.0.0.1:26380,127.0.0.1:26381/svc/2?namespace=ns",
            SentinelSettings(
                (("127.0.0.1", 26380), ("127.0.0.1", 26381)), "svc", 2, None, "pw", None, "ns"
            ),
        ),
        (
            "redis+sentinel://u:p%40ss@[::1]:5000,localhost/svc/?sentinel_password=sp",
            SentinelSettings((("::1", 5000), ("localhost", 26379)), "svc", 0, "u", "p@ss", "sp"),
        ),
        ("REDIS+SENTINEL://h/svc", SentinelSettings((("h", 26379),), "svc")),
    ],
)
def test_sentinel_url_parses(url: str, expected: SentinelSettings) -> None:
    assert parse_sentinel_url(url) == expected
    stripped = split_namespace(url)[0]  # what the connection code hands on
    assert parse_sentinel_url(stripped).sentinels == expected.sentinels


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis://h:1/svc", "scheme"),
        ("redis+sentinel:///svc", "no sentinel"),
        ("redis+sentinel://h:1,/svc", "no sentinel"),
        ("redis+sentinel://h:port/svc", "bad port"),
        ("redis+sentinel://h:70000/svc", "bad port"),
        ("redis+sentinel://h:1", "no service name"),
        ("redis+sentinel://h:1/svc/x", "must be a number"),
        ("redis+sentinel://h:1/svc/0/1", "too many path segments"),
        ("redis+sentinel://h:1/svc?timeout=3", "unknown Redis Sentinel option"),
        ("redis+sentinel://h:1/svc?namespace={x}", "namespace"),
        ("redis+sentinel://h:1/svc#frag", "fragment"),
    ],
)
def test_bad_sentinel_url_is_refused_by_name(url: str, names: str) -> None:
    with pytest.raises(InvalidURL, match=names):
        parse_sentinel_url(url)
    with pytest.raises(InvalidURL):
        open_store(url)


def test_no_sentinel_reachable_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="No master found"):
        open_store(f"redis+sentinel://127.0.0.1:{free_port()}/svc")
