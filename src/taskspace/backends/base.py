"""The store contract: the few atomic operations every backend implements.

Every feature of taskspace (tasks, workers, locks, elections, registry,
caches, logs) is written once on top of these protocols. Each method is
**atomic**: it happens entirely or not at all, and no other client observes
it half done (one SQL transaction, one Lua script, one lock-protected update).

Times are the **store's clock** (:meth:`Clock.now`, seconds as a float), never
the caller's, so a client whose wall clock jumps cannot extend or steal a
lease. Durations passed in (``lease_s``, ``ttl``, ``delay``) are relative to
the store clock at the moment the operation runs.

Fencing: every grant of a task lease or a named lease carries a token that
only ever increases (per task and per lease name), so a holder that was
paused past its lease can always be recognised as stale and refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, Self, runtime_checkable

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
    ready_at: float
    attempts: int = 0
    lost: int = 0
    token: int = 0
    worker: str | None = None
    lease_expires: float | None = None
    result: bytes | None = None
    error: ErrorInfo | None = None
    progress: tuple[float, float] | None = None
    cancel_requested: bool = False
    created: float = 0.0
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
    """

    kind: OutcomeKind
    result: bytes | None = None
    error: ErrorInfo | None = None
    delay: float = 0.0


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


@dataclass(frozen=True, slots=True)
class Grant:
    """One slot of a named lease. ``token`` increases with every grant of ``name``."""

    name: str
    holder: str
    token: int
    expires: float


@dataclass(frozen=True, slots=True)
class Versioned:
    """A KV value with its version (increases with every write of the key) and expiry."""

    value: bytes
    version: int
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry; ids increase within a stream and are never reused."""

    id: int
    data: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Message:
    """A message delivered by PubSub."""

    channel: str
    data: bytes
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Clock(Protocol):
    """The store's notion of time; all lease and TTL arithmetic uses it."""

    def now(self) -> float:
        """Seconds on the store clock; never goes backwards for a given store."""
        ...


class QueueStore(Protocol):
    """Durable tasks with leases, fencing, priorities, ETA, dedup and dead-lettering.

    Guarantees: a pushed task is durable once ``push`` returns; a task is held
    by at most one unexpired lease at a time; a finish with a stale lease
    changes nothing and is counted; every task ends in a final state.
    """

    def push(self, specs: Sequence[TaskSpec]) -> list[str]:
        """Enqueue ``specs`` in one atomic step; return the id of each task.

        A spec whose ``dedup_key`` matches a live (queued or running) task is
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
    ) -> list[TaskRecord]:
        """Lease up to ``n`` ready tasks: earlier queues first, then higher
        priority, then FIFO. Each claim increments ``attempts``, gets a fresh
        fencing token and a lease of the task's ``lease_s``.

        ``names``: only tasks with one of these names are leased (a worker
        claims only what it can run, so several apps share a space); tasks of
        other names stay queued, in order, and cost a claim little however
        many there are. None: any name.

        A repeat of a ``request_id`` (after an error that may have hidden a
        reply) returns what the first call leased instead of leasing more,
        and a request id the store has seen before never leases anything new
        (a late duplicate of a claim leases nothing); backends whose replies
        cannot be lost may ignore it."""
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
        lease is still the task's current one and the task is running. A
        refused item changes nothing and increments ``stale_finishes``."""
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
        passed since they finished, and expired KV entries (with their index
        entries); return how many were deleted. Safe to run concurrently."""
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
    """Named resources with ``capacity`` slots, each grant fenced by a token.

    Guarantees: at most ``capacity`` unexpired grants per name; the token of a
    grant is larger than every earlier grant's token for that name, even
    across releases and expiries.
    """

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        """Grant ``holder`` a slot for ``ttl`` seconds, or None if all are taken.
        A holder that already holds a live slot gets it renewed (same token)."""
        ...

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        """Extend a grant still held with the same token; None if it was lost."""
        ...

    def release(self, grant: Grant) -> bool:
        """Give up a grant; False if it was no longer held."""
        ...

    def holders(self, name: str) -> list[Grant]:
        """Unexpired grants of ``name``, oldest token first."""
        ...


class KVStore(Protocol):
    """Versioned key-value pairs with optional TTL.

    Guarantees: ``version`` strictly increases with every write of a key,
    also across delete and re-create, so compare-and-set never suffers ABA;
    an expired key behaves exactly like a missing one.
    """

    def kv_get(self, key: str) -> Versioned | None:
        """The live value of ``key``, or None."""
        ...

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        """Write unconditionally; return the new version."""
        ...

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        """Write only if the live version is ``expected_version`` (None: the key
        must be absent); return the new version, or None if it did not match."""
        ...

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        """Add ``delta`` to an integer value (absent: 0); return the result.
        ``ttl`` applies only when the key is created."""
        ...

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        """Delete ``key`` (only at ``expected_version`` if given); True if deleted."""
        ...

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        """Live pairs whose key starts with ``prefix``, in key order."""
        ...


class StreamStore(Protocol):
    """Append-only streams; ids increase within a stream and are never reused."""

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        """Append one entry and return its id; keep at most ``maxlen`` newest."""
        ...

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        """Entries with id greater than ``after``, oldest first."""
        ...

    def trim(self, stream: str, maxlen: int) -> int:
        """Drop the oldest entries beyond ``maxlen``; return how many were dropped."""
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


class Subscription(Protocol):
    """A live subscription; messages published after it was made are delivered."""

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds.

        Raises :class:`~taskspace.errors.SubscriptionLost` when the connection
        behind the subscription was lost: messages may have been missed, and
        the caller must re-sync from the store. The subscription resubscribes
        by itself; the next ``get`` delivers what is published after that
        (or raises BackendError while the backend is still away)."""
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
    overflow), so no correctness may depend on delivery; wake-ups and
    invalidations must fall back to polling."""

    def publish(self, channel: str, data: bytes) -> None:
        """Send ``data`` to current subscribers of ``channel``."""
        ...

    def subscribe(self, channels: Sequence[str]) -> Subscription:
        """Subscribe to ``channels``."""
        ...


class Store(QueueStore, LeaseStore, KVStore, StreamStore, PubSub, Clock, Protocol):
    """A backend: all five protocols and the clock, on one connection target."""

    url: str

    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...
