"""The KV blackboard of a space (``space.kv``): JSON values, versions, fenced
writes, optimistic updates, transactions and watches.

::

    space.kv.put("report", {"rows": 3})
    space.kv.get("report")                                # {"rows": 3}
    v = space.kv.get_versioned("report").version
    space.kv.cas("report", {"rows": 4}, version=v)        # VersionConflict if it moved
    space.kv.put("report", value, fence=lease)           # LeaseLost once the lease is lost
    space.kv.update("hits", lambda n: n + 1, default=0)  # read-modify-write, retried
    space.kv.txn().require_version("a", v).put("a", 1).delete("b").commit()
    for event in space.kv.watch("jobs/"):                 # every change, in order
        print(event.kind, event.key, event.value)

**Guarantees** (those of ``store.kv``): every write is atomic and gets a new
version, strictly increasing per key and never reused (no ABA across delete
and re-create); an expired key is absent at once.

**Fenced writes.** ``put``/``delete`` with ``fence=lease`` (and a txn with
``require_lease``) are one store transaction that writes only if the
lease's grant is still current on the store (not released, not expired,
same token): a holder whose lease was lost (expired while it was paused,
taken by another holder) can never write, even if it does not know yet. A
fence whose holder already knows it lost the lease (``lease.held`` is False)
is refused without a store call. Either way LeaseLost is raised and nothing
is written.

**Exactly once.** Every conditional write (fenced put/delete, ``update``,
``txn().commit()``) and ``incr`` carries a request id: a BackendError (a
reply lost on the network) is retried with the same id, and the store
returns the first call's result instead of applying it again.

**Values.** JSON by default; ``KV(space, serializer="msgpack")`` stores
msgpack (bytes, timezone-aware datetimes) behind a one-byte tag (0xC1, a
byte msgpack never uses), so a value is never read with the wrong
serializer: each refuses the other's values with SerializationError.
Counters (``incr``) are JSON-only (the store keeps them as decimal text).

**Faults.** BackendError when the store cannot be reached: the write may or
may not have happened (read it back). Keys must be non-empty strings
(ConfigError); values must survive their serializer exactly
(SerializationError, naming the part that would not). Nothing is written
on a refused call. Watches: see :meth:`KV.watch` and
:mod:`taskspace.state.watch`.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from taskspace.backends.base import (
    ChangeKind,
    Compare,
    Delete,
    Exists,
    GrantHeld,
    Put,
    Versioned,
    VersionIs,
    Write,
)
from taskspace.backends.checks import check_seconds, check_ttl
from taskspace.codec import JSON, Codec, get_codec
from taskspace.errors import (
    BackendError,
    ConfigError,
    LeaseLost,
    SerializationError,
    SpaceLost,
    UpdateTimeout,
    VersionConflict,
)
from taskspace.state import watch as feed
from taskspace.state.watch import FeedEvent, Follower

if TYPE_CHECKING:
    from taskspace.coordination.lease import Lease
    from taskspace.space import Space

SCAN_PAGE = 500
RETRY_AFTER_S = 0.05  # a BackendError is retried after this long
SERIALIZERS = ("json", "msgpack")
MSGPACK_TAG = b"\xc1"  # "never used" in the msgpack format: no JSON or msgpack value starts so
UPDATE_TIMEOUT_S = 10.0  # update() gives up (UpdateTimeout) after this long by default
# update() after a lost race: full jitter, uniform(0, min(cap, base * 2**lost)); a
# cap of 10 ms measured best with 8 processes on one key (PostgreSQL: 50 ms took
# twice as long, 5 ms wasted attempts); while the store fails it retries every
# RETRY_AFTER_S.
BACKOFF_BASE_S = 0.001
BACKOFF_CAP_S = 0.01
# watch(since=None) lists its start within this (or its timeout), else BackendError:
WATCH_START_S = 10.0


@dataclass(frozen=True, slots=True)
class Entry:
    """A live value: ``value`` decoded, ``version`` (per key, never reused),
    ``revision`` (the space revision of the write), ``expires`` (store's lease
    clock; None: no TTL)."""

    value: Any
    version: int
    revision: int
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by :meth:`KV.watch`.

    ``kind``: ``put``, ``delete`` or ``expire``; ``value``: the new value
    (decoded) of a put, None otherwise; ``version``: the key's version after
    a put, or the version removed. ``revision``: the change's space revision
    (a txn's changes share one). ``relist=True``: part of a listing (the
    initial one, or the net difference after the feed was compacted); its
    ``revision`` is then a resume stamp (see
    :class:`taskspace.state.watch.FeedEvent`) and a listed removal is always
    ``delete`` (whether it expired is no longer known).
    """

    kind: ChangeKind
    key: str
    value: Any
    version: int
    revision: int
    relist: bool = False


