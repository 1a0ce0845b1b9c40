"""Durable streams with consumer groups (``space.stream``): Kafka/RabbitMQ-style
messaging written once on ``store.streams`` and ``store.kv``.

::

    events = space.stream("events", maxlen=100_000)
    events.publish({"doc": 1})                        # -> id
    events.publish_many([{"doc": 2}, {"doc": 3}])     # -> ids
    consumer = events.group("indexers").consumer("c1")
    for msg in consumer:                              # blocks; Ctrl-C to stop
        index(msg.data)
        msg.ack()

**Publishing.** A message is any JSON value (SerializationError otherwise,
PayloadTooLarge above the Space's ``max_payload``); it is durable once
``publish`` returns. A publish that fails with BackendError is retried for
PUBLISH_RETRY_S with the same request id, so a retry after a lost reply never
appends twice (on Redis, PostgreSQL and memory; a SQLite reply cannot be lost).

**Groups.** Every group sees every message; within a group each message is
handed to one consumer at a time (the claim is a compare on the group cursor's
KV version in one ``kv.txn``, a batch of up to ``prefetch`` messages per txn).
A message not acked within ``visibility`` seconds of being handed out (a
batch is leased for LEASE_FACTOR x ``visibility`` and renewed before a hand-out
that would leave less than ``visibility``; so redelivery comes between
``visibility`` and twice that after the hand-out) is redelivered, to any
consumer of the group, with ``deliveries`` + 1; one
whose ``deliveries`` reached ``max_deliveries`` goes to the dead-letter
stream ``<name>.dead`` instead (with the original id, data, group, deliveries
and last consumer). Delivery is at-least-once: a consumer that dies, or acks
after its visibility ran out, may see a message delivered twice. Acks are
written in batches: with the next claim (same txn), before a consumer
blocks, on ``flush()`` and ``close()``, and at once (by ``ack()`` or the next
hand-out) when their batch's lease ends within ``visibility``: an ack is
written before its lease ends if the consumer makes any call within
``visibility`` after it. Dead letters are appended only by the consumer whose
takeover txn won (never twice, never for a message acked before it).

A group is created by its first consumer at ``start``: ``"latest"`` (only
messages published from now on; the default), ``"earliest"`` (everything
the stream still holds) or an id (messages with id >= it).

**Retention** (storage stays bounded):

- the stream: ``maxlen`` newest entries, enforced by every publish of a
  Stream opened with it; ``max_age`` seconds, enforced by ``trim()`` (call it
  from a periodic task or maintenance; it also applies ``maxlen``);
- the dead-letter stream: ``dead_maxlen`` newest entries (10,000);
- group state in KV (key prefix ``taskspace/streams/``): one cursor record
  per group and one pending record per claimed batch (deleted when the batch
  is acked or dead-lettered, so at most unacked/prefetch per consumer); every
  record has a TTL of ``group_ttl`` (7 days; a nacked message's record
  ``group_ttl`` + its delay), renewed while a consumer claims, blocks, hands
  out or acks, so a group nobody consumed for that long is forgotten
  (recreated at ``start`` by its next consumer; a cursor that vanished while
  the group has pending records or under a consumer that knew it is
  recovered at the last position known, never silently moved to ``start``);
  ``group.delete()`` removes one at once; one dead-letter marker per
  takeover that dead-letters, deleted once appended;
- one ``meta`` record per stream (the trim watermark, the smallest maxlen).

**Falling behind retention is never silent.** When entries a group had not
taken yet were trimmed, its consumers raise :class:`StreamCompacted` (a
:class:`~taskspace.errors.Compacted`) with ``first_id``, the first id still
held; ``consumer.skip_to_earliest()`` continues from there. Ids are not dense,
so when the entry at the group's position itself was trimmed while no
consumer of the group ran, and the stream has ever been trimmed by
``maxlen``, the group cannot prove it missed nothing and is told so too. A
group created on an empty stream checks before its first claim that nothing
after its position was trimmed (the stream must hold fewer than ``maxlen``
entries, and no age trim may have passed it).
Pending (delivered, unacked) messages trimmed before their redelivery go to
the dead-letter stream with ``reason="trimmed"`` and ``data`` None.

**Faults.** Every call may raise BackendError while the store is down (a
publish after its retries; a consumer at once: nothing it held is lost, its
batch is redelivered after ``visibility``). Bad arguments raise ConfigError
naming them, and nothing is written. A Consumer is used by one thread at a time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import orjson

from taskspace.backends.base import (
    MAX_DURATION_S,
    Compare,
    Delete,
    Put,
    TxnResult,
    ValueIs,
    VersionIs,
    Write,
)
from taskspace.backends.checks import check_limit, check_seconds
from taskspace.codec import JSON
from taskspace.errors import BackendError, Compacted, ConfigError, SerializationError, SpaceLost

if TYPE_CHECKING:
    from taskspace.backends.base import StreamEntry, Versioned
    from taskspace.space import Space

log = logging.getLogger("taskspace.streams")

DEFAULT_VISIBILITY_S = 30.0
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_PREFETCH = 10
MAX_BATCH = 1000
READ_LIMIT_MAX = 10_000
DEAD_SUFFIX = ".dead"
DEFAULT_DEAD_MAXLEN = 10_000
DEFAULT_GROUP_TTL_S = 7 * 24 * 3600.0
# The smallest group_ttl accepted (a module constant so tests can shorten it).
MIN_GROUP_TTL_S = 60.0
# A claimed batch is leased for this many times ``visibility``; a message is
# handed out only while at least ``visibility`` of its batch's lease is left
# (else the lease is renewed first), so each handed-out message has a full
# ``visibility``, and a batch is renewed at most once per ``visibility``.
LEASE_FACTOR = 2.0
PUBLISH_RETRY_S = 10.0
PUBLISH_BACKOFF_S = 0.05
# The consumer's estimate of the store's lease clock is re-measured this often.
CLOCK_REFRESH_S = 5.0
# Pending records are scanned for expired ones at least this often.
SCAN_MAX_S = 1.0
# A blocking read of the stream lasts at most this long before re-checking.
WAIT_STEP_S = 5.0
# Records one redelivery scan reads at most.
SCAN_RECORDS_MAX = 5000
CLAIM_ATTEMPTS = 50
# A claim reads this many batches ahead: one lost to another consumer is
# followed by a claim of the next without another read.
LOOKAHEAD = 2
KEY_ROOT = "taskspace/streams/"
_max = max


def _q(name: str) -> str:
    return quote(name, safe="")


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}={value!r}: must be a non-empty string")
    return value


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what}={value!r}: must be an integer from {low} to {high}")
    return value


def _check_timeout(timeout: float | None) -> float:
    """``timeout`` as seconds (None: forever)."""
    if timeout is None:
        return math.inf
    check_seconds(timeout, "timeout")
    return float(timeout)


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One entry read back from a stream (``Stream.read``): ``id``, the decoded
    ``data`` and ``time`` (wall clock of the publish, epoch seconds)."""

    id: int
    data: Any
    time: float


