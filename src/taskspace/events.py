"""Task events: every transition of every task, on the stream ``taskspace/events``.

Kinds (``KINDS``): ``submitted`` (a push wrote the task), ``started`` (a
worker began an attempt), ``retried`` (an attempt failed and the task went
back to its queue), ``lost`` (the attempt's lease expired: its worker died or
stalled; the maintainer requeued it), ``succeeded``, ``failed``, ``dead`` (a
lease expired with no attempts left), ``cancelled``, ``requeued`` (a failed
or dead task retried by hand: ``Handle.retry``, the API, the CLI) and
``usage`` (what a task recorded with ``current_task().record(...)``).

Who writes them: :meth:`Space.push` (``submitted``, one batch per push
chunk), the worker (``started`` and every finish the store *accepted*: a
refused, stale finish has no event), the elected maintainer (``lost``,
``dead`` and ``cancelled`` after a lease expired), the Space of a hand-made
change (``cancelled`` of a queued task, ``requeued``) and ``usage`` from tasks.

Cost and delivery: producers hand events to a :class:`Shipper`, which
appends them from a background thread in batches: one
``store.streams.append_many`` of **one stream entry per batch** (a JSON
array of up to EVENT_BATCH_MAX events), at most SHIP_INTERVAL_S after the
event; the transition itself never waits for it. All events of one entry
share its stream id (``TaskEvent.id``): a cursor (``after=``) moves from
entry to entry, and a read never splits an entry, so it may return up to
EVENT_BATCH_MAX - 1 events more than its ``limit``. The events are therefore
written *after* their transition, in a separate store call, on every
backend: a process killed in between loses at most the last
SHIP_INTERVAL_S of its events (the tasks themselves are never affected). A
shipper that cannot reach the backend keeps at most ``capacity`` events
(SHIP_CAPACITY), drops the oldest beyond that and logs how many.

Retention: each producer trims the stream to EVENTS_MAXLEN entries (of at
most EVENT_BATCH_MAX events each) on an append at least every TRIM_EVERY_S
(so it holds at most EVENTS_MAXLEN entries plus what was appended in the last
TRIM_EVERY_S), and the elected maintainer drops entries older than
EVENTS_MAX_AGE_S (``worker.maintainer``).

Order: the stream holds events in the order they were appended. One
producer appends its events in order, but events of one task from two
producers (the Space that submitted it, the workers that ran it, the
maintainer) can be out of order by up to about SHIP_INTERVAL_S: a
``submitted`` may follow its ``started``. Each event's ``time`` is the
moment of its transition; order a task's events by it.

Reading: :class:`Events` (``space.events``) reads, follows and finds the
last id; entries that are not valid events are skipped.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import orjson

from taskspace.backends.base import RETRYABLE_STATES
from taskspace.errors import ConfigError, SpaceLost

if TYPE_CHECKING:
    from taskspace.backends.base import Store, StreamEntry, TaskRecord, TaskSpec
    from taskspace.space import Space

log = logging.getLogger("taskspace.events")
T = TypeVar("T")

EVENTS_STREAM = "taskspace/events"
KINDS = (
    "submitted",
    "started",
    "retried",
    "lost",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
    "requeued",
    "usage",
)
EVENTS_MAXLEN = 20_000  # entries (batches)
EVENT_BATCH_MAX = 500  # events per entry
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0
SHIP_INTERVAL_S = 0.1
SHIP_BATCH_MAX = 1000
SHIP_CAPACITY = 100_000
TRIM_EVERY_S = 1.0
CLOSE_TIMEOUT_S = 1.0
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0
READ_PAGE = 1000
FOLLOW_WAIT_S = 1.0
MAX_STREAM_ID = 2**63 - 1
# kind -> (the states a hand-made change leaves, the state it enters)
HAND_MADE = {"cancelled": (("queued",), "cancelled"), "requeued": (RETRYABLE_STATES, "queued")}
USAGE_KEYS = ("tokens_in", "tokens_out", "cost_usd", "model")


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One transition of one task (see the module docstring for the kinds).

    ``id`` is the stream id (0 for an event not yet stored); ``time`` is the
    wall clock of the transition (unix seconds, the producer's clock);
    ``duration`` the attempt's run time in seconds for finished attempts;
    ``error`` the exception type name; ``usage`` is set for kind ``usage``."""

    id: int
    time: float
    kind: str
    task_id: str
    name: str
    queue: str
    worker: str | None
    attempt: int
    duration: float | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (every field, None included)."""
        return {
            "id": self.id,
            "time": self.time,
            "kind": self.kind,
            "task_id": self.task_id,
            "name": self.name,
            "queue": self.queue,
            "worker": self.worker,
            "attempt": self.attempt,
            "duration": self.duration,
            "error": self.error,
            "usage": self.usage,
        }


class Submitted(NamedTuple):
    """A push's ``submitted`` events as one shipped item: the push's time and
    each new task's (id, name, queue); encoded by the shipper's thread."""

    time: float
    tasks: list[tuple[str, str, str]]

    def encode(self) -> bytes:
        """The events' JSON objects, separated by commas."""
        t = self.time
        docs = [
            {"time": t, "kind": "submitted", "task_id": i, "name": n, "queue": q, "attempt": 0}
            for i, n, q in self.tasks
        ]
        return orjson.dumps(docs)[1:-1]


