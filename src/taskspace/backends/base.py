"""The store contract (v2): the few atomic operations every backend implements.

A store is one object per protocol: ``store.queue`` (tasks), ``store.leases``
(named leases: locks, semaphores, elections), ``store.kv`` (versioned values
with a change feed), ``store.streams`` (append-only logs), ``store.pubsub``
(best-effort broadcast) and ``store.clock``. Every feature of taskspace is
written once on top of them; the conformance suite (``tests/conformance``)
proves that memory, SQLite and Redis agree.

**Atomicity.** Each method happens entirely or not at all, and no other
client observes it half done (one SQL transaction, one Lua script, one
lock-protected update). The few documented exceptions are split into steps
that are each atomic (a push of many chunks, a paged purge).

**Errors.** Every method may raise:

- :class:`~taskspace.errors.BackendError`: the backend is unreachable or
  failed. The call may or may not have taken effect; retry it. Calls whose
  reply can be lost on a network backend are safe to retry: ``push`` by task
  id, ``claim``/``kv.txn``/``kv.incr``/``streams.append_many`` by
  ``request_id``, ``leases.acquire`` by ``grant_id``, ``finish`` by the
  accepted token; the others are idempotent by nature. Backends whose
  replies cannot be lost (memory, a local SQLite file: a call returns or
  raises before anything is committed) may ignore request ids.
- :class:`~taskspace.errors.SpaceLost`: the space was wiped or replaced
  (``store.check_space``); never retry, stop.
- :class:`~taskspace.errors.ConfigError`: an argument that could only be a
  mistake (named in the message); nothing was written.

No method raises a driver's own exception.

**Time: two clocks, never mixed.** ``clock.now()`` is the *lease clock*:
seconds on the store's clock, never the caller's, so a client whose clock
jumps cannot extend or steal a lease. It never goes backwards for a store,
across restarts, reboots and a server whose clock steps back (the store keeps
a high-water mark). Every expiry, ready time and TTL is on it (``ready_at``,
``lease_expires``, ``Grant.expires``, ``Versioned.expires``); durations
passed in (``lease_s``, ``ttl``, ``delay``) are relative to it at the moment
the operation runs. ``clock.wall()`` is Unix epoch seconds, used for every
time a person reads: ``TaskRecord.created/started/finished`` and
``StreamEntry.time``, on every backend alike.

**Fencing tokens never repeat.** Task claims and lease grants take their
tokens from one counter per space: ``next = max(last + 1, wall
microseconds)`` (:func:`next_token`). Tokens therefore increase strictly
across every name and task of a space (a token also orders events), and a
counter that lost its last writes (a wiped space, a Redis failover to a
replica that missed them) restarts above every token handed out before, as
long as the new server's wall clock is not behind the old one's by more than
the time the loss took to happen. Tokens fit in 53 bits until the year 2255.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, Self

TaskState = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]
TASK_STATES: tuple[TaskState, ...] = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
)
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "dead", "cancelled"})
# The states ``QueueStore.retry`` requeues from (a retry by hand).
RETRYABLE_STATES: tuple[str, ...] = ("failed", "dead")
LIVE_STATES: frozenset[str] = frozenset({"queued", "running"})

# Priorities every backend orders exactly (Redis folds priority and FIFO
# sequence into one double score, exact while |priority| < 2**20).
PRIORITY_MIN = -1_000_000
PRIORITY_MAX = 1_000_000
# Finished tasks are kept this long by default (``TaskSpec.result_ttl``).
DEFAULT_RESULT_TTL_S = 7 * 24 * 3600.0
# Errors of earlier attempts kept flat in a task's error (``history``).
ERROR_HISTORY_MAX = 5

OutcomeKind = Literal["succeeded", "failed", "retry", "cancelled", "release"]
LeaseStatus = Literal["held", "cancel_requested", "terminate_requested", "lost"]

ErrorInfo = dict[str, Any]
"""``{"type": str, "message": str, "traceback": str}`` plus optional detail keys."""


@dataclass(slots=True)
class TaskSpec:
    """A task to enqueue; ``delay`` is seconds from the store's now until it may run."""

    id: str
    name: str
    payload: bytes
    codec: str = "json"
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 1
    lease_s: float = 30.0
    timeout: float | None = None
    dedup_key: str | None = None
    delay: float = 0.0
    result_ttl: float | None = DEFAULT_RESULT_TTL_S