@dataclass(frozen=True, slots=True)
class TxnOutcome:
    """What :meth:`Txn.commit` did. ``ok``: every requirement held and every
    write was applied at ``revision``; ``versions``: each put key's new
    version. Otherwise nothing was written, ``failed`` names the first
    requirement that did not hold (``"require_version('a', 3)"``) and
    ``revision`` is the current revision. Truthy when ``ok``."""

    ok: bool
    revision: int
    versions: dict[str, int] = field(default_factory=dict)
    failed: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def _check_key(key: Any, what: str = "key") -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{what}={key!r}: must be a non-empty string")


def _check_version(version: Any, optional: bool = True) -> None:
    if version is None and optional:
        return
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        none = " or None (absent)" if optional else ""
        raise ConfigError(f"version={version!r}: must be an integer >= 0{none}")


def _check_prefix(prefix: Any) -> None:
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix={prefix!r}: must be a string")


def _check_since(since: Any) -> None:
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ConfigError(f"since={since!r}: must be a revision (an integer >= 0) or None")


class KV:
    """Values in the space's versioned key-value store (``space.kv``: JSON, one
    per Space). ``KV(space, serializer="msgpack")`` makes a msgpack view
    (ConfigError for another serializer; MissingDependency without msgpack).
    ``close()`` ends its open watches (Space.close calls it for ``space.kv``)."""

    def __init__(self, space: Space, serializer: str = "json") -> None:
        if serializer not in SERIALIZERS:
            raise ConfigError(
                f"serializer={serializer!r}: must be one of {', '.join(SERIALIZERS)}"
                " (pickle is refused: a shared store must not run code in its readers)"
            )
        self._space = space
        codec: Codec = JSON if serializer == "json" else get_codec("msgpack")
        self._codec = codec.limited(space.max_payload)
        self._tag = MSGPACK_TAG if serializer == "msgpack" else b""
        self.serializer = serializer
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._watches_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<KV {self._space.url} serializer={self.serializer}>"

    # -- values --------------------------------------------------------------------------

    def _encode(self, key: str, value: Any) -> bytes:
        _check_key(key)
        return self._tag + self._codec.encode(value, f"the value of {key!r}")

    def _decode(self, key: str, data: bytes) -> Any:
        if self._tag:
            if not data.startswith(self._tag):
                raise SerializationError(
                    f"the value of {key!r} is not a msgpack value of the blackboard (written"
                    " with serializer='json', or through store.kv)"
                )
            data = data[len(self._tag) :]
        elif data.startswith(MSGPACK_TAG):
            raise SerializationError(
                f"the value of {key!r} was written with serializer='msgpack':"
                " read it with KV(space, serializer='msgpack')"
            )
        try:
            return self._codec.decode(data)
        except SerializationError as exc:
            raise SerializationError(
                f"the value of {key!r} is not {self.serializer}: {exc}"
            ) from None

    def _entry(self, key: str, found: Versioned) -> Entry:
        return Entry(self._decode(key, found.value), found.version, found.revision, found.expires)

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is absent or expired."""
        found = self.get_versioned(key)
        return default if found is None else found.value

    def get_versioned(self, key: str) -> Entry | None:
        """The value of ``key`` with its version, revision and expiry, or None."""
        _check_key(key)
        found = self._space.store.kv.get(key)
        return None if found is None else self._entry(key, found)

    def scan(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Every live ``(key, value)`` whose key starts with ``prefix``, in key
        order, read page by page (a key written during the scan may or may not
        appear). A value that is not of this view's serializer (written
        through ``store.kv`` directly) raises SerializationError naming its
        key; taskspace's own records under ``taskspace/`` are all JSON."""
        _check_prefix(prefix)
        after: str | None = None
        while True:
            page = self._space.store.kv.scan(prefix, after_key=after, limit=SCAN_PAGE)
            for key, found in page:
                yield key, self._decode(key, found.value)
            if len(page) < SCAN_PAGE:
                return
            after = page[-1][0]

    # -- writes --------------------------------------------------------------------------

    def put(
        self, key: str, value: Any, *, ttl: float | None = None, fence: Lease | None = None
    ) -> int:
        """Write ``value`` (expiring after ``ttl`` seconds; None: never); return
        the new version. With ``fence``: only while that lease is current on
        the store, else LeaseLost and nothing is written."""
        check_ttl(ttl)
        data = self._encode(key, value)
        kv = self._space.store.kv
        if fence is None:
            return kv.put(key, data, ttl=ttl).version
        _check_fence(fence)
        result = _once(lambda rid: kv.txn([GrantHeld(fence.grant)], [Put(key, data, ttl)], rid))
        if not result.ok:
            raise _refused(fence, f"put {key!r}")
        return result.versions[0]

    def cas(self, key: str, value: Any, *, version: int | None, ttl: float | None = None) -> int:
        """Write only if ``key`` is at ``version`` (None: only if absent);
        return the new version, or raise VersionConflict (``.current``: the
        version found, None if absent) and write nothing."""
        check_ttl(ttl)
        _check_version(version)
        data = self._encode(key, value)
        kv = self._space.store.kv
        written = kv.cas(key, version, data, ttl=ttl)
        if written is not None:
            return written.version
        found = kv.get(key)
        current = None if found is None else found.version
        raise VersionConflict(
            f"{key!r} is at version {current}, not {version}: nothing written", current
        )

    def delete(self, key: str, *, fence: Lease | None = None) -> bool:
        """Delete ``key``; True if it existed. With ``fence``: only while that
        lease is current on the store, else LeaseLost and nothing is deleted."""
        _check_key(key)
        kv = self._space.store.kv
        if fence is None:
            return kv.delete(key)
        _check_fence(fence)
        compares: list[Compare] = [GrantHeld(fence.grant), Exists(key)]
        result = _once(lambda rid: kv.txn(compares, [Delete(key)], rid))
        if result.failed == 0:
            raise _refused(fence, f"delete {key!r}")
        return result.ok

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the integer at ``key`` (absent: 0) and return the
        result; NotAnInteger if the value is not an integer (nothing written).
        A BackendError is retried once with the same request id, so a reply
        lost on the network never counts twice. JSON views only (ConfigError
        on msgpack: the store keeps counters as decimal text)."""
        _check_key(key)
        if self._tag:
            raise ConfigError("incr: counters are JSON only; use space.kv.incr (or update)")
        kv = self._space.store.kv
        return _once(lambda rid: kv.incr(key, delta, request_id=rid))

    def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = None,
        ttl: float | None = None,
        timeout: float = UPDATE_TIMEOUT_S,
        fence: Lease | None = None,
    ) -> Any:
        """Atomically replace the value of ``key`` with ``fn(current)`` and
        return the new value; ``fn`` gets ``default`` when the key is absent.

        Optimistic: read, compute, then write only if the key is still at the
        version read (absent: still absent); if another writer got there first,
        back off (full jitter, BACKOFF_BASE_S doubling to BACKOFF_CAP_S) and try
        again with the new value, so ``fn`` may run several times: keep it pure.
        Every write attempt carries a request id, and a BackendError is retried
        with it, so one call is applied exactly once even when a reply is lost.

        ``ttl``: the new value's TTL (None: none; a TTL is not carried over).
        The value is written even if ``fn`` returns it unchanged (a new
        version). ``fence``: each write also requires that lease to be current
        on the store, else LeaseLost and nothing is written.
        ``timeout`` is a promise: past it UpdateTimeout (a VersionConflict and
        a TimeoutError) is raised, or BackendError if the store was failing,
        and the call wrote nothing. An exception from ``fn`` or a new value that
        cannot be encoded (SerializationError) propagates; nothing is written.
        """
        _check_key(key)
        if not callable(fn):
            raise ConfigError(f"fn={fn!r}: must be callable (current value -> new value)")
        check_ttl(ttl)
        check_seconds(timeout, "timeout", minimum=0.0)
        if fence is not None:
            _check_fence(fence)
        kv = self._space.store.kv
        deadline = time.monotonic() + timeout
        lost = 0
        current: int | None = None
        while True:
            try:
                found = kv.get(key)
            except SpaceLost:
                raise
            except BackendError as exc:
                if not _pause(deadline, RETRY_AFTER_S):
                    raise BackendError(
                        f"update {key!r}: the store did not answer within timeout={timeout:g} s;"
                        f" nothing written: {exc}"
                    ) from exc
                continue
            current = None if found is None else found.version
            new = fn(default if found is None else self._decode(key, found.value))
            write = Put(key, self._encode(key, new), ttl)
            if self._attempt(VersionIs(key, current), write, deadline, timeout, fence):
                return new
            delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**lost))
            lost += 1
            if not _pause(deadline, delay):
                raise UpdateTimeout(
                    f"update {key!r}: lost the race to other writers {lost} times within"
                    f" timeout={timeout:g} s (last seen at version {current}); nothing written",
                    current,
                )

    def _attempt(
        self, compare: VersionIs, write: Put, deadline: float, timeout: float, fence: Lease | None
    ) -> bool:
        """One conditional write of ``update`` (fenced: LeaseLost once the lease
        is not current); a BackendError is retried with the same request id
        (at most once applied) until ``deadline``."""
        kv = self._space.store.kv
        compares: list[Compare] = [compare]
        if fence is not None:
            _check_fence(fence)
            compares.append(GrantHeld(fence.grant))
        rid = uuid.uuid4().hex
        while True:
            try:
                result = kv.txn(compares, [write], rid)
                if not result.ok and result.failed == 1 and fence is not None:
                    raise _refused(fence, f"update {write.key!r}")
                return result.ok
            except SpaceLost:
                raise
            except BackendError as exc:
                if not _pause(deadline, RETRY_AFTER_S):
                    raise BackendError(
                        f"update {write.key!r}: the store did not answer within"
                        f" timeout={timeout:g} s; the write may or may not have happened: {exc}"
                    ) from exc

    def txn(self) -> Txn:
        """A transaction builder: requirements, then writes, then ``commit()``;
        see :class:`Txn`."""
        return Txn(self)

    # -- watching ------------------------------------------------------------------------

    def watch(
        self,
        prefix: str = "",
        *,
        since: int | None = None,
        initial: bool = False,
        timeout: float | None = None,
    ) -> Watch:
        """Every change of the keys starting with ``prefix``, in revision order,
        each exactly once: an iterator (and async iterator) of
        :class:`WatchEvent`.

        ``since=None``: the changes after this call (the prefix is listed now,
        so that removals can be reported after a compaction; ``initial=True``
        first yields a ``put`` of every live key: list-then-follow without a
        race). ``since=R``: the changes after revision R (resume from
        ``watch.revision`` of an earlier watch).

        Outages: a BackendError is logged and retried with backoff from the
        same revision, for ever; nothing is repeated or skipped. Compacted
        (the feed dropped changes it had not read): it re-lists and yields the
        net difference (``relist=True``), then follows again: the final state
        of every key is delivered, intermediate values of one key may collapse
        (see :mod:`taskspace.state.watch`). SpaceLost is raised.

        Ending: ``close()`` (from any thread; a blocked ``next`` returns within
        about a second), ``KV.close``/``Space.close``, or ``timeout``: the
        iteration ends after that many seconds without an event, and raises
        BackendError instead if the store was failing then (never ends
        silently on an outage). The call itself lists its start within
        ``timeout`` or WATCH_START_S, whichever is shorter, else BackendError.
        Bad arguments: ConfigError."""
        _check_prefix(prefix)
        _check_since(since)
        check_seconds(timeout, "timeout", minimum=0.0, optional=True)
        if not isinstance(initial, bool):
            raise ConfigError(f"initial={initial!r}: must be True or False")
        if initial and since is not None:
            raise ConfigError("initial=True lists the keys now: it cannot resume from since=")
        watch = Watch(self, prefix, since, initial, timeout)
        with self._watches_lock:
            self._watches.add(watch)
        return watch

    def close(self) -> None:
        """End every open watch of this view (idempotent); the view stays usable."""
        with self._watches_lock:
            watches = list(self._watches)
        for watch in watches:
            watch.close()


class Txn:
    """A transaction on the blackboard: requirements, then writes, applied
    together at one revision if every requirement holds, else not at all::

        outcome = (space.kv.txn()
                   .require_version("a", 3)     # "a" is at version 3
                   .require_absent("b")         # "b" does not exist
                   .put("a", {"n": 1})
                   .delete("c")
                   .commit())
        if not outcome.ok:
            print(outcome.failed)               # "require_version('a', 3)"

    Each method returns the builder (chain them, or call them one by one).
    Bad input is refused at the call that gives it (ConfigError,
    SerializationError for a value), so a commit never writes half a txn. A
    key may be written once per txn. ``require_lease(lease)`` fences the
    whole txn: commit raises LeaseLost (nothing written) if the lease is no
    longer current on the store. ``commit`` may be called once; a
    BackendError is retried once with the same request id (a lost reply is
    never applied twice), then raised: the txn may or may not have happened.
    """

    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self._compares: list[Compare] = []
        self._described: list[str] = []
        self._writes: list[Write] = []
        self._written: set[str] = set()
        self._fence: Lease | None = None
        self._committed = False

    def __repr__(self) -> str:
        return f"<Txn requires={self._described} writes={len(self._writes)}>"

    def _open(self) -> None:
        if self._committed:
            raise ConfigError("this txn was already committed: build a new one with kv.txn()")

    def _require(self, compare: Compare, described: str) -> Self:
        self._open()
        self._compares.append(compare)
        self._described.append(described)
        return self

    def require_version(self, key: str, version: int | None) -> Self:
        """``key`` is at ``version`` (None: absent)."""
        _check_key(key)
        _check_version(version)
        return self._require(VersionIs(key, version), f"require_version({key!r}, {version!r})")

    def require_absent(self, key: str) -> Self:
        """``key`` does not exist (absent or expired)."""
        _check_key(key)
        return self._require(Exists(key, False), f"require_absent({key!r})")

    def require_exists(self, key: str) -> Self:
        """``key`` exists (at any version)."""
        _check_key(key)
        return self._require(Exists(key, True), f"require_exists({key!r})")

    def require_lease(self, lease: Lease) -> Self:
        """Fence the txn with ``lease``: it applies only while the lease's grant is
        current on the store (else commit raises LeaseLost). One lease per txn."""
        _check_fence(lease)
        if self._fence is not None:
            raise ConfigError("require_lease: this txn is already fenced by a lease")
        self._require(GrantHeld(lease.grant), f"require_lease({lease.name!r})")
        self._fence = lease
        return self

    def _write(self, key: str, write: Write) -> Self:
        self._open()
        if key in self._written:
            raise ConfigError(f"txn writes {key!r} twice: one write per key")
        self._writes.append(write)
        self._written.add(key)
        return self

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> Self:
        """Set ``key`` to ``value`` (``ttl`` seconds; None: none)."""
        check_ttl(ttl)
        return self._write(key, Put(key, self._kv._encode(key, value), ttl))

    def delete(self, key: str) -> Self:
        """Delete ``key`` (nothing if absent)."""
        _check_key(key)
        return self._write(key, Delete(key))

    def commit(self) -> TxnOutcome:
        """Apply the txn; see the class docstring. ConfigError for a txn
        without writes or committed before."""
        self._open()
        if not self._writes:
            raise ConfigError("txn: nothing to write (add put or delete before commit)")
        fence = self._fence
        if fence is not None:
            _check_fence(fence)
        self._committed = True
        kv = self._kv._space.store.kv
        compares, writes = list(self._compares), list(self._writes)
        result = _once(lambda rid: kv.txn(compares, writes, rid))
        if result.ok:
            puts = [w.key for w in writes if isinstance(w, Put)]
            return TxnOutcome(True, result.revision, dict(zip(puts, result.versions, strict=True)))
        failed = result.failed if result.failed is not None else 0
        if fence is not None and isinstance(compares[failed], GrantHeld):
            raise _refused(fence, "txn")
        return TxnOutcome(False, result.revision, {}, self._described[failed])


class Watch:
    """An open watch (see :meth:`KV.watch`): iterate it (``for``/``async for``),
    or call :meth:`get`. ``revision`` is where to resume (``since=``) without
    missing what was not consumed yet. A context manager (sync and async)
    that closes it. One consumer at a time; ``close`` from anywhere."""

    def __init__(
        self, kv: KV, prefix: str, since: int | None, initial: bool, timeout: float | None
    ) -> None:
        self._kv = kv
        self.prefix = prefix
        self.timeout = timeout
        start = WATCH_START_S if timeout is None else min(WATCH_START_S, timeout)
        space = kv._space
        self._follower = Follower(
            lambda: space.store.kv,
            prefix,
            since=since,
            initial=initial,
            start_limit=start,
            name="kv watch",
        )
        self._idle_since = time.monotonic()

    def __repr__(self) -> str:
        return f"<Watch {self.prefix!r} at revision {self.revision}>"

    @property
    def revision(self) -> int:
        """Resume from here (``watch(prefix, since=w.revision)``) to miss nothing
        that this watch has not delivered yet (what shares a revision with the
        next event may come again)."""
        return self._follower.resume_point()

    @property
    def closed(self) -> bool:
        """True once closed (by ``close``, ``KV.close`` or its timeout)."""
        return self._follower.stopped.is_set()

    @property
    def relists(self) -> int:
        """How many times it re-listed after Compacted."""
        return self._follower.relists

    def close(self) -> None:
        """End the watch (idempotent; a blocked ``next`` returns within
        ``taskspace.state.watch.WAIT_STEP_S``, one second)."""
        self._follower.close()

    def _event(self, raw: FeedEvent) -> WatchEvent:
        self._idle_since = time.monotonic()
        value = None
        if raw.kind == "put" and raw.value is not None:
            try:
                value = self._kv._decode(raw.key, raw.value)
            except SerializationError as exc:
                raise SerializationError(
                    f"{exc} (kv watch, revision {raw.revision}; the watch is past it)"
                ) from None
        return WatchEvent(raw.kind, raw.key, value, raw.version, raw.revision, raw.relist)

    def _ended(self) -> None:
        """Nothing came before a timeout: raise the outage if there was one
        (the idle clock restarts, so calling again waits another timeout)."""
        failure = self._follower.failure
        if failure is not None and not self.closed:
            self._idle_since = time.monotonic()
            raise BackendError(
                f"kv watch {self.prefix!r}: the store did not answer before the timeout"
                f" (nothing is lost: iterate again, or resume with since={self.revision}):"
                f" {failure}"
            ) from failure

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, waiting up to ``timeout`` seconds (None: as long as it
        takes); None after the timeout or once closed. BackendError if the store
        was failing when the timeout ran out (nothing is lost: call again).
        SerializationError for a value this view cannot decode (named; the
        watch is past it)."""
        check_seconds(timeout, "timeout", minimum=0.0, optional=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        follower = self._follower
        while (raw := follower.pop()) is None:
            if follower.stopped.is_set():
                return None
            if not follower.fill(deadline):
                self._ended()
                return None
        return self._event(raw)

    def _idle_deadline(self) -> float | None:
        return None if self.timeout is None else self._idle_since + self.timeout

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> WatchEvent:
        follower = self._follower
        while (raw := follower.pop()) is None:
            if follower.stopped.is_set():
                raise StopIteration
            if not follower.fill(self._idle_deadline()):
                if follower.stopped.is_set():
                    raise StopIteration
                self._ended()
                self.close()  # idle for ``timeout``: the watch ends for good
                raise StopIteration
        return self._event(raw)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        """As ``next``, without blocking the event loop: the store is read in a
        worker thread, in steps of at most WAIT_STEP_S; cancelling the await
        loses nothing (the thread only fills the buffer)."""
        follower = self._follower
        while (raw := follower.pop()) is None:
            if follower.stopped.is_set():
                raise StopAsyncIteration
            deadline = self._idle_deadline()
            step = time.monotonic() + feed.WAIT_STEP_S
            if deadline is not None:
                step = min(step, deadline)
            filled = await asyncio.to_thread(follower.fill, step)
            if filled or follower.stopped.is_set():
                continue
            if deadline is not None and time.monotonic() >= deadline:
                self._ended()
                self.close()
                raise StopAsyncIteration
        return self._event(raw)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_fence(fence: Lease) -> None:
    from taskspace.coordination.lease import Lease

    if not isinstance(fence, Lease):
        raise ConfigError(f"fence={fence!r}: must be a Lease (from a lock, semaphore or term)")
    if not fence.held:
        raise _refused(fence, "a fenced write")


def _refused(fence: Lease, what: str) -> LeaseLost:
    return LeaseLost(f"{what} refused: lease {fence.name} (token {fence.token}) is no longer held")


def _pause(deadline: float, delay: float) -> bool:
    """Sleep ``delay`` if it ends before ``deadline``; False (no sleep) if not."""
    if time.monotonic() + delay >= deadline:
        return False
    time.sleep(delay)
    return True


T = TypeVar("T")


def _once(call: Callable[[str], T]) -> T:
    """``call(request_id)``, retried once after a BackendError with the same
    request id: the store returns the first call's result if it had applied
    (a reply lost on the network), so the write happens at most once."""
    request_id = uuid.uuid4().hex
    try:
        return call(request_id)
    except SpaceLost:
        raise
    except BackendError:
        time.sleep(RETRY_AFTER_S)
        return call(request_id)