def encode_event(event: TaskEvent | Submitted) -> bytes:
    """The stored form of an event: its JSON object (its ``id`` is ignored
    when read back); Submitted as its events' objects."""
    if isinstance(event, Submitted):
        return event.encode()
    return orjson.dumps(event)


def decode_entry(entry: StreamEntry) -> list[TaskEvent]:
    """The events stored in ``entry`` (a JSON array of events, or one event),
    each with the entry's id; what is not a valid event is skipped."""
    try:
        doc = orjson.loads(entry.data)
    except orjson.JSONDecodeError:
        return []
    docs = doc if isinstance(doc, list) else [doc]
    return [e for e in (_event_of(entry, d) for d in docs) if e is not None]


def decode_event(entry: StreamEntry) -> TaskEvent | None:
    """The first event stored in ``entry``, or None if there is none."""
    events = decode_entry(entry)
    return events[0] if events else None


def _event_of(entry: StreamEntry, doc: Any) -> TaskEvent | None:
    try:
        kind = doc["kind"]
        if kind not in KINDS:
            return None
        return TaskEvent(
            id=entry.id,
            time=float(doc.get("time") or entry.time),
            kind=kind,
            task_id=str(doc["task_id"]),
            name=str(doc.get("name") or ""),
            queue=str(doc.get("queue") or ""),
            worker=doc.get("worker"),
            attempt=int(doc.get("attempt") or 0),
            duration=doc.get("duration"),
            error=doc.get("error"),
            usage=doc.get("usage"),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def event_for(
    kind: str,
    record: TaskRecord,
    worker: str | None,
    *,
    duration: float | None = None,
    error: str | None = None,
    usage: dict[str, Any] | None = None,
    attempt: int | None = None,
    at: float | None = None,
) -> TaskEvent:
    """An event of ``kind`` about the task ``record`` (at wall time ``at``,
    default now; not yet stored)."""
    return TaskEvent(
        0, time.time() if at is None else at, kind, record.id, record.name, record.queue, worker,
        record.attempts if attempt is None else attempt, duration, error, usage,
    )  # fmt: skip


def encode_batch(items: Sequence[TaskEvent | Submitted]) -> bytes:
    """Events in their stored form as one entry: a JSON array (runs of
    TaskEvents are encoded with one orjson call)."""
    parts: list[bytes] = []
    run: list[TaskEvent] = []
    for item in items:
        if isinstance(item, Submitted):
            if run:
                parts.append(orjson.dumps(run)[1:-1])
                run = []
            parts.append(item.encode())
        else:
            run.append(item)
    if run:
        parts.append(orjson.dumps(run)[1:-1])
    return b"[" + b",".join(parts) + b"]"


def encoded_submitted(specs: Sequence[TaskSpec], ids: Sequence[str]) -> Submitted | None:
    """The ``submitted`` events of a push as one item (encoded later, in the
    shipper's thread, with one orjson call); None if there are none."""
    if len(specs) == 1:  # the common single submit, without the loop
        spec = specs[0]
        if ids and ids[0] == spec.id:
            return Submitted(time.time(), [(spec.id, spec.name, spec.queue)])
        return None
    tasks = [
        (spec.id, spec.name, spec.queue)
        for spec, task_id in zip(specs, ids, strict=False)
        if task_id == spec.id
    ]
    return Submitted(time.time(), tasks) if tasks else None


def submitted_events(specs: Sequence[TaskSpec], ids: Sequence[str]) -> list[TaskEvent]:
    """``submitted`` events for a push: one per spec that made a new task (a
    spec deduplicated onto a live task returned another id and has none)."""
    now = time.time()
    return [
        TaskEvent(0, now, "submitted", spec.id, spec.name, spec.queue, None, 0)
        for spec, task_id in zip(specs, ids, strict=False)
        if task_id == spec.id
    ]


def check_usage(
    tokens_in: Any = None, tokens_out: Any = None, cost_usd: Any = None, model: Any = None
) -> dict[str, Any]:
    """The usage dict for ``current_task().record(...)``: the given values only.
    ConfigError naming the argument for a negative or non-numeric count or
    cost, a model that is not a non-empty string, or no value at all."""
    usage: dict[str, Any] = {}
    for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        usage[name] = value
    if cost_usd is not None:
        if (
            isinstance(cost_usd, bool)
            or not isinstance(cost_usd, int | float)
            or not (0 <= cost_usd < float("inf"))
        ):
            raise ConfigError(f"cost_usd must be a finite number >= 0, got {cost_usd!r}")
        usage["cost_usd"] = float(cost_usd)
    if model is not None:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string, got {model!r}")
        usage["model"] = model
    if not usage:
        raise ConfigError("record() needs at least one of tokens_in, tokens_out, cost_usd, model")
    return usage


# -- shipping ----------------------------------------------------------------------------

_shippers: weakref.WeakSet[Shipper[Any]] = weakref.WeakSet()
# Threads that ship: log records they emit are never shipped (taskspace.logs skips them).
SHIPPER_THREADS: set[int] = set()


class Shipper(Generic[T]):
    """Appends items to one stream in batches from a background thread.

    ``put`` never blocks on the backend and never raises: it adds the item to
    a buffer of at most ``capacity`` items (beyond that the oldest buffered
    item is dropped and counted in ``dropped``). The thread (started on the
    first ``put``) appends up to ``batch_max`` items per
    ``store.streams.append_many`` call, at most ``interval`` seconds after
    they were put, retrying a failed batch with the same request id (no
    duplicates after a lost reply) and backing off while the backend is
    down; it never dies of an exception. ``encode`` turns an item into bytes
    in that thread; ``observe`` is called in the caller's thread for each item
    put. ``on_recovered(n)`` is called from the thread after a successful
    append when ``n`` items were dropped since the last call. ``flush`` and
    ``close`` are bounded by their timeouts. Forked children get an empty
    shipper of their own. ``pack``: each batch is stored as one entry,
    ``pack(batch)`` (if it raises, the JSON array of each item's ``encode``,
    leaving out the items that cannot be encoded).
    """

    def __init__(
        self,
        store: Callable[[], Store],
        stream: str,
        encode: Callable[[T], bytes],
        *,
        maxlen: int | None,
        capacity: int = SHIP_CAPACITY,
        batch_max: int = SHIP_BATCH_MAX,
        interval: float = SHIP_INTERVAL_S,
        name: str = "taskspace-shipper",
        on_recovered: Callable[[int], None] | None = None,
        pack: Callable[[list[T]], bytes] | None = None,
    ) -> None:
        for label, value in (("capacity", capacity), ("batch_max", batch_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{label} must be an integer >= 1, got {value!r}")
        if maxlen is not None and (
            isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1
        ):
            raise ConfigError(f"maxlen must be an integer >= 1 or None, got {maxlen!r}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError(f"interval must be a positive number of seconds, got {interval!r}")
        self._store = store
        self.stream = stream
        self._encode = encode
        self.maxlen = maxlen
        self.capacity = capacity
        self.batch_max = batch_max
        self.interval = float(interval)
        self.name = name
        self.on_recovered = on_recovered
        self.pack = pack
        self.observers: list[Callable[[T], None]] = []
        self.dropped = 0  # items dropped since the shipper was made
        self.shipped = 0
        self._init_state()
        _shippers.add(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition()
        self._buf: deque[T] = deque()
        self._inflight = 0
        self._put_seq = 0  # items put
        self._done_seq = 0  # items stored or dropped
        self._unreported = 0  # dropped, not yet passed to on_recovered
        self._next_trim = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def put(self, item: T) -> None:
        """Buffer ``item`` for the next batch (see the class docstring)."""
        if self.observers:
            self.put_many((item,))
            return
        with self._cond:  # put_many's path for one item, without its loops (the hot path)
            if self._closed:
                return
            self._put_seq += 1
            if len(self._buf) + self._inflight >= self.capacity:
                self._drop_for(item)
            else:
                self._buf.append(item)
            if self._thread is None:
                self._start_thread()
            elif len(self._buf) >= self.batch_max:
                self._cond.notify_all()

    def _drop_for(self, item: T) -> None:
        """The buffer is full: drop the oldest buffered item for ``item`` (or
        ``item`` itself when everything is in flight). Holds the lock."""
        if self._buf:
            self._buf.popleft()
            self._buf.append(item)
        self._done_seq += 1
        self.dropped += 1
        self._unreported += 1

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def put_many(self, items: Iterable[T]) -> None:
        """Buffer every item of ``items`` (see the class docstring)."""
        if not isinstance(items, list | tuple):
            items = list(items)
        for observe in self.observers:
            for item in items:
                try:
                    observe(item)
                except Exception:  # an observer's bug must never reach a producer
                    log.exception("event observer failed")
        with self._cond:
            if self._closed:
                return
            for item in items:
                self._put_seq += 1
                if len(self._buf) + self._inflight >= self.capacity:
                    self._drop_for(item)
                else:
                    self._buf.append(item)
            if self._thread is None:
                self._start_thread()
            elif len(self._buf) >= self.batch_max:
                self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Items of the batch being appended now (kept until it is stored: a
        full buffer drops its oldest *waiting* item, never these)."""
        with self._cond:
            return self._inflight

    def pending(self) -> int:
        """Items put but neither stored nor dropped yet."""
        with self._cond:
            return self._put_seq - self._done_seq

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every item put before this call is stored (or dropped),
        at most ``timeout`` seconds; True if it is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._put_seq
            self._cond.notify_all()
            while self._done_seq < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> int:
        """Ship what is buffered (at most ``timeout`` seconds), then stop; later
        puts are ignored. Returns how many items were left unshipped."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            left = self._put_seq - self._done_seq
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=0.2)
        return left

    def _after_fork(self) -> None:
        self._init_state()

    def _take(self) -> list[T] | None:
        """The next batch (waiting up to ``interval`` for one to fill); None: stop."""
        with self._cond:
            if not self._buf and not self._closed:
                self._cond.wait(self.interval)
            if len(self._buf) < self.batch_max and not self._closed:
                self._cond.wait(self.interval / 2)  # let a burst fill the batch
            if not self._buf:
                return None if self._closed else []
            n = min(self.batch_max, len(self._buf))
            batch = [self._buf.popleft() for _ in range(n)]
            self._inflight = n
            return batch

    def _run(self) -> None:
        SHIPPER_THREADS.add(threading.get_ident())
        try:
            while (batch := self._take()) is not None:
                if batch:
                    self._ship(batch)
        finally:
            SHIPPER_THREADS.discard(threading.get_ident())

    def _encode_all(self, batch: list[T]) -> list[bytes]:
        data = []
        for item in batch:
            try:
                data.append(self._encode(item))
            except Exception:  # an unencodable item is dropped, never retried
                log.exception("%s: dropping an item that cannot be encoded", self.name)
        return data

    def _pack_all(self, batch: list[T]) -> list[bytes]:
        assert self.pack is not None
        try:
            return [self.pack(batch)]
        except Exception:  # noqa: BLE001 - one bad item: encode one by one, leaving it out
            data = self._encode_all(batch)
            return [b"[" + b",".join(data) + b"]"] if data else []

    def _ship(self, batch: list[T]) -> None:
        """Append one batch, retrying (same request id) until it is stored,
        the space is lost or the shipper is closed."""
        data = self._encode_all(batch) if self.pack is None else self._pack_all(batch)
        stored_items = len(batch) if self.pack is not None and data else len(data)
        request = os.urandom(8).hex()
        delay = BACKOFF_START_S
        failing = False
        stored = False
        while data:
            try:
                self._append(data, request)
                stored = True
                break
            except SpaceLost as exc:
                log.error("%s: space lost, dropping %d items: %s", self.name, len(data), exc)
                break
            except Exception as exc:  # noqa: BLE001 - backend down: retry, never die
                if not failing:
                    failing = True
                    log.warning(
                        "%s: cannot append to %s, buffering (%s: %s)",
                        self.name, self.stream, type(exc).__name__, exc,
                    )  # fmt: skip
                with self._cond:
                    if self._closed:
                        break
                    self._cond.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        with self._cond:
            self._inflight = 0
            self._done_seq += len(batch)
            if stored:
                self.shipped += stored_items
            else:
                self.dropped += stored_items
            unreported, self._unreported = self._unreported, 0
            self._cond.notify_all()
        if unreported and stored and self.on_recovered is not None:
            try:
                self.on_recovered(unreported)
            except Exception:
                log.exception("%s: on_recovered failed", self.name)

    def _append(self, data: list[bytes], request: str) -> None:
        now = time.monotonic()
        maxlen = None
        if self.maxlen is not None and now >= self._next_trim:
            maxlen = self.maxlen
        self._store().streams.append_many(self.stream, data, maxlen=maxlen, request_id=request)
        if maxlen is not None:
            self._next_trim = now + TRIM_EVERY_S


def _reset_after_fork() -> None:
    for shipper in list(_shippers):
        shipper._after_fork()
    SHIPPER_THREADS.clear()


def _close_all_at_exit() -> None:
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for shipper in list(_shippers):
        if shipper._pid == os.getpid():
            shipper.close(max(0.0, deadline - time.monotonic()))


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_close_all_at_exit)


def event_shipper(
    store: Callable[[], Store], name: str = "taskspace-events"
) -> Shipper[TaskEvent | Submitted]:
    """A shipper of TaskEvents to EVENTS_STREAM (trimmed to EVENTS_MAXLEN)."""

    def recovered(n: int) -> None:
        log.warning("%s: dropped %d task events while the backend was unreachable", name, n)

    return Shipper(store, EVENTS_STREAM, encode_event, maxlen=EVENTS_MAXLEN, name=name,
                   on_recovered=recovered, batch_max=EVENT_BATCH_MAX,
                   pack=encode_batch)  # fmt: skip


def trim_events(store: Store, max_age: float = EVENTS_MAX_AGE_S) -> int:
    """Drop events older than ``max_age`` seconds and beyond EVENTS_MAXLEN; how many."""
    return store.streams.trim(EVENTS_STREAM, maxlen=EVENTS_MAXLEN, max_age=max_age)


# -- reading -----------------------------------------------------------------------------


def last_stream_id(store: Store, stream: str) -> int:
    """The id of the newest entry of ``stream`` (0 if empty), by a binary
    search on ``read(after=..., limit=1)``: about 64 small reads at most,
    whatever the stream's length or the backend's id scheme."""
    reads = store.streams
    first = reads.read(stream, after=0, limit=1)
    if not first:
        return 0
    low = first[0].id  # an id that exists
    step = 1
    while True:  # gallop to a bound: no entry has an id above `high`
        probe = low + step
        if probe >= MAX_STREAM_ID:
            high = MAX_STREAM_ID
            break
        found = reads.read(stream, after=probe, limit=1)
        if not found:
            high = probe
            break
        low = found[0].id
        step *= 4
    # Invariant: an entry with id `low` exists; none has an id above `high`.
    while low < high:
        mid = (low + high + 1) // 2
        found = reads.read(stream, after=mid - 1, limit=1)  # the first entry >= mid
        if found:
            low = found[0].id
        else:
            high = mid - 1
    return low


def first_id_since(store: Store, stream: str, since: float) -> int:
    """An ``after`` cursor from which entries appended at or after wall time
    ``since`` start (0: from the beginning), by a binary search on entry times
    (append times increase with ids, up to the skew between producers' clocks;
    callers filter exactly)."""
    reads = store.streams
    first = reads.read(stream, after=0, limit=1)
    if not first or first[0].time >= since:
        return 0
    low = first[0].id  # an entry older than since
    high = last_stream_id(store, stream)
    while high - low > 1:
        mid = (low + high) // 2
        found = reads.read(stream, after=mid, limit=1)
        if not found:
            high = mid
            continue
        if found[0].time < since:
            low = found[0].id
        else:
            high = mid
    return low


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def _check_wait(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (0 <= value < float("inf"))
    ):
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


class Events:
    """The space's task events (``space.events``): read, follow, and the
    Space's own shipper of ``submitted`` events.

    Reads go to the store at once and raise BackendError while it is down;
    ``follow`` blocks in steps of at most FOLLOW_WAIT_S and never forever on
    a down backend (it raises BackendError). ConfigError for bad arguments.
    """

    def __init__(self, space: Space) -> None:
        self.space = space
        self._shipper: Shipper[TaskEvent | Submitted] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def shipper(self) -> Shipper[TaskEvent | Submitted]:
        """The shipper of events this Space produces (made on first use)."""
        if self._shipper is None:
            with self._lock:
                if self._shipper is None:
                    self._shipper = event_shipper(lambda: self.space.store, "taskspace-events")
        return self._shipper

    def emit(self, events: Sequence[TaskEvent]) -> None:
        """Append ``events`` (batched in the background; see the module docstring)."""
        if events:
            self.shipper.put_many(events)

    def submitted(self, specs: Sequence[TaskSpec], ids: Sequence[str]) -> None:
        """Record ``submitted`` for a push's new tasks (Space.push calls it)."""
        item = encoded_submitted(specs, ids)
        if item is not None:
            (self._shipper or self.shipper).put(item)

    def by_hand(self, kind: str, before: TaskRecord | None, after: str | None) -> None:
        """Record a change made by hand: ``cancelled`` when a cancel found the
        task queued (a running task's cancel is recorded by its worker), or
        ``requeued`` when a retry found it failed or dead. ``before`` is the
        task as read just before the call, ``after`` the state the call
        returned; nothing is recorded unless the call made that change (a
        repeated cancel or retry records nothing; two racing calls may both
        record it)."""
        leaves, enters = HAND_MADE[kind]
        if before is not None and before.state in leaves and after == enters:
            error = "TaskCancelled" if kind == "cancelled" else None
            self.emit([event_for(kind, before, None, error=error, attempt=0)])

    def read(self, after: int = 0, limit: int = 100, wait: float = 0.0) -> list[TaskEvent]:
        """Events with id above ``after``, oldest first: at most ``limit``
        (1..10,000), except that the events of one stored batch (one id) are
        never split, so the last batch may add up to EVENT_BATCH_MAX - 1
        more; pass the last event's id as ``after`` for the next page. With
        ``wait`` > 0 and none there, block up to ``wait`` seconds for one."""
        _check_int("after", after, 0)
        _check_int("limit", limit, 1, 10_000)
        wait = _check_wait("wait", wait)
        deadline = time.monotonic() + wait
        streams = self.space.store.streams
        events: list[TaskEvent] = []
        while len(events) < limit:
            left = max(0.0, deadline - time.monotonic()) if not events else 0.0
            wanted = min(limit - len(events), READ_PAGE)  # an entry holds one event or more
            entries = streams.read(EVENTS_STREAM, after=after, limit=wanted, wait=left)
            for entry in entries:
                events += decode_entry(entry)
                after = entry.id
            if len(entries) < wanted and (events or time.monotonic() >= deadline):
                break  # the end of the stream (or the wait is over)
        return events

    def follow(self, after: int | None = None) -> Iterator[TaskEvent]:
        """Every event with id above ``after`` (None: only events appended after
        this call) as they come, until :meth:`close` or the caller stops iterating."""
        if after is None:
            after = self.last_id()
        _check_int("after", after, 0)
        return self._follow(after)

    def _follow(self, after: int) -> Iterator[TaskEvent]:
        while not self._closed.is_set():
            entries = self.space.store.streams.read(EVENTS_STREAM, after=after, limit=READ_PAGE,
                                                    wait=FOLLOW_WAIT_S)  # fmt: skip
            for entry in entries:
                after = entry.id
                yield from decode_entry(entry)

    def last_id(self) -> int:
        """The id of the newest event (0 if there is none)."""
        return last_stream_id(self.space.store, EVENTS_STREAM)

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait up to ``timeout`` seconds for this Space's emitted events to be stored."""
        return self._shipper.flush(timeout) if self._shipper is not None else True

    def close(self) -> None:
        """Ship what is buffered (at most CLOSE_TIMEOUT_S) and end followers."""
        self._closed.set()
        shipper = self._shipper
        if shipper is not None:
            left = shipper.close(CLOSE_TIMEOUT_S)
            if left:
                log.warning("%d task events not stored at close (backend unreachable)", left)