# A push is written in chunks of at most this many tasks or payload bytes, so
# that no single store operation (one Lua script, one SQLite transaction)
# holds the backend for long; each chunk is atomic on its own.
PUSH_CHUNK_TASKS = 1000
PUSH_CHUNK_BYTES = 8 * 1024 * 1024


def push_chunks(specs: Sequence[TaskSpec]) -> list[Sequence[TaskSpec]]:
    """``specs`` split into runs of at most PUSH_CHUNK_TASKS tasks and (unless a
    single task is larger) PUSH_CHUNK_BYTES of payload."""
    chunks: list[Sequence[TaskSpec]] = []
    start, size = 0, 0
    for i, spec in enumerate(specs):
        if i > start and (
            i - start >= PUSH_CHUNK_TASKS or size + len(spec.payload) > PUSH_CHUNK_BYTES
        ):
            chunks.append(specs[start:i])
            start, size = i, 0
        size += len(spec.payload)
    if start < len(specs):
        chunks.append(specs[start:])
    return chunks


@dataclass(slots=True)
class TaskRecord:
    """A task as the store holds it. ``attempts`` counts claims; ``lost`` counts expired leases.

    A snapshot: changing it changes nothing in the store. (Not frozen only
    because a frozen dataclass's ``__init__`` is several times slower, and
    workers build one per claimed task.)
    """

    id: str
    name: str
    payload: bytes
    codec: str
    queue: str
    priority: int
    max_attempts: int
    lease_s: float
    timeout: float | None
    dedup_key: str | None
    state: TaskState
    ready_at: float  # lease clock, as is lease_expires
    attempts: int = 0
    lost: int = 0
    token: int = 0
    worker: str | None = None
    lease_expires: float | None = None
    result: bytes | None = None
    error: ErrorInfo | None = None
    progress: tuple[float, float] | None = None
    cancel_requested: bool = False
    created: float = 0.0  # wall clock (epoch seconds), as are started and finished
    started: float | None = None
    finished: float | None = None
    result_ttl: float | None = DEFAULT_RESULT_TTL_S

    @property
    def lease(self) -> Lease:
        """The lease of the current claim (meaningful while ``running``)."""
        return Lease(self.id, self.token)


class Lease(NamedTuple):
    """Proof of a claim: the task id and the fencing token the claim was granted."""

    task_id: str
    token: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a claimed task ended.

    - ``succeeded``: ``result`` holds the encoded value.
    - ``failed``: final; ``error`` says why.
    - ``retry``: back to the queue after ``delay`` seconds, keeping ``error``.
    - ``cancelled``: final, at the task's or a user's request.
    - ``release``: the worker gives the task back unstarted (shutdown); the
      claim does not count as an attempt.

    ``followups`` are tasks pushed atomically with the outcome if, and only
    if, the finish is accepted (a chain's next step, a saga's compensation).
    """

    kind: OutcomeKind
    result: bytes | None = None
    error: ErrorInfo | None = None
    delay: float = 0.0
    followups: tuple[TaskSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts of tasks by queue and state, and of refused stale finishes."""

    counts: Mapping[str, Mapping[str, int]]
    stale_finishes: int = 0

    def total(self, state: str, queues: Sequence[str] | None = None) -> int:
        """Number of tasks in ``state`` across ``queues`` (all queues when None)."""
        return sum(
            by_state.get(state, 0)
            for queue, by_state in self.counts.items()
            if queues is None or queue in queues
        )


# The longest duration (ttl, lease, delay, result_ttl) any call accepts: ten
# years. Longer ones are refused up front (Redis's EXPIRE would fail halfway
# through a script on them).
MAX_DURATION_S = 10 * 365.25 * 24 * 3600
# The range of KV integers (``incr``): signed 64 bits on every backend.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Each grant, KV change and request id is kept for at most this long or count.
REQUEST_ID_TTL_S = 600.0
# The KV change feed keeps at least this many newest changes; ``reap`` drops
# older ones (so between reaps it holds at most this plus what was written).
KV_CHANGES_KEEP = 10_000
# A subscription buffers at most this many undelivered messages; past that it
# drops the oldest and reports a Gap.
SUBSCRIPTION_BUFFER = 10_000