class StreamCompacted(Compacted):
    """Entries a group had not taken yet were trimmed by retention. ``first_id``
    is the first id the stream still holds (None: it is empty); the group's
    position is ``position``. ``consumer.skip_to_earliest()`` continues there.
    (``revision``/``compacted`` of Compacted hold ``first_id`` or 0 and the
    position.)"""

    def __init__(self, stream: str, group: str, position: int, first_id: int | None) -> None:
        super().__init__(
            f"group {group!r} of stream {stream!r} fell behind retention: entries after id"
            f" {position} were trimmed; the first id held is {first_id}"
            " (consumer.skip_to_earliest() continues there)",
            first_id or 0,
            position,
        )
        self.stream = stream
        self.group = group
        self.position = position
        self.first_id = first_id


# Streams whose maxlen trims this process has recorded in their meta record.
_flagged: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_flagged_lock = threading.Lock()


def _loads(data: bytes) -> Any:
    return orjson.loads(data)


class Stream:
    """A named durable stream of JSON messages (see the module docstring).

    ``maxlen``: keep at most this many newest entries (each publish trims);
    ``max_age``: seconds, applied by :meth:`trim`; ``dead_maxlen``: retention
    of the dead-letter stream. Cheap to create (no I/O); ConfigError for a bad
    name or option.
    """

    def __init__(
        self,
        space: Space,
        name: str,
        *,
        maxlen: int | None = None,
        max_age: float | None = None,
        dead_maxlen: int = DEFAULT_DEAD_MAXLEN,
    ) -> None:
        self.space = space
        self.name = _check_name(name, "name")
        if maxlen is not None:
            _check_int(maxlen, "maxlen", 1, 2**62)
        check_seconds(max_age, "max_age", minimum=1e-3, optional=True)
        _check_int(dead_maxlen, "dead_maxlen", 1, 2**62)
        self.maxlen = maxlen
        self.max_age = max_age
        self.dead_maxlen = dead_maxlen
        self._codec = JSON.limited(space.max_payload)
        self.meta_key = f"{KEY_ROOT}{_q(name)}/meta"

    def __repr__(self) -> str:
        return f"<Stream {self.name!r} maxlen={self.maxlen} max_age={self.max_age}>"

    # -- publishing -------------------------------------------------------------

    def publish(self, obj: Any) -> int:
        """Append one JSON value; return its id (durable once returned)."""
        return self.publish_many([obj])[0]

    def publish_many(self, objs: Sequence[Any]) -> list[int]:
        """Append JSON values in order in one atomic step; return their ids.
        Every value is encoded before anything is written (SerializationError
        names the bad one). A BackendError is retried for PUBLISH_RETRY_S with
        the same request id (no double append), then raised."""
        if isinstance(objs, str | bytes) or not isinstance(objs, Sequence):
            raise ConfigError(f"objs={objs!r}: must be a sequence (list) of JSON values")
        items = [self._codec.encode(obj, f"message {i}") for i, obj in enumerate(objs)]
        return self._append(self.name, items, self.maxlen)

    def _append(self, stream: str, items: list[bytes], maxlen: int | None) -> list[int]:
        if not items:
            return []
        if maxlen is not None:
            self._flag_maxlen(stream, maxlen)
        streams = self.space.store.streams
        request_id = uuid.uuid4().hex
        deadline = time.monotonic() + PUBLISH_RETRY_S
        delay = PUBLISH_BACKOFF_S
        while True:
            try:
                return streams.append_many(stream, items, maxlen, request_id=request_id)
            except BackendError as exc:
                if isinstance(exc, SpaceLost) or time.monotonic() + delay > deadline:
                    raise
                log.warning("publish to %r failed, retrying in %.2f s: %s", stream, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _flag_maxlen(self, stream: str, maxlen: int) -> None:
        """Record once in the stream's meta that maxlen trims (whose dropped ids
        nobody sees) happen, and the smallest ``maxlen``: groups then treat a
        missing position as a loss, unless the stream holds fewer entries."""
        store = self.space.store
        flag = f"{stream}\n{maxlen}"
        with _flagged_lock:
            if flag in _flagged.setdefault(store, set()):
                return
        _update_meta(self.space, f"{KEY_ROOT}{_q(stream)}/meta", maxlen=maxlen)
        with _flagged_lock:
            _flagged.setdefault(store, set()).add(flag)

    # -- reading and retention ----------------------------------------------------

    def read(self, from_id: int = 0, limit: int = 100, wait: float = 0.0) -> list[StreamMessage]:
        """Replay: entries with id >= ``from_id``, oldest first, at most
        ``limit`` (1..10,000); page on with ``from_id=last.id + 1``. With
        ``wait`` > 0 and nothing to return, block up to ``wait`` seconds."""
        _check_int(from_id, "from_id", 0, 2**63 - 1)
        _check_int(limit, "limit", 1, READ_LIMIT_MAX)
        check_seconds(wait, "wait")
        rows = self.space.store.streams.read(self.name, max(0, from_id - 1), limit, wait)
        return [StreamMessage(r.id, self._decode(r), r.time) for r in rows]

    def _decode(self, entry: StreamEntry) -> Any:
        try:
            return _loads(entry.data)
        except orjson.JSONDecodeError:
            raise SerializationError(
                f"entry {entry.id} of stream {self.name!r} is not JSON"
            ) from None

    def first_id(self) -> int | None:
        """The oldest id the stream holds, or None if it is empty."""
        rows = self.space.store.streams.read(self.name, 0, 1)
        return rows[0].id if rows else None

    def last_id(self) -> int:
        """The newest id the stream holds (0 if empty): a binary search over
        ids, about 50 reads of one entry (ids are not dense)."""
        streams = self.space.store.streams
        first = streams.read(self.name, 0, 1)
        if not first:
            return 0
        lo, hi = first[0].id, 2**53  # lo holds; nothing above hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rows = streams.read(self.name, mid - 1, 1)
            if rows:
                lo = rows[0].id
                if lo >= hi:  # pragma: no cover - appended meanwhile above hi
                    hi = lo + 1
            else:
                hi = mid
        return lo

    def trim(self) -> int:
        """Apply the retention: drop entries beyond ``maxlen`` and older than
        ``max_age`` seconds; return how many were dropped. Age trims record the
        last dropped id first (so groups tell a trimmed position from a loss)."""
        streams = self.space.store.streams
        dropped = 0
        if self.maxlen is not None:
            self._flag_maxlen(self.name, self.maxlen)
            dropped += streams.trim(self.name, maxlen=self.maxlen)
        if self.max_age is not None:
            dropped += self._trim_age(self.max_age)
        return dropped

    def _trim_age(self, max_age: float) -> int:
        streams = self.space.store.streams
        cutoff = self.space.store.clock.wall() - max_age
        last_old, after = 0, 0
        while True:
            rows = streams.read(self.name, after, 1000)
            old = [r for r in rows if r.time < cutoff]
            if old:
                last_old = old[-1].id
            if len(old) < len(rows) or len(rows) < 1000:
                break
            after = rows[-1].id
        if not last_old:
            return 0
        _update_meta(self.space, self.meta_key, trimmed=last_old)
        return streams.trim(self.name, min_id=last_old + 1)

    # -- groups -------------------------------------------------------------------

    @property
    def dead(self) -> Stream:
        """The dead-letter stream ``<name>.dead`` (entries: ``id``, ``group``,
        ``consumer``, ``deliveries``, ``reason``, ``data``, ``time``)."""
        return Stream(self.space, self.name + DEAD_SUFFIX, maxlen=self.dead_maxlen)

    def group(
        self,
        name: str,
        *,
        start: str | int = "latest",
        visibility: float = DEFAULT_VISIBILITY_S,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        group_ttl: float = DEFAULT_GROUP_TTL_S,
    ) -> Group:
        """A consumer group (created by its first consumer at ``start``); give
        every consumer of a group the same options."""
        return Group(self, name, start=start, visibility=visibility,
                     max_deliveries=max_deliveries, group_ttl=group_ttl)  # fmt: skip

    def groups(self) -> list[str]:
        """Names of the groups of this stream that have a cursor record."""
        prefix = f"{KEY_ROOT}{_q(self.name)}/g/"
        out: list[str] = []
        after: str | None = None
        while page := self.space.store.kv.scan(prefix, after_key=after, limit=1000):
            for key, _ in page:
                group, _, rest = key[len(prefix) :].partition("/")
                if rest == "cursor":
                    out.append(unquote(group))
            after = page[-1][0]
        return out


def _update_meta(space: Space, key: str, **changes: Any) -> None:
    """Merge ``changes`` into a stream's meta record (``trimmed`` only grows)."""
    kv = space.store.kv
    for _ in range(CLAIM_ATTEMPTS):
        found = kv.get(key)
        meta = _loads(found.value) if found is not None else {}
        new = dict(meta)
        if "trimmed" in changes:
            new["trimmed"] = max(int(meta.get("trimmed", 0)), int(changes["trimmed"]))
        if changes.get("maxlen"):
            old = meta.get("maxlen")
            m = int(changes["maxlen"])
            new["maxlen"] = min(old, m) if isinstance(old, int) and not isinstance(old, bool) else m
        if new == meta and found is not None:
            return
        if kv.cas(key, None if found is None else found.version, orjson.dumps(new)) is not None:
            return
    raise BackendError(f"could not update {key!r}: too much contention")


@dataclass(slots=True)
class _Cursor:
    """A group's position: entries > ``pos`` are new; ``next`` the first id
    above ``pos`` when it was set (0: none yet); ``anch``: ``pos`` was an entry."""

    pos: int
    next: int
    anch: bool
    version: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps({"pos": self.pos, "next": self.next, "anch": self.anch})


def _cursor(found: Versioned) -> _Cursor:
    c = _loads(found.value)
    return _Cursor(int(c["pos"]), int(c["next"]), bool(c["anch"]), found.version)


class Group:
    """A consumer group of a stream (see the module docstring). ``visibility``
    (seconds) is how long a handed-out message stays leased to its consumer;
    ``max_deliveries`` (>= 1) how often it is delivered before it is
    dead-lettered; ``group_ttl`` the retention of an unused group's records."""

    def __init__(
        self,
        stream: Stream,
        name: str,
        *,
        start: str | int = "latest",
        visibility: float = DEFAULT_VISIBILITY_S,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        group_ttl: float = DEFAULT_GROUP_TTL_S,
    ) -> None:
        self.stream = stream
        self.name = _check_name(name, "group")
        _check_start(start)
        check_seconds(visibility, "visibility", minimum=0.05)
        _check_int(max_deliveries, "max_deliveries", 1, 1_000_000)
        check_seconds(group_ttl, "group_ttl", minimum=MIN_GROUP_TTL_S)
        if group_ttl < 2 * visibility:
            raise ConfigError(f"group_ttl={group_ttl!r}: must be at least twice visibility")
        self.start = start
        self.visibility = float(visibility)
        self.max_deliveries = max_deliveries
        self.group_ttl = float(group_ttl)
        self.prefix = f"{KEY_ROOT}{_q(stream.name)}/g/{_q(name)}/"
        self.cursor_key = self.prefix + "cursor"
        self.pending_prefix = self.prefix + "p/"
        self.dead_prefix = self.prefix + "dl/"

    def __repr__(self) -> str:
        return f"<Group {self.name!r} of {self.stream.name!r}>"

    def consumer(self, name: str | None = None, *, prefetch: int = DEFAULT_PREFETCH) -> Consumer:
        """A consumer of this group named ``name`` (default: host-pid-random);
        ``prefetch`` (1..1000) messages are claimed per store transaction."""
        return Consumer(self, name, prefetch=prefetch)

    def pending(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Delivered, unacked messages (at most ``limit``): ``id``, ``consumer``,
        ``deliveries`` and ``until`` (lease clock)."""
        check_limit(limit)
        out: list[dict[str, Any]] = []
        for _key, _found, rec in self._records(limit):
            for i, d in zip(rec["i"], rec["d"], strict=True):
                out.append({"id": i, "consumer": rec["c"], "deliveries": d, "until": rec["u"]})
        return sorted(out, key=lambda p: p["id"])[:limit]

    def info(self) -> dict[str, Any]:
        """``position`` (last id taken, None before the group exists) and
        ``pending`` (count of delivered, unacked messages)."""
        found = self.stream.space.store.kv.get(self.cursor_key)
        pending = sum(len(rec["i"]) for _, _, rec in self._records(SCAN_RECORDS_MAX))
        return {"position": None if found is None else _cursor(found).pos, "pending": pending}

    def _records(self, limit: int) -> Iterator[tuple[str, Versioned, dict[str, Any]]]:
        kv = self.stream.space.store.kv
        after: str | None = None
        seen = 0
        while seen < limit and (page := kv.scan(self.pending_prefix, after, min(limit, 1000))):
            for key, found in page:
                yield key, found, _unpack(found.value)
            seen += len(page)
            after = page[-1][0]

    def delete(self) -> int:
        """Forget the group (cursor and pending records); return how many
        records were deleted. New consumers recreate it at ``start``; a
        consumer that was running recovers the position it knew."""
        kv = self.stream.space.store.kv
        n = 0
        while page := kv.scan(self.prefix, limit=1000):
            for key, _ in page:
                n += kv.delete(key)
        return n

    # -- cursor -------------------------------------------------------------------

    def load_cursor(self, known: int | None = None) -> _Cursor:
        """The group's cursor, creating the group at ``start`` if it has none.
        A group whose cursor vanished (expired after ``group_ttl``, deleted)
        while it still has pending records, or while the caller knew its
        position ``known``, is not recreated at ``start`` (that would skip
        messages): it is recovered, with a warning, after the highest id known
        to be taken (at-least-once: what others took after it comes again)."""
        kv = self.stream.space.store.kv
        for _ in range(CLAIM_ATTEMPTS):
            found = kv.get(self.cursor_key)
            if found is not None:
                return _cursor(found)
            taken = [max(rec["i"]) for _, _, rec in self._records(SCAN_RECORDS_MAX) if rec["i"]]
            recover = known is not None or bool(taken)
            if recover:
                pos = _max([known or 0, *taken])
                cur = self.initial_cursor(pos + 1)
            else:
                cur = self.initial_cursor(self.start)
            put = kv.cas(self.cursor_key, None, cur.encode(), ttl=self.group_ttl)
            if put is not None:
                if recover:
                    log.warning("group %r of stream %r had lost its cursor (group_ttl %.0f s"
                                " passed?): recovered after id %d", self.name, self.stream.name,
                                self.group_ttl, cur.pos)  # fmt: skip
                cur.version = put.version
                return cur
        raise BackendError(f"could not create group {self.name!r}: too much contention")

    def initial_cursor(self, start: str | int) -> _Cursor:
        """Where a group starting at ``start`` stands now."""
        stream = self.stream
        if start == "latest":
            last = stream.last_id()
            if last:
                return _Cursor(last, 0, True)
            return _Cursor(self._trimmed(), 0, False)  # empty: before the next id appended
        pos = 0 if start == "earliest" else int(start) - 1
        rows = stream.space.store.streams.read(stream.name, max(0, pos), 1)
        if start == "earliest":
            pos = rows[0].id - 1 if rows else self._trimmed()
        return _Cursor(max(0, pos), rows[0].id if rows else 0, False)

    def _trimmed(self) -> int:
        """The last id age trims dropped (0: none): on an empty stream, every
        id appended later is above it."""
        found = self.stream.space.store.kv.get(self.stream.meta_key)
        return int(_loads(found.value).get("trimmed", 0)) if found is not None else 0


def _check_start(start: Any) -> None:
    if start in ("latest", "earliest"):
        return
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ConfigError(f"start={start!r}: must be 'latest', 'earliest' or an id >= 1")


@dataclass(slots=True, eq=False)
class _Batch:
    """A pending record this consumer holds: ``ids`` as last written (with
    their ``deliveries``), ``acked`` not yet written, ``until`` its lease."""

    key: str
    version: int | None
    ids: list[int]
    deliveries: list[int]
    until: float
    acked: set[int] = field(default_factory=set)
    lost: bool = False

    def remaining(self) -> tuple[list[int], list[int]]:
        keep = [
            (i, d) for i, d in zip(self.ids, self.deliveries, strict=True) if i not in self.acked
        ]
        return [i for i, _ in keep], [d for _, d in keep]


def _record(consumer: str, until: float, ids: Sequence[int], deliveries: Sequence[int]) -> bytes:
    """A pending record: consumer ``c`` ("" for none), lease end ``u`` (lease
    clock), the first id ``f`` and the gaps ``g`` to each next one (ids of a
    batch are close: a few digits each instead of sixteen), deliveries ``d``
    (one number when all are equal)."""
    ds = list(deliveries)
    d: int | list[int] = ds[0] if ds and ds.count(ds[0]) == len(ds) else ds
    gaps = [b - a for a, b in pairwise(ids)]
    return orjson.dumps({"c": consumer, "u": until, "f": ids[0] if ids else 0, "g": gaps, "d": d})


def _unpack(data: bytes) -> dict[str, Any]:
    """A pending record with its ids (``i``) and deliveries (``d``) as lists."""
    rec: dict[str, Any] = orjson.loads(data)
    ids = list(accumulate(rec["g"], initial=rec["f"]))
    d = rec["d"]
    rec["i"], rec["d"] = ids, d if isinstance(d, list) else [d] * len(ids)
    return rec


class Message:
    """A message handed to a consumer: ``id``, ``data`` (the JSON value),
    ``time`` (publish wall clock), ``deliveries`` (1 on the first delivery).
    ``ack()`` it once handled; ``nack(delay)`` hands it back for redelivery."""

    __slots__ = ("_batch", "_consumer", "data", "deliveries", "id", "time")

    def __init__(self, entry: StreamEntry, data: Any, deliveries: int, batch: _Batch,
                 consumer: Consumer) -> None:  # fmt: skip
        self.id = entry.id
        self.data = data
        self.time = entry.time
        self.deliveries = deliveries
        self._batch = batch
        self._consumer = consumer

    def __repr__(self) -> str:
        return f"<Message {self.id} deliveries={self.deliveries} data={self.data!r}>"

    def ack(self) -> None:
        """Mark handled; written with the consumer's next store call (or
        ``flush``), at once when its batch's lease ends within ``visibility``
        (a BackendError then is logged and the write retried by the next call).
        Idempotent. A message whose lease was taken over meanwhile
        is acked in its new holder's record at once."""
        if self._batch.lost:
            self._consumer._ack_foreign(self._batch.key, {self.id})
        elif self.id not in self._batch.acked:
            self._batch.acked.add(self.id)
            self._consumer._acked(self._batch)

    def nack(self, delay: float = 0.0) -> None:
        """Hand the message back: redelivered (to any consumer of the group)
        after ``delay`` seconds, or dead-lettered if its deliveries are spent."""
        self._consumer._nack(self, delay)


class Consumer:
    """One consumer of a group (see the module docstring). Not thread-safe:
    use it from one thread (or one asyncio task) at a time."""

    def __init__(self, group: Group, name: str | None = None, *,
                 prefetch: int = DEFAULT_PREFETCH) -> None:  # fmt: skip
        self.group = group
        self.name = (
            _check_name(name, "consumer")
            if name is not None
            else f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.prefetch = _check_int(prefetch, "prefetch", 1, MAX_BATCH)
        self._space = group.stream.space
        self._stream = group.stream.name
        self._buffer: deque[Message] = deque()
        self._batches: dict[str, _Batch] = {}
        self._cursor: _Cursor | None = None
        self._ahead: list[StreamEntry] = []  # entries read after the cursor, not claimed
        self._at_end = False  # the last claim read to the end of the stream
        self._competing = False  # the last claim lost a race first
        self._offset: float | None = None  # store lease clock - time.monotonic()
        self._offset_at = -math.inf
        self._next_scan = -math.inf
        self._touched_at = time.monotonic()
        self._known: int | None = None  # the highest group position this consumer saw
        self._closed = False
        self.conflicts = 0  # claims that lost a race (and were retried)

    def __repr__(self) -> str:
        return f"<Consumer {self.name!r} of {self.group!r}>"

    # -- public -------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds (None: wait forever)."""
        got = self.fetch(1, timeout)
        return got[0] if got else None

    def fetch(self, max: int = 100, timeout: float | None = 0.0) -> list[Message]:
        """Up to ``max`` (1..1000) messages; waits up to ``timeout`` seconds
        (None: forever) for the first. Raises StreamCompacted if the group fell
        behind retention, BackendError if the store is down."""
        _check_int(max, "max", 1, MAX_BATCH)
        deadline = time.monotonic() + _check_timeout(timeout)
        if self._closed:
            raise ConfigError(f"consumer {self.name!r} is closed")
        while True:
            out = self._take(max)
            if out:
                return out
            if not self._fill(_max(self.prefetch, max), deadline):
                return []

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.get(None)
            if msg is not None:
                yield msg

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            msg = await asyncio.to_thread(self.get, 1.0)
            if msg is not None:
                yield msg

    def flush(self) -> None:
        """Write the acks made so far (one txn)."""
        self._flush_acks()

    def skip_to_earliest(self) -> int | None:
        """After StreamCompacted: move the group to the first id the stream
        holds (everything before it is gone); return it (None: empty stream,
        the group then waits for new messages)."""
        g = self.group
        kv = self._space.store.kv
        for _ in range(CLAIM_ATTEMPTS):
            cur = g.load_cursor(self._known)
            new = g.initial_cursor("earliest")
            if new.next == 0:
                new = g.initial_cursor("latest")
            if kv.cas(g.cursor_key, cur.version, new.encode(), ttl=g.group_ttl) is not None:
                self._cursor, self._ahead, self._at_end = None, [], False
                return new.next or None
        raise BackendError("could not move the group: too much contention")

    def close(self) -> None:
        """Write pending acks and hand back the prefetched messages not yet
        handed out (not counted as a delivery). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_acks()
            self._release_buffer()
        except BackendError as exc:
            log.warning("closing consumer %r: %s (its messages are redelivered)", self.name, exc)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- clock ------------------------------------------------------------------

    def _now(self) -> float:
        """The store's lease clock, estimated from a measurement every CLOCK_REFRESH_S."""
        mono = time.monotonic()
        if self._offset is None or mono - self._offset_at > CLOCK_REFRESH_S:
            before = time.monotonic()
            now = self._space.store.clock.now()
            after = time.monotonic()
            self._offset, self._offset_at = now - (before + after) / 2, after
            mono = after
        return mono + self._offset

    # -- handing out ----------------------------------------------------------------

    def _take(self, n: int) -> list[Message]:
        """Up to ``n`` buffered messages, extending the lease of their batches
        (and writing their acks) when less than ``visibility`` is left, so each
        message handed out has a full ``visibility`` (dropping a batch that
        another consumer took over meanwhile); acks of other batches whose
        lease ends within ``visibility`` are written too."""
        buf = self._buffer
        taken = [buf.popleft() for _ in range(min(n, len(buf)))]
        if not taken:
            return taken
        renew_before = self._now() + self.group.visibility
        batches = {id(m._batch): m._batch for m in taken}
        for batch in batches.values():
            if not batch.lost and batch.until < renew_before:
                self._renew(batch)
        self._flush_due()
        self._keep_group_alive()
        if any(b.lost for b in batches.values()):
            return [m for m in taken if not m._batch.lost]
        return taken

    def _renew(self, batch: _Batch) -> None:
        """Extend ``batch``'s lease (and write its acks) or mark it lost."""
        until = self._now() + self.group.visibility * LEASE_FACTOR
        ids, ds = batch.remaining()
        if not ids:
            return
        put = Put(batch.key, _record(self.name, until, ids, ds), self.group.group_ttl)
        res = self._space.store.kv.txn([VersionIs(batch.key, batch.version)], [put])
        if res.ok:
            batch.ids, batch.deliveries, batch.acked = ids, ds, set()
            batch.version, batch.until = res.versions[0], until
        else:
            self._lose(batch)

    def _flush_due(self) -> None:
        """Write the acks now if a batch holding some ends its lease within
        ``visibility`` (so an ack is written before its lease ends)."""
        if not self._batches:
            return
        due = self._now() + self.group.visibility
        if any(b.acked and b.until < due for b in self._batches.values()):
            self._flush_acks()

    def _acked(self, batch: _Batch) -> None:
        """After an ack into ``batch``: written at once when its lease ends
        within ``visibility`` (a BackendError is logged; the ack stays queued
        and is written by the next call)."""
        try:
            if batch.until < self._now() + self.group.visibility:
                self._flush_acks()
        except BackendError as exc:
            log.warning("writing acks of consumer %r: %s (retried with its next call)",
                        self.name, exc)  # fmt: skip

    def _lose(self, batch: _Batch) -> None:
        """``batch`` was taken over: its acks are written into whoever holds it now."""
        batch.lost = True
        self._batches.pop(batch.key, None)
        if batch.acked:
            self._ack_foreign(batch.key, batch.acked)

    def _ack_foreign(self, key: str, acked: set[int]) -> None:
        kv = self._space.store.kv
        for _ in range(5):
            found = kv.get(key)
            if found is None:
                return
            rec = _unpack(found.value)
            keep = [(i, d) for i, d in zip(rec["i"], rec["d"], strict=True) if i not in acked]
            if len(keep) == len(rec["i"]):
                return
            if keep:
                value = _record(rec["c"], rec["u"], [i for i, _ in keep], [d for _, d in keep])
                write: Write = Put(key, value, self.group.group_ttl)
            else:
                write = Delete(key)
            if kv.txn([VersionIs(key, found.version)], [write]).ok:
                return

    # -- filling the buffer -----------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> bool:
        """Claim messages into the buffer; False once ``deadline`` passed with none."""
        while True:
            if time.monotonic() >= self._next_scan:
                self._redeliver(n)
                if self._buffer:
                    return True
            cur = self._claim_new(n, will_block=deadline > time.monotonic())
            if self._buffer:
                return True
            left = min(deadline, self._next_scan) - time.monotonic()
            if deadline - time.monotonic() <= 0:
                self._flush_acks()
                return False
            self._flush_acks()
            self._keep_group_alive()
            if left > 0:
                self._space.store.streams.read(self._stream, cur.pos, 1, min(left, WAIT_STEP_S))

    def _keep_group_alive(self) -> None:
        """Renew the TTL of the group's cursor (at most every group_ttl/10):
        called while blocked, handing out and writing acks, so a busy consumer
        keeps its group alive. A vanished cursor is reloaded (and recovered)
        by the next claim."""
        if time.monotonic() - self._touched_at > self.group.group_ttl / 10:
            if self._space.store.kv.touch(self.group.cursor_key, self.group.group_ttl) is None:
                self._cursor, self._ahead = None, []
            self._touched_at = time.monotonic()

    def _ack_ops(self) -> list[tuple[_Batch, Write]]:
        """The writes that record the acks made so far, one per batch: its
        record without the acked ids, or its deletion once all are acked. Each
        goes with a compare on the batch's version (a record taken over by
        another consumer is not overwritten)."""
        ops: list[tuple[_Batch, Write]] = []
        ttl = self.group.group_ttl
        for batch in self._batches.values():
            if not batch.acked:
                continue
            ids, ds = batch.remaining()
            if ids:
                ops.append((batch, Put(batch.key, _record(self.name, batch.until, ids, ds), ttl)))
            else:
                ops.append((batch, Delete(batch.key)))
        return ops

    def _applied(self, ops: list[tuple[_Batch, Write]], versions: Iterator[int]) -> None:
        """Record in memory that the ack writes ``ops`` were applied; ``versions``
        yields the new version of each of their Puts in order."""
        for batch, write in ops:
            if isinstance(write, Delete):
                self._batches.pop(batch.key, None)
                batch.acked, batch.ids, batch.deliveries = set(), [], []
            else:
                batch.ids, batch.deliveries = batch.remaining()
                batch.acked = set()
                batch.version = next(versions)

    def _flush_acks(self) -> None:
        for _ in range(CLAIM_ATTEMPTS):
            ops = self._ack_ops()
            if not ops:
                return
            compares = [VersionIs(b.key, b.version) for b, _ in ops]
            res = self._space.store.kv.txn(compares, [w for _, w in ops])
            if res.ok:
                self._applied(ops, iter(res.versions))
                self._keep_group_alive()
                return
            if res.failed is not None:
                self._lose(ops[res.failed][0])

    def _claim_new(self, n: int, will_block: bool = False) -> _Cursor:
        """Claim up to ``n`` new messages into the buffer (writing the acks made
        so far in the same txn); return the cursor the claim was based on.

        The claim compares the cursor's value (positions only grow, so a value
        never comes back). A claim that lost the race guesses that the winner
        took the same rows and claims after them: no extra read of the cursor
        unless the guess is wrong too. The record of a batch acked in full is
        reused for the new batch (one write instead of a delete and a put).
        After CLAIM_ATTEMPTS races lost (others took everything meanwhile) it
        returns with nothing. When the previous claim read to the end of the
        stream and the caller will block next (``will_block``), it returns at
        once: the blocking read wakes on anything new, and the claim after it
        checks the position again."""
        at_end, self._at_end = self._at_end, False
        if at_end and will_block and self._cursor is not None:
            return self._cursor  # the last claim read to the end: the blocking read tells
        fallback = self._skip_ahead(n)
        guessed = False
        lost = 0
        rows: list[StreamEntry] = []
        short = False
        for _ in range(CLAIM_ATTEMPTS):
            cur = self._cursor if self._cursor is not None else self._load_cursor()
            self._cursor = cur
            if not (rows and cur.next and rows[0].id == cur.next):
                ahead = self._ahead
                known = ahead and cur.next and ahead[0].id == cur.next
                rows = ahead if known else self._rows_after(cur, LOOKAHEAD * n + 1)
                short = not known and len(rows) < LOOKAHEAD * n + 1
            self._ahead = []
            if not rows and fallback is None:
                return cur
            res = None
            if rows:
                take, rest = rows[:n], rows[n:]
                new = _Cursor(take[-1].id, rest[0].id if rest else 0, True)
                res, owners, batch = self._claim_txn(cur, new, take)
                if len(rest) < n:
                    rest = []  # a partial batch: read afresh rather than claim a small one
            if res is not None and res.ok:
                self._cursor, self._ahead = new, rest
                self._known = _max(self._known or 0, new.pos)
                self._at_end = short and len(rows) <= n
                self._competing = lost > 0 or fallback is not None
                self._buffer_entries(take, batch)
                return new
            self.conflicts += 1
            if fallback is not None:  # the skip-ahead guess was wrong: the real position
                (self._cursor, rows), fallback = fallback, None
                self._competing = False
            elif res is not None and res.failed == 0:  # lost: the winner took `take`?
                lost += 1
                # (nothing after the guess: read the cursor rather than wait on a guess)
                self._cursor, rows = (None, []) if guessed or not rest else (new, rest)
                guessed = not guessed
            elif res is not None and res.failed is not None:
                self._lose(owners[res.failed])
        # Every attempt lost to other consumers of the group, which made progress:
        # nothing for this one now (the caller tries again until its timeout).
        return self._cursor if self._cursor is not None else self._load_cursor()

    def _load_cursor(self) -> _Cursor:
        cur = self.group.load_cursor(self._known)
        self._known = _max(self._known or 0, cur.pos)
        return cur

    def _skip_ahead(self, n: int) -> tuple[_Cursor, list[StreamEntry]] | None:
        """While other consumers keep taking the batch after ours (our last
        claim lost a race first), first try the batch after that: set the
        cursor to where their claim of the batch read ahead would leave it, and
        return the real cursor and rows to fall back on."""
        ahead, cur = self._ahead, self._cursor
        if not self._competing or cur is None or len(ahead) <= n:
            return None
        self._cursor, self._ahead = _Cursor(ahead[n - 1].id, ahead[n].id, True), []
        return cur, ahead

    def _claim_txn(
        self, cur: _Cursor, new: _Cursor, take: list[StreamEntry]
    ) -> tuple[TxnResult, list[_Batch], _Batch]:
        """One txn: move the cursor from ``cur`` to ``new``, lease ``take`` to
        this consumer and write the acks made so far. Returns the result, the
        batch of each compare after the first, and the new batch."""
        g = self.group
        ops = self._ack_ops()
        reuse = next((b for b, w in ops if isinstance(w, Delete)), None)
        if reuse is not None:
            ops = [(b, w) for b, w in ops if b is not reuse]
            key = reuse.key
        else:
            key = f"{g.pending_prefix}{take[0].id:020d}.{uuid.uuid4().hex[:8]}"
        owners = [b for b, _ in ops] if reuse is None else [reuse, *(b for b, _ in ops)]
        until = self._now() + g.visibility * LEASE_FACTOR
        ids = [r.id for r in take]
        record = _record(self.name, until, ids, [1] * len(ids))
        compares: list[Compare] = [ValueIs(g.cursor_key, cur.encode())]
        compares += [VersionIs(b.key, b.version) for b in owners]
        writes: list[Write] = [Put(g.cursor_key, new.encode(), g.group_ttl),
                               Put(key, record, g.group_ttl), *(w for _, w in ops)]  # fmt: skip
        res = self._space.store.kv.txn(compares, writes)
        batch = _Batch(key, None, ids, [1] * len(ids), until)
        if res.ok:
            versions = iter(res.versions)
            new.version = next(versions)
            batch.version = next(versions)
            if reuse is not None:
                reuse.acked, reuse.ids, reuse.deliveries = set(), [], []
            self._applied(ops, versions)
            self._batches[key] = batch
        return res, [batch, *owners], batch  # owners[i]: the batch of compare i (0: the cursor)

    def _buffer_entries(self, entries: Sequence[StreamEntry], batch: _Batch) -> None:
        ds = batch.deliveries
        by_id = None if all(d == ds[0] for d in ds) else dict(zip(batch.ids, ds, strict=True))
        append, loads = self._buffer.append, orjson.loads
        for entry in entries:
            try:
                data = loads(entry.data)
            except orjson.JSONDecodeError:
                data = entry.data.decode(errors="replace")
            d = ds[0] if by_id is None else by_id[entry.id]
            append(Message(entry, data, d, batch, self))

    def _rows_after(self, cur: _Cursor, limit: int) -> list[StreamEntry]:
        """Up to ``limit`` entries after the cursor, checking that nothing the
        group had not taken was trimmed."""
        streams = self._space.store.streams
        if cur.next:
            rows = streams.read(self._stream, cur.pos, limit)
            if rows and rows[0].id == cur.next:
                return rows
            return self._suspect(cur, rows, definite=True)
        if cur.anch:
            rows = streams.read(self._stream, cur.pos - 1, limit + 1)
            if rows and rows[0].id == cur.pos:
                return rows[1:]
            return self._suspect(cur, rows, definite=False)
        rows = streams.read(self._stream, cur.pos, limit)
        if rows and not self._nothing_trimmed_after(cur.pos):
            return self._suspect(cur, rows, definite=True)
        return rows

    def _nothing_trimmed_after(self, pos: int) -> bool:
        """For a cursor that was never an entry and had no next (its group was
        created on an empty stream, or at an id past its end): True if no entry
        above ``pos`` can have been trimmed. An entry <= ``pos`` still held
        proves it (trims drop the oldest first); else the age watermark must be
        <= ``pos``, and a stream trimmed by ``maxlen`` must hold fewer than
        ``maxlen`` entries (counted once, before the group's first claim)."""
        streams = self._space.store.streams
        first = streams.read(self._stream, 0, 1)
        if first and first[0].id <= pos:
            return True
        found = self._space.store.kv.get(self.group.stream.meta_key)
        meta = _loads(found.value) if found is not None else {}
        if int(meta.get("trimmed", 0)) > pos:
            return False
        maxlen = meta.get("maxlen")
        if not maxlen:
            return True
        if isinstance(maxlen, bool):  # an older meta record: the bound is unknown
            return False
        count, after = 0, pos
        while count < maxlen:
            page = streams.read(self._stream, after, min(READ_LIMIT_MAX, maxlen - count))
            if not page:
                return True
            count, after = count + len(page), page[-1].id
        return False

    def _suspect(self, cur: _Cursor, rows: list[StreamEntry], definite: bool) -> list[StreamEntry]:
        """The entry that should follow (or be at) the cursor is gone. Raise
        StreamCompacted if entries the group had not taken may be lost; else
        return ``rows`` (the position itself was trimmed, nothing after it)."""
        kv = self._space.store.kv
        found = kv.get(self.group.cursor_key)
        if found is None or found.value != cur.encode():
            self._cursor = None  # stale: another consumer moved on
            return []
        if not definite:
            meta_found = kv.get(self.group.stream.meta_key)
            meta = _loads(meta_found.value) if meta_found is not None else {}
            if not meta.get("maxlen") and int(meta.get("trimmed", 0)) <= cur.pos:
                return rows
        first = _first_id(rows, self._space, self._stream)
        raise StreamCompacted(self._stream, self.group.name, cur.pos, first)

    # -- redelivery -------------------------------------------------------------------

    def _redeliver(self, n: int) -> None:
        """Take over expired pending records of the group (up to about ``n``
        messages), dead-lettering what exhausted its deliveries."""
        g = self.group
        self._flush_acks()
        self._next_scan = time.monotonic() + min(SCAN_MAX_S, g.visibility / 4)
        now = self._now()
        self._retry_dead(now)
        buffered = {m._batch.key for m in self._buffer}
        taken = 0
        for key, found, rec in g._records(SCAN_RECORDS_MAX):
            if rec["u"] > now:
                self._next_scan = min(self._next_scan, time.monotonic() + (rec["u"] - now) + 0.01)
                continue
            if key in buffered or taken >= n:
                continue
            mine = self._batches.pop(key, None)
            if mine is not None:  # ours, expired: taken over like anyone's
                mine.lost = True
            taken += self._takeover(key, found, rec)

    def _takeover(self, key: str, found: Versioned, rec: dict[str, Any]) -> int:
        g = self.group
        pairs = list(zip(rec["i"], rec["d"], strict=True))
        entries = self._entries([i for i, _ in pairs])
        dead = [(i, d, "max_deliveries") for i, d in pairs if d >= g.max_deliveries]
        dead += [(i, d, "trimmed") for i, d in pairs if d < g.max_deliveries and i not in entries]
        keep = [(i, d + 1) for i, d in pairs if d < g.max_deliveries and i in entries]
        until = self._now() + g.visibility * LEASE_FACTOR
        ids, ds = [i for i, _ in keep], [d for _, d in keep]
        writes: list[Write] = [
            Put(key, _record(self.name, until, ids, ds), g.group_ttl) if keep else Delete(key)
        ]
        marker, items = "", []
        if dead:  # dead letters are appended only by the winner of the takeover
            items = self._dead_items(rec["c"], dead, entries)
            marker = f"{g.dead_prefix}{key[len(g.pending_prefix) :]}.{found.version}"
            writes.append(Put(marker, _marker(until, items), g.group_ttl))
        res = self._space.store.kv.txn([VersionIs(key, found.version)], writes)
        if not res.ok:
            return 0
        if marker:
            self._append_dead(marker, res.versions[-1], items)
        if not keep:
            return 0
        batch = _Batch(key, res.versions[0], ids, ds, until)
        self._batches[key] = batch
        self._buffer_entries([entries[i] for i in ids], batch)
        return len(ids)

    def _entries(self, ids: Sequence[int]) -> dict[int, StreamEntry]:
        """The entries of ``ids`` the stream still holds (ids of one claimed
        batch: consecutive entries, so a few reads)."""
        if not ids:
            return {}
        want = set(ids)
        hi = max(ids)
        after = min(ids) - 1
        out: dict[int, StreamEntry] = {}
        streams = self._space.store.streams
        while True:
            rows = streams.read(self._stream, after, min(MAX_BATCH, len(want) + 100))
            for row in rows:
                if row.id in want:
                    out[row.id] = row
            if not rows or rows[-1].id >= hi:
                return out
            after = rows[-1].id

    def _dead_items(
        self, consumer: str, dead: list[tuple[int, int, str]], entries: dict[int, StreamEntry]
    ) -> list[bytes]:
        """The dead-letter entries of ``dead`` (id, deliveries, reason)."""
        items = []
        for i, d, reason in sorted(dead):
            entry = entries.get(i)
            env = {"id": i, "group": self.group.name, "consumer": consumer, "deliveries": d,
                   "reason": reason, "time": None if entry is None else entry.time}  # fmt: skip
            data: Any = None
            if entry is not None:
                try:
                    data = orjson.Fragment(entry.data) if _is_json(entry.data) else None
                except orjson.JSONDecodeError:  # pragma: no cover
                    data = None
            items.append(orjson.dumps({**env, "data": data}))
        return items

    def _append_dead(self, marker: str, version: int, items: list[bytes]) -> None:
        """Append ``items`` to the dead-letter stream, then delete the takeover's
        ``marker`` record (which holds them). A consumer that dies in between
        leaves the marker, which a scan appends once its lease ``u`` ended."""
        stream = self.group.stream
        name = stream.name + DEAD_SUFFIX
        stream._flag_maxlen(name, stream.dead_maxlen)
        self._space.store.streams.append_many(
            name, items, stream.dead_maxlen, request_id=f"dead\n{marker}"
        )
        self._space.store.kv.txn([VersionIs(marker, version)], [Delete(marker)])

    def _retry_dead(self, now: float) -> None:
        """Append the dead letters of takeovers whose consumer stopped between
        its takeover and the append (markers whose lease ended)."""
        g = self.group
        kv = self._space.store.kv
        for key, found in kv.scan(g.dead_prefix, limit=100):
            value = _loads(found.value)
            if value["u"] > now:
                continue
            items = [orjson.dumps(item) for item in value["items"]]
            until = now + g.visibility * LEASE_FACTOR
            res = kv.txn(
                [VersionIs(key, found.version)], [Put(key, _marker(until, items), g.group_ttl)]
            )
            if res.ok:
                self._append_dead(key, res.versions[0], items)

    def _nack(self, msg: Message, delay: float) -> None:
        check_seconds(delay, "delay")
        if delay > MAX_DURATION_S:  # pragma: no cover - check_seconds refuses it
            raise ConfigError(f"delay={delay!r}: too long")
        batch = msg._batch
        if batch.lost or msg.id in batch.acked or msg.id not in batch.ids:
            return
        g = self.group
        kv = self._space.store.kv
        ids, ds = batch.remaining()
        d = ds[ids.index(msg.id)]
        rest = [(i, x) for i, x in zip(ids, ds, strict=True) if i != msg.id]
        key = f"{g.pending_prefix}{msg.id:020d}.{uuid.uuid4().hex[:8]}"
        # (kept for at least group_ttl after its redelivery is due)
        ttl = min(g.group_ttl + delay, MAX_DURATION_S)
        back = Put(key, _record("", self._now() + delay, [msg.id], [d]), ttl)
        if rest:
            keep: Write = Put(batch.key, _record(self.name, batch.until, [i for i, _ in rest],
                                                 [x for _, x in rest]), g.group_ttl)  # fmt: skip
        else:
            keep = Delete(batch.key)
        res = kv.txn([VersionIs(batch.key, batch.version)], [keep, back])
        if not res.ok:
            self._lose(batch)
            return
        batch.ids, batch.deliveries = [i for i, _ in rest], [x for _, x in rest]
        batch.acked = set()
        if rest:
            batch.version = res.versions[0]
        else:
            self._batches.pop(batch.key, None)
        self._next_scan = min(self._next_scan, time.monotonic() + delay)

    def _release_buffer(self) -> None:
        """Hand back the prefetched messages not handed out yet: redeliverable
        at once, this claim not counted as a delivery (handed-out, unacked
        ones stay leased until their visibility runs out)."""
        held: dict[str, set[int]] = {}
        for msg in self._buffer:
            if not msg._batch.lost:
                held.setdefault(msg._batch.key, set()).add(msg.id)
        batches = {m._batch.key: m._batch for m in self._buffer}
        self._buffer.clear()
        g = self.group
        for key, back in held.items():
            batch = batches[key]
            ids, ds = batch.remaining()
            keep = [(i, d) for i, d in zip(ids, ds, strict=True) if i not in back]
            gone = [(i, d - 1) for i, d in zip(ids, ds, strict=True) if i in back]
            if not gone:
                continue
            released = _record("", self._now() - 1.0, [i for i, _ in gone], [d for _, d in gone])
            new_key = f"{g.pending_prefix}{gone[0][0]:020d}.{uuid.uuid4().hex[:8]}"
            writes: list[Write] = [Put(new_key, released, g.group_ttl)]
            if keep:
                value = _record(self.name, batch.until, [i for i, _ in keep], [d for _, d in keep])
                writes.append(Put(key, value, g.group_ttl))
            else:
                writes.append(Delete(key))
            self._space.store.kv.txn([VersionIs(key, batch.version)], writes)
            self._batches.pop(key, None)


def _marker(until: float, items: list[bytes]) -> bytes:
    """A dead-letter marker record: lease end ``u`` and the entries to append."""
    return orjson.dumps({"u": until, "items": [orjson.Fragment(i) for i in items]})


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _first_id(rows: list[StreamEntry], space: Space, stream: str) -> int | None:
    """The first id ``stream`` holds (from ``rows`` when they start there)."""
    first = space.store.streams.read(stream, 0, 1)
    return first[0].id if first else (rows[0].id if rows else None)