def claim_waiting(
    claim_now: Callable[[str | None], list[TaskRecord]],
    wait_for_tasks: Callable[[float], None],
    request_id: str | None,
    wait: float,
) -> list[TaskRecord]:
    """``claim(..., wait=)`` for a backend whose claim cannot block by itself:
    ``claim_now(request_id)``; while nothing came, ``wait_for_tasks(left)`` then
    claim again, until ``wait`` has passed. Each claim after a wait is a step of
    its own request (``<request_id>\\n<step>``), so a repeated call replays what
    each step leased. The caller returns early when there is nothing to wait
    for (``n <= 0``, no names)."""
    claimed = claim_now(request_id)
    if claimed or wait <= 0:
        return claimed
    deadline = time.monotonic() + wait
    step = 0
    while not claimed and (left := deadline - time.monotonic()) > 0:
        wait_for_tasks(left)
        step += 1
        claimed = claim_now(None if request_id is None else f"{request_id}\n{step}")
    return claimed


def next_token(last: int, wall: float) -> int:
    """The fencing token after ``last`` at wall time ``wall`` (epoch seconds):
    strictly above ``last``, and never below the wall clock in microseconds,
    so a counter that lost its state still starts above every earlier token."""
    return max(last + 1, int(wall * 1_000_000))


@dataclass(frozen=True, slots=True)
class Grant:
    """One acquisition of a slot of a named lease.

    ``id`` names this acquisition (two acquisitions by equal ``holder``
    strings are two grants); ``token`` is the space's fencing token, larger
    than every token handed out before it; ``expires`` is on the lease clock;
    ``data`` is what the holder attached (an election's leader identity).
    """

    name: str
    id: str
    holder: str
    token: int
    expires: float
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Versioned:
    """A live KV value.

    ``version`` increases with every write of the key and is never reused,
    also across delete and re-create, so compare-and-set has no ABA;
    ``revision`` is the space revision of the write that produced it;
    ``expires`` is on the lease clock (None: no TTL).
    """

    value: bytes
    version: int
    revision: int
    expires: float | None = None


ChangeKind = Literal["put", "delete", "expire"]


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the KV change feed.

    ``revision`` is unique and increasing per space; ``version`` is the key's
    version after a put, or the version that was removed by a delete or an
    expiry; ``value`` is the new value of a put (None otherwise).
    """

    revision: int
    key: str
    kind: ChangeKind
    version: int
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class VersionIs:
    """Txn compare: the key's live version is ``version`` (None: the key is absent)."""

    key: str
    version: int | None


@dataclass(frozen=True, slots=True)
class ValueIs:
    """Txn compare: the key is live and its value is exactly ``value``."""

    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Exists:
    """Txn compare: the key is live (``exists=True``) or absent (False)."""

    key: str
    exists: bool = True


@dataclass(frozen=True, slots=True)
class GrantHeld:
    """Txn compare: ``grant`` is still current (not released, not expired, same
    token); this is what makes a write *fenced*."""

    grant: Grant


Compare = VersionIs | ValueIs | Exists | GrantHeld


@dataclass(frozen=True, slots=True)
class Put:
    """Txn write: set ``key`` to ``value`` (``ttl`` seconds on the lease clock, None: none)."""

    key: str
    value: bytes
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Txn write: delete ``key`` (nothing if it is absent)."""

    key: str


Write = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    """What a txn did. ``ok``: every compare held and every write was applied
    at ``revision``; ``versions`` gives each Put's new version (in write
    order). Otherwise nothing was written, ``failed`` is the index of the first
    compare that did not hold, and ``revision`` is the current revision."""

    ok: bool
    revision: int
    versions: tuple[int, ...] = ()
    failed: int | None = None


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry; ids increase within a stream and are never reused;
    ``time`` is the wall clock (epoch seconds) when it was appended."""

    id: int
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Message:
    """A message delivered by PubSub; ``pattern`` is the prefix it matched
    (None for a channel subscription)."""

    channel: str
    data: bytes
    pattern: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A subscription may have missed messages here: ``reason`` is
    ``"reconnect"`` (the connection was lost and re-made) or ``"overflow"``
    (the buffer was full and the oldest messages were dropped). Callers that
    need every change re-sync from the store (the KV change feed)."""

    reason: Literal["reconnect", "overflow"]
    missed: int | None = None


class MessageBuffer:
    """The undelivered messages of one subscription, shared by every backend:
    at most ``capacity`` (SUBSCRIPTION_BUFFER; passed on each push, so a test
    can shrink a backend's constant); past that the oldest message is dropped
    and counted, and the next ``pop`` is ``Gap("overflow", missed=n)`` before
    what follows. Not thread-safe: the subscription guards it."""

    def __init__(self) -> None:
        self.items: deque[Message | Gap] = deque()
        self.missed = 0

    def push(self, item: Message | Gap, capacity: int = SUBSCRIPTION_BUFFER) -> None:
        if len(self.items) >= capacity and isinstance(self.items.popleft(), Message):
            self.missed += 1  # (a dropped Gap is not a missed message)
        self.items.append(item)

    def pop(self) -> Message | Gap | None:
        if self.missed:
            gap, self.missed = Gap("overflow", missed=self.missed), 0
            return gap
        return self.items.popleft() if self.items else None

    def pending(self) -> bool:
        """True if ``pop`` has something to return."""
        return bool(self.items) or self.missed > 0

    def clear(self) -> None:
        self.items.clear()
        self.missed = 0


class Clock(Protocol):
    """The store's two clocks (see the module docstring)."""

    def now(self) -> float:
        """The lease clock: seconds, never backwards for a given store."""
        ...

    def wall(self) -> float:
        """Unix epoch seconds, for times a person reads."""
        ...


class QueueStore(Protocol):
    """Durable tasks with leases, fencing, priorities, ETA, dedup and dead-lettering.

    Guarantees: a pushed task is durable once ``push`` returns; a task is held
    by at most one unexpired lease at a time; a finish with a stale lease
    changes nothing and is counted; every task ends in a final state.
    """

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs`` in one atomic step; return the id of each task.

        Idempotent by id: a spec whose ``id`` exists already is not enqueued
        again (a push retried after a lost reply makes no second task). A
        spec whose ``dedup_key`` matches a live (queued or running) task is
        not enqueued; the live task's id is returned in its place.
        """
        ...

    def claim(
        self,
        queues: Sequence[str],
        worker: str,
        n: int,
        request_id: str | None = None,
        names: Collection[str] | None = None,
        wait: float = 0.0,
    ) -> list[TaskRecord]:
        """Lease up to ``n`` ready tasks: earlier queues first, then higher
        priority, then FIFO. Each claim increments ``attempts``, gets a fresh
        fencing token from the space's counter and a lease of the task's
        ``lease_s``.

        ``names``: only tasks with one of these names are leased (a worker
        claims only what it can run, so several apps share a space); tasks of
        other names stay queued, in order, and cost a claim little however
        many there are. None: any name.

        A repeat of a ``request_id`` (after an error that may have hidden a
        reply) returns what the first call leased instead of leasing more,
        and a request id the store has seen before never leases anything new
        (a late duplicate of a claim leases nothing); backends whose replies
        cannot be lost may ignore it.

        With ``wait`` > 0 and nothing claimable, block up to ``wait`` seconds
        until a task may be claimable (as ``wait_for_tasks``: tasks of other
        names do not end the wait), then claim (one round trip where the
        backend allows); returns [] if none came. May return early. ``wait``
        out of range (see checks.check_wait): ConfigError."""
        ...

    def renew(self, leases: Sequence[Lease]) -> dict[str, LeaseStatus]:
        """Extend every lease still held by its task's ``lease_s``; report each
        task as ``held``, ``cancel_requested`` (held, and a cancel was asked),
        ``terminate_requested`` (held, and a cancel with ``terminate``) or
        ``lost`` (stale token, or expired: the worker must abandon the
        attempt, never finish it as cancelled)."""
        ...

    def finish(self, items: Sequence[tuple[Lease, Outcome]]) -> list[bool]:
        """Record outcomes in one atomic step; an item is accepted only if its
        lease is still the task's current one and the task is running, and its
        outcome's ``followups`` are pushed (as ``push`` would) in the same
        atomic step, never for a refused item. A refused item changes nothing
        and increments ``stale_finishes``.

        A finish retried after a lost reply is answered True again without
        a second effect: the store records the token whose finish it accepted
        (until the task is claimed again), so a retry is not counted stale."""
        ...

    def progress(self, lease: Lease, done: float, total: float) -> bool:
        """Record progress for a running task; refused for a stale lease."""
        ...

    def requeue_expired(self) -> int:
        """Return every running task whose lease expired to its queue
        (``lost + 1``), or mark it ``dead`` when its attempts are exhausted.
        Returns how many tasks were handled. Safe to run concurrently."""
        ...

    def promote_due(self) -> int:
        """Make tasks whose ETA has passed claimable; backends whose ``claim``
        filters by ETA directly may do nothing and return 0."""
        ...

    def cancel(self, task_id: str, terminate: bool = False) -> TaskState | None:
        """Cancel a task: a queued one becomes ``cancelled`` and never runs; a
        running one gets a cancel request that its worker sees on renew
        (``cancel_requested``, or ``terminate_requested`` when ``terminate``:
        the worker kills a process-isolated attempt; a later cancel without
        ``terminate`` never downgrades it). Returns the state after the call,
        or None if there is no such task."""
        ...

    def get(self, task_id: str) -> TaskRecord | None:
        """The task, or None."""
        ...

    def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord | None]:
        """Each task (or None), in the order asked, in one round trip."""
        ...

    def state(self, task_id: str) -> TaskState | None:
        """Only the task's state (never its payload or result), or None."""
        ...

    def list(
        self,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[TaskRecord]:
        """Tasks matching every filter given, in submission order, at most
        ``limit``; ``after`` (a task id from an earlier page) continues after
        that task (ConfigError if no such task exists any more: paging
        restarts rather than silently ending). Records carry no payload or
        result (``b""``/None); use ``get`` for those."""
        ...

    def retry(self, task_id: str) -> TaskState | None:
        """Requeue a ``failed`` or ``dead`` task with fresh attempts
        (``attempts = lost = 0``, ready now, its last error kept). Returns the
        state after the call (unchanged for any other state), or None."""
        ...

    def purge(self, queue: str, states: Collection[str]) -> int:
        """Delete the tasks of ``queue`` in ``states`` (never ``running``:
        those belong to a worker); return how many were deleted."""
        ...

    def reap(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished tasks whose ``result_ttl`` has
        passed since they finished (with their index entries); return how
        many were deleted. Safe to run concurrently."""
        ...

    def stats(self) -> QueueStats:
        """Task counts by queue and state, and the stale-finish counter."""
        ...

    def wait_for_tasks(
        self, queues: Sequence[str], timeout: float, names: Collection[str] | None = None
    ) -> None:
        """Block until a task may have become claimable in ``queues`` (with one
        of ``names``, when given) or ``timeout`` passes. Tasks of other names
        do not end the wait. May return early; callers re-check with ``claim``."""
        ...

    def wait_for_finish(self, task_ids: Sequence[str], timeout: float) -> None:
        """Block until one of ``task_ids`` may have ended or ``timeout``
        passes. May return early; callers re-check with ``get``."""
        ...


class LeaseStore(Protocol):
    """Named leases: ``capacity`` slots per name, each acquisition its own grant.

    Guarantees:

    - At most ``capacity`` unexpired grants per name, ever. The capacity is
      stored with the name while it has live grants; an ``acquire`` with a
      different capacity then raises ConfigError (two callers can never both
      hold a name by disagreeing about its size).
    - Every acquisition is a distinct grant with its own id and a fresh
      token: equal ``holder`` strings never share a grant (re-entrancy is the
      caller's business, never an accident).
    - Only the current grant can be renewed or released; a released or
      expired grant stays lost (a later grant has another id and token).
    - A grant's ``expires`` is on the lease clock; past it the grant no longer
      counts, whether or not anything reaped it.

    Errors: BackendError when the backend fails (see the module docstring);
    ConfigError for a capacity below 1, a ttl that is not positive, or a
    capacity that differs from the live one.
    """

    def acquire(
        self,
        name: str,
        holder: str,
        ttl: float,
        capacity: int = 1,
        data: bytes = b"",
        grant_id: str | None = None,
    ) -> Grant | None:
        """A new grant of one slot of ``name`` for ``ttl`` seconds, or None if
        all ``capacity`` slots are held. ``holder`` names the holder for people
        (``host:pid``); ``data`` rides on the grant.

        ``grant_id`` (default: a fresh random id) makes the call safe to retry:
        if a live grant with this id exists, it is returned unchanged instead
        of taking another slot."""
        ...

    def renew(self, grants: Sequence[Grant], ttl: float) -> list[Grant | None]:
        """Extend each grant that is still current to ``ttl`` seconds from now,
        in one round trip; each item is the renewed grant (same id and token,
        new ``expires``) or None if that grant was lost."""
        ...

    def release(self, grant: Grant) -> bool:
        """Give up ``grant``; False if it was no longer current. Wakes waiters."""
        ...

    def holders(self, name: str) -> list[Grant]:
        """The live grants of ``name``, oldest token first."""
        ...

    def wait(self, name: str, timeout: float) -> None:
        """Block until a slot of ``name`` may have been freed (a release, or an
        expiry: the wait ends by the earliest live grant's expiry) or
        ``timeout`` passes. May return early; callers retry ``acquire``. A
        release wakes a waiter in another process within milliseconds."""
        ...


class KVStore(Protocol):
    """Versioned keys with TTLs, one revision counter per space, and a change feed.

    Guarantees:

    - Every write (put, cas, incr, delete, a txn's writes, and an expiry)
      takes a new space **revision**, above every earlier one; a txn's
      writes share one revision. Revisions are not dense (a backend may skip
      numbers) and are never handed out twice, also across a failover that
      lost the last writes (Redis derives them as it derives fencing tokens).
      A call that changes nothing takes no revision.
    - ``version`` strictly increases with every write of a key and is never
      reused, also across delete and re-create, so compare-and-set has no ABA.
    - An expired key behaves exactly like a missing one, at once.
    - The change feed holds every put, delete and expiry in revision order.
      An expiry is recorded (with its own revision) by the first ``changes``,
      write or ``reap`` that runs after the key's TTL passed (a ``wait``
      returns when one is due), so a watcher sees it without anyone reading
      the key.
    - The feed is bounded: ``reap`` compacts it to the newest KV_CHANGES_KEEP
      changes; asking for changes it dropped raises
      :class:`~taskspace.errors.Compacted` (etcd's model: re-list, resume).

    Keys are non-empty strings; values are bytes. Errors: BackendError (see
    the module docstring), ConfigError for an empty key, a ttl that is not
    positive or a limit below 1, NotAnInteger from ``incr``.
    """

    def get(self, key: str) -> Versioned | None:
        """The live value of ``key``, or None."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        """Each key's live value (or None), in the order asked, in one round trip."""
        ...

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        """Write unconditionally (a TTL in seconds, or None: none); return the write."""
        ...

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        """Write only if the live version is ``expected_version`` (None: the key
        must be absent); the write, or None if the version did not match."""
        ...

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        """Add ``delta`` to a decimal integer value (absent: 0) and return the
        result; ``ttl`` applies only when the key is created. ``delta`` must
        be an int in [INT64_MIN, INT64_MAX] (ConfigError); a stored value that
        is not such an integer, or a result outside that range, raises
        NotAnInteger and changes nothing. A repeated
        ``request_id`` (a retry after a lost reply) returns the first result
        without adding again."""
        ...

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        """Delete ``key`` (only at ``expected_version`` if given); True if deleted."""
        ...

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        """Set a live key's TTL to ``ttl`` seconds from now (None: no TTL)
        without rewriting its value: no new version, revision or change (a
        heartbeat). Returns the key with its new expiry, or None if absent."""
        ...

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        """Live pairs whose key starts with ``prefix`` and sorts after
        ``after_key``, in key order, at most ``limit``: pass the last key of a
        page as ``after_key`` for the next one."""
        ...

    def txn(
        self,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        request_id: str | None = None,
    ) -> TxnResult:
        """If every compare holds, apply every write atomically at one new
        revision. A repeated ``request_id`` returns the first call's result
        without applying anything again. Writing one key twice in a txn is a
        ConfigError."""
        ...

    def revision(self) -> int:
        """The space's current KV revision (0 before any write)."""
        ...

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        """Changes of keys starting with ``prefix`` with revision above
        ``after_revision``, oldest first. A page never splits a revision (a
        txn's changes come whole), so resuming from the last change's
        revision misses nothing: it holds at most ``limit`` changes unless
        its first revision alone has more, and is never empty while changes
        remain. Raises Compacted if the feed dropped a change above
        ``after_revision``."""
        ...

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        """Block until a change of a key starting with ``prefix`` with revision
        above ``after_revision`` may exist (or a key of the prefix may expire),
        or ``timeout`` passes. May return early; callers re-check ``changes``."""
        ...

    def reap(self, limit: int = 1000) -> int:
        """Record the expiry of up to ``limit`` keys whose TTL passed (deleting
        them and their index entries) and compact the change feed to its
        newest KV_CHANGES_KEEP changes; return how many keys expired. Safe to
        run concurrently (maintenance runs it every second)."""
        ...


class StreamStore(Protocol):
    """Append-only streams.

    Guarantees: ids increase within a stream and are never reused, also after
    a trim and across a failover that lost the last appends (ids are not
    dense); an entry is durable once ``append`` returns; ``time`` is the wall
    clock of the append. Errors: BackendError (see the module docstring),
    ConfigError for a maxlen or limit below 1 or a negative wait.
    """

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        """Append one entry and return its id; keep at most ``maxlen`` newest."""
        ...

    def append_many(
        self,
        stream: str,
        items: Sequence[bytes],
        maxlen: int | None = None,
        request_id: str | None = None,
    ) -> list[int]:
        """Append ``items`` in order in one atomic step and return their ids.
        A repeated ``request_id`` returns the first call's ids without
        appending again."""
        ...

    def read(
        self, stream: str, after: int = 0, limit: int = 100, wait: float = 0.0
    ) -> list[StreamEntry]:
        """Entries with id above ``after``, oldest first, at most ``limit``. With
        ``wait`` > 0 and nothing to return, block up to ``wait`` seconds for an
        entry to arrive (an append wakes a reader in another process within
        milliseconds)."""
        ...

    def trim(
        self,
        stream: str,
        maxlen: int | None = None,
        min_id: int | None = None,
        max_age: float | None = None,
    ) -> int:
        """Drop entries beyond the ``maxlen`` newest, with an id below
        ``min_id``, or appended more than ``max_age`` seconds ago (wall clock);
        return how many were dropped."""
        ...


class Subscription(Protocol):
    """A live subscription; messages published after it was made are delivered."""

    def get(self, timeout: float | None = None) -> Message | Gap | None:
        """The next message, a Gap, or None after ``timeout`` seconds.

        A Gap says messages may have been missed just before it: the
        connection was lost (the subscription re-subscribes by itself and
        delivers what is published after that) or the buffer overflowed. While
        the backend stays away ``get`` raises BackendError."""
        ...

    def close(self) -> None:
        """Stop receiving; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class PubSub(Protocol):
    """Best-effort broadcast: a subscriber may miss messages (disconnect,
    overflow) and is told so by a Gap, so no correctness may depend on
    delivery; invalidations and wake-ups re-sync from the store."""

    def publish(self, channel: str, data: bytes) -> None:
        """Send ``data`` to current subscribers of ``channel`` and of any
        prefix of it."""
        ...

    def subscribe(self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()) -> Subscription:
        """Subscribe to ``channels`` and to every channel starting with one of
        ``prefixes``."""
        ...


class Closeable(ABC):
    """Mixin: ``with obj:`` closes ``obj`` on exit."""

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Store(Protocol):
    """A backend: one object per protocol, on one connection target.

    ``space_id`` is the identity record of the space, created with it (the
    first open with ``create=True``) and read when the store is opened.
    """

    url: str
    space_id: str

    @property
    def queue(self) -> QueueStore: ...

    @property
    def leases(self) -> LeaseStore: ...

    @property
    def kv(self) -> KVStore: ...

    @property
    def streams(self) -> StreamStore: ...

    @property
    def pubsub(self) -> PubSub: ...

    @property
    def clock(self) -> Clock: ...

    def check_space(self) -> None:
        """Raise :class:`~taskspace.errors.SpaceLost` if the space's identity
        record is gone or is no longer ``space_id`` (the space was wiped or
        replaced); BackendError if it cannot be read. Callers check it on
        reconnect and whenever a reply says their lease or task is gone."""
        ...

    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...
