"""A two-level cache: L1 in this process, L2 in the space, invalidated across processes.

::

    cache = space.cache("embeddings", capacity=10_000, policy="tinylfu", ttl=3600)
    cache.set("doc:1", [0.1, 0.2])
    cache.get("doc:1")                                   # L1 hit: no store call
    cache.get_or_set("doc:2", lambda: embed("..."))      # read-through
    cache.delete("doc:1")                                # every process's L1 drops it
    cache.stats()                                        # hits (L1/L2), misses, ...

**Layout.** L2 values are JSON (the KV facade's codec, ``max_payload``
applies) at ``taskspace/cache/<name>/<key>`` (the name URL-quoted) with a
TTL: ``ttl`` if given, else RETENTION_S (7 days) after the last write, so
storage stays bounded. L1 is an eviction policy (:mod:`taskspace.state.policies`:
``tinylfu``, ``lru``, ``lfu``) of ``capacity`` entries under one lock, each
entry tagged with the KV version it holds and its own expiry (``ttl``).

**Invalidation: the KV change feed, not pubsub.** Every write of L2 already
lands in the store's change feed (``store.kv.changes``), in revision order,
with the key's version; expiries are recorded there too. One listener thread
per cache follows the feed of the cache's prefix (``changes``, then a
blocking ``kv.wait``: BLPOP on Redis, LISTEN on PostgreSQL, the commit
signal on SQLite) and drops every L1 entry whose version a change
supersedes. Pubsub would need a second message per write (lost if the
writer dies between the two), and a subscriber that misses messages only
learns that *something* was missed; the feed is durable, so a listener that
was away (backend down, process paused) resumes from its position and
misses nothing, and a position the feed no longer keeps raises Compacted,
which clears L1.

**The staleness bound (the guarantee).** A read that starts more than
``max_stale`` seconds (default 1 s) after a ``set``/``delete`` of its key
completed, in any process, returns that write's value or a newer one (up to
the wake-up delay of one thread, see below). How: the listener records the
send time of each ``changes`` call that found it caught up; L1 serves hits
only while a flag is set, which the listener sets and a watchdog thread
(no store calls) clears at that send time plus ``max_stale``; so a listener
that is stuck in a store call, backed off or behind stops L1 from serving,
and reads go to L2. The listener polls at least every ``max_stale / 4``
(at most 0.25 s) when idle. The hit path reads no clock (that keeps it
under a microsecond): the flag flips when the watchdog runs, which under a
busy thread takes up to the interpreter's switch interval (5 ms), and after
a process pause (SIGSTOP) as long as the watchdog takes to be scheduled.
Typically an invalidation is applied within a millisecond or two of the
write (``python -m bench cache``). L1 entries have no clock of their own
either: an L2 expiry is a change on the feed, applied like a delete.

**Racing reads (no stale re-insert).** An L1 fill (a read of L2, or a
``set``) registers itself before its store call; every invalidation applied
meanwhile raises the fill's floor to the version it supersedes (a local
``delete``, a failed write, a Compacted feed: to infinity), and a fill whose
version is below its floor, or below a version already in L1, is refused.

**Faults.** The listener never dies of an exception: a BackendError is
logged once and retried with backoff (0.05 s doubling to 2 s) from the same
position (the feed is durable: nothing is missed); Compacted clears L1 and
follows from the current revision; any other exception clears L1 and
restarts from the current revision. While the store is unreachable for
longer than ``max_stale``, reads go to L2 and raise BackendError rather than
serve unverified values. A ``set`` that fails may or may not have written:
the local L1 entry is dropped. ``close()`` (Space.close calls it) stops the
listener and empties L1; a closed cache still reads and writes L2.

**Values.** JSON values that survive exactly (SerializationError naming the
key otherwise). L1 hands out the stored object itself: do not mutate a value
you got from the cache. Keys are non-empty strings (ConfigError otherwise).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote

from taskspace.backends.base import Change, Delete
from taskspace.backends.checks import check_seconds, check_ttl
from taskspace.codec import JSON
from taskspace.errors import BackendError, Compacted, ConfigError, SerializationError, SpaceLost
from taskspace.state.policies import POLICIES, LRUPolicy, make_policy

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.cache")

PREFIX: Final = "taskspace/cache/"
DEFAULT_CAPACITY: Final = 10_000
DEFAULT_POLICY: Final = "tinylfu"
DEFAULT_MAX_STALE_S: Final = 1.0
MIN_MAX_STALE_S: Final = 0.02
RETENTION_S: Final = 7 * 24 * 3600.0  # L2 lifetime of a value written without a ttl
WAIT_STEP_MAX_S: Final = 0.25  # one kv.wait of the listener at most (and max_stale / 4)
PAGE: Final = 1000  # changes read per call
SCAN_PAGE: Final = 500  # keys deleted per txn by clear()
BACKOFF_START_S: Final = 0.05
BACKOFF_MAX_S: Final = 2.0
CLOSE_JOIN_S: Final = 2.0
_INF: Final = float("inf")

T = TypeVar("T")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<MISSING>"


MISSING: Final[Any] = _Missing()
"""The default ``get``/``peek`` return to tell a miss from a cached ``None``."""


class _Fill:
    """One L1 fill in flight (a read of L2 or a write); ``floor``: the lowest
    version it may still insert (raised by invalidations applied meanwhile)."""

    __slots__ = ("floor",)

    def __init__(self) -> None:
        self.floor = 0.0


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the cache was opened in this process.

    ``l1_hits``/``l2_hits``/``misses`` count reads; ``invalidations``: L1
    entries dropped by changes seen on the feed (or by local writes);
    ``refused_fills``: fills refused because an invalidation raced them;
    ``resets``: times L1 was cleared (listener (re)start, Compacted, clear()).
    """

    l1_hits: int
    l2_hits: int
    misses: int
    sets: int
    deletes: int
    invalidations: int
    refused_fills: int
    resets: int
    size: int
    capacity: int

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits

    @property
    def hit_rate(self) -> float:
        """Hits over reads (0.0 before any read)."""
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"key={key!r}: must be a non-empty string")


class Cache:
    """A named two-level cache; see the module docstring for the guarantees.

    ``capacity``: L1 entries (an int >= 1); ``policy``: one of ``POLICIES``;
    ``ttl``: seconds a value lives (L1 and L2; None: L2 keeps it RETENTION_S
    after its last write, L1 until evicted or invalidated); ``max_stale``:
    the staleness bound in seconds (at least MIN_MAX_STALE_S). Bad options
    raise ConfigError naming the option; nothing touches the store until the
    first read or write. Thread-safe.
    """

    def __init__(
        self,
        space: Space,
        name: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        policy: str = DEFAULT_POLICY,
        ttl: float | None = None,
        max_stale: float = DEFAULT_MAX_STALE_S,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigError(
                f"unknown cache option(s) {', '.join(sorted(unknown))}; valid: capacity,"
                " policy, ttl, max_stale"
            )
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string")
        if policy not in POLICIES:
            raise ConfigError(f"policy={policy!r}: must be one of {', '.join(POLICIES)}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"capacity={capacity!r}: must be an integer >= 1")
        check_ttl(ttl)
        check_seconds(max_stale, "max_stale", minimum=MIN_MAX_STALE_S)
        self.name = name
        self.policy = policy
        self.capacity = capacity
        self.ttl = None if ttl is None else float(ttl)
        self.max_stale = float(max_stale)
        self.prefix = f"{PREFIX}{quote(name, safe='')}/"
        self._space = space
        self._codec = JSON.limited(space.max_payload)
        self._l1 = make_policy(policy, capacity)
        self._l1_get = self._l1.get
        # LRU hits take no lock: LRUPolicy.get is three OrderedDict operations
        # (in, move_to_end, getitem), each atomic under the GIL on str keys, and
        # every mutation happens under the lock; a key popped between them
        # raises KeyError, read as a miss. The other policies move keys between
        # segments on a hit, so their hits take the lock.
        self._lockfree = type(self._l1) is LRUPolicy
        self._l1_hit_count = itertools.count()  # lock-free hits (next() is atomic)
        self._lock = threading.Lock()
        # L1 serves hits only while _fresh: the listener sets it when caught up
        # (until _fresh_until, monotonic), the watchdog clears it at that time.
        self._fresh = False
        self._fresh_until = 0.0
        self._step = min(WAIT_STEP_MAX_S, self.max_stale / 4)
        self._inflight: dict[str, list[_Fill]] = {}
        self._l1_hits = self._l2_hits = self._misses = self._sets = self._deletes = 0
        self._invalidations = self._refused = self._resets = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._on_apply: Callable[[list[Change]], None] | None = None  # benchmarks' probe

    def __repr__(self) -> str:
        return f"<Cache {self.name!r} policy={self.policy} capacity={self.capacity}>"

    # -- reads ----------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (from L1 if fresh, else L2, filling L1), or
        ``default`` if absent or expired. BackendError if L2 must be read
        and the store cannot be reached."""
        if self._fresh:  # the hit path: a flag, a policy lookup (and the lock)
            if self._lockfree:
                try:
                    slot = self._l1_get(key, MISSING)
                except (KeyError, TypeError):  # popped meanwhile; unhashable
                    slot = MISSING
                if slot is not MISSING:
                    next(self._l1_hit_count)
                    return slot[0]
            else:
                lock = self._lock
                lock.acquire()
                try:
                    slot = self._l1_get(key, MISSING)
                    if slot is not MISSING:
                        self._l1_hits += 1
                        return slot[0]
                except TypeError:
                    pass  # unhashable: the slow path names the bad key
                finally:
                    lock.release()
        return self._load(key, default)

    def peek(self, key: str, default: Any = MISSING) -> Any:
        """The value of ``key`` from L1 only (no store call), or ``default``
        when L1 does not hold it or is not fresh (see the staleness bound)."""
        _check_key(key)
        if self._fresh:
            with self._lock:
                slot = self._l1_get(key, MISSING)
                if slot is not MISSING:
                    self._l1_hits += 1
                    return slot[0]
        return default

    def get_or_set(self, key: str, fn: Callable[[], T], ttl: float | None = None) -> T:
        """Read-through: the cached value of ``key``, or ``fn()`` stored with
        ``ttl`` (default: the cache's) and returned. Concurrent misses each call
        ``fn`` (no single-flight: ``space.cached`` has it). An exception of
        ``fn`` propagates and nothing is stored."""
        if self._fresh:  # as in get
            if self._lockfree:
                try:
                    slot = self._l1_get(key, MISSING)
                except (KeyError, TypeError):
                    slot = MISSING
                if slot is not MISSING:
                    next(self._l1_hit_count)
                    return slot[0]  # type: ignore[no-any-return]
            else:
                lock = self._lock
                lock.acquire()
                try:
                    slot = self._l1_get(key, MISSING)
                    if slot is not MISSING:
                        self._l1_hits += 1
                        return slot[0]  # type: ignore[no-any-return]
                except TypeError:
                    pass  # unhashable: the slow path names the bad key
                finally:
                    lock.release()
        if not callable(fn):
            raise ConfigError(f"fn={fn!r}: must be callable")
        found = self._load(key, MISSING)
        if found is not MISSING:
            return found  # type: ignore[no-any-return]
        value = fn()
        self.set(key, value, ttl=ttl)
        return value

    def _load(self, key: str, default: Any) -> Any:
        """Read L2 and fill L1 (unless an invalidation raced the read)."""
        _check_key(key)
        self._ensure_listener()
        fill = self._begin(key)
        slot = None
        try:
            found = self._space.store.kv.get(self.prefix + key)
            if found is not None:
                value = self._decode(key, found.value)
                slot = (value, found.version)
        finally:
            self._end(key, fill, slot, failed=False)
        with self._lock:
            if slot is None:
                self._misses += 1
                return default
            self._l2_hits += 1
            return slot[0]

    def _decode(self, key: str, data: bytes) -> Any:
        try:
            return self._codec.decode(data)
        except SerializationError as exc:
            raise SerializationError(f"cache {self.name!r}: the value of {key!r}: {exc}") from None

    # -- writes ---------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: float | None = None) -> int:
        """Write ``value`` to L2 (expiring after ``ttl``, default the cache's
        ttl, else RETENTION_S) and to this process's L1; every other process's
        L1 drops its older copy. Returns the new version. SerializationError
        (nothing written) if ``value`` does not survive JSON; BackendError if
        the store fails (the write may or may not have happened; L1 drops the
        key)."""
        _check_key(key)
        check_ttl(ttl)
        data = self._codec.encode(value, f"the value of cache key {key!r}")
        stored = self._codec.decode(data)  # L1 holds what every other process decodes
        life = ttl if ttl is not None else self.ttl
        self._ensure_listener()
        fill = self._begin(key)
        slot = None
        try:
            written = self._space.store.kv.put(
                self.prefix + key, data, ttl=life if life is not None else RETENTION_S
            )
            slot = (stored, written.version)
        finally:
            self._end(key, fill, slot, failed=slot is None)
        with self._lock:
            self._sets += 1
        return written.version

    put = set

    def delete(self, key: str) -> bool:
        """Delete ``key`` from L2 and L1 (every process's L1 drops it); True if
        L2 held it. BackendError if the store fails (L1 drops it anyway)."""
        _check_key(key)
        self._ensure_listener()
        try:
            return self._space.store.kv.delete(self.prefix + key)
        finally:
            with self._lock:
                self._deletes += 1
                self._invalidate(key, _INF)

    def clear(self) -> int:
        """Delete every key of this cache from L2 (pages of SCAN_PAGE keys, one
        txn each) and empty L1; returns how many keys were deleted. Keys
        written during the clear may survive it."""
        self._ensure_listener()
        kv = self._space.store.kv
        after: str | None = None
        deleted = 0
        try:
            while True:
                page = kv.scan(self.prefix, after_key=after, limit=SCAN_PAGE)
                if page:
                    kv.txn([], [Delete(key) for key, _ in page])
                    deleted += len(page)
                if len(page) < SCAN_PAGE:
                    return deleted
                after = page[-1][0]
        finally:
            self._reset()

    # -- L1 bookkeeping (all under self._lock) ------------------------------------

    def _begin(self, key: str) -> _Fill:
        fill = _Fill()
        with self._lock:
            fills = self._inflight.get(key)
            if fills is None:
                self._inflight[key] = [fill]
            else:
                fills.append(fill)
        return fill

    def _end(self, key: str, fill: _Fill, slot: tuple[Any, int] | None, failed: bool) -> None:
        """Finish a fill: insert ``slot`` unless refused. ``failed``: a write
        whose outcome is unknown, so every copy of the key is suspect."""
        with self._lock:
            fills = self._inflight[key]
            fills.remove(fill)
            if not fills:
                del self._inflight[key]
            if failed:
                self._invalidate(key, _INF)
                return
            if slot is None or self._closed:
                return
            version = slot[1]
            if version < fill.floor:
                self._refused += 1
                return
            l1 = self._l1
            if key in l1:
                held = l1.get(key)
                if held[1] > version:
                    self._refused += 1
                    return
            for other in fills:  # a newer version exists: older reads in flight are stale
                if other.floor < version:
                    other.floor = version
            l1.put(key, slot)

    def _invalidate(self, key: str, floor: float) -> None:
        """Drop the L1 entry of ``key`` older than ``floor`` and raise the floor
        of its fills in flight."""
        l1 = self._l1
        if key in l1:  # (records no access)
            slot = l1.pop(key)
            if slot[1] < floor:
                self._invalidations += 1
            else:  # this very version (a write of this process seen on the feed): keep
                l1.put(key, slot)
        fills = self._inflight.get(key)
        if fills:
            for fill in fills:
                if fill.floor < floor:
                    fill.floor = floor

    def _apply(self, changes: list[Change]) -> None:
        """Apply changes of the feed: a put of version v supersedes every
        version below v; a delete or expiry of v removes v and below."""
        start = len(self.prefix)
        with self._lock:
            for change in changes:
                floor = change.version if change.kind == "put" else change.version + 1
                self._invalidate(change.key[start:], floor)
        probe = self._on_apply
        if probe is not None:
            probe(changes)

    def _reset(self) -> None:
        """Empty L1 and refuse every fill in flight (it may hold a stale read)."""
        with self._lock:
            self._l1.clear()
            self._resets += 1
            for fills in self._inflight.values():
                for fill in fills:
                    fill.floor = _INF

    # -- the listener ---------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._closed:
            return
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._closed:
                return
            if self._pid != os.getpid():  # a forked child: the parent's threads are not here
                self._pid = os.getpid()
                self._thread = self._watchdog = None
                self._fresh, self._fresh_until = False, 0.0
            if self._thread is None or not self._thread.is_alive():
                self._stop.set()  # a watchdog left over stops with its listener
                self._stop = stop = threading.Event()
                self._thread = threading.Thread(target=self._listen, args=(stop,),
                                                name=f"taskspace-cache-{self.name}",
                                                daemon=True)  # fmt: skip
                self._watchdog = threading.Thread(target=self._watch, args=(stop,),
                                                  name=f"taskspace-cache-{self.name}-watchdog",
                                                  daemon=True)  # fmt: skip
                self._thread.start()
                self._watchdog.start()

    def _synced(self, sent: float) -> None:
        """The listener has applied every change committed before ``sent``."""
        until = sent + self.max_stale
        self._fresh_until = until
        if time.monotonic() < until and not self._closed:
            self._fresh = True

    def _watch(self, stop: threading.Event) -> None:
        """Clear ``_fresh`` once ``_fresh_until`` passes (the listener may be
        blocked in a store call); makes no store call."""
        while not stop.is_set():
            try:
                left = self._fresh_until - time.monotonic()
                if left <= 0:
                    self._fresh = False
                    left = self._step
                stop.wait(left)
            except Exception:  # this thread must never die
                log.exception("cache %s: watchdog step failed", self.name)
                self._fresh = False
                stop.wait(BACKOFF_MAX_S)
        self._fresh = False

    def _listen(self, stop: threading.Event) -> None:
        """Follow the feed of the prefix until ``stop``; never dies of an exception."""
        cursor: int | None = None
        delay = BACKOFF_START_S
        failing = False
        step = self._step
        while not stop.is_set():
            try:
                kv = self._space.store.kv
                if cursor is None:  # (re)start: what happened before is unknown
                    cursor = kv.revision()
                    self._reset()
                sent = time.monotonic()
                page = kv.changes(self.prefix, cursor, PAGE)
                if page:
                    self._apply(page)
                    cursor = page[-1].revision
                if len(page) < PAGE:  # caught up with every write completed before `sent`
                    self._synced(sent)
                    if failing:
                        log.warning("cache %s: listener recovered", self.name)
                        failing = False
                    delay = BACKOFF_START_S
                    kv.wait(self.prefix, cursor, step)
            except Compacted as exc:
                log.warning("cache %s: the change feed was compacted past the listener"
                            " (%s); clearing L1", self.name, exc)  # fmt: skip
                self._reset()
                cursor = exc.revision
            except Exception as exc:  # this thread must never die
                if stop.is_set():
                    return
                if isinstance(exc, BackendError) and not isinstance(exc, SpaceLost):
                    if not failing:  # the feed is durable: resume from the same position
                        log.warning("cache %s: listener failed, retrying: %s", self.name, exc)
                else:
                    log.exception("cache %s: listener failed; clearing L1", self.name)
                    cursor = None
                failing = True
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    # -- the rest -------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot of the counters (this process only)."""
        with self._lock:
            lockfree_hits = int(repr(self._l1_hit_count)[len("count(") : -1])
            return CacheStats(
                l1_hits=self._l1_hits + lockfree_hits,
                l2_hits=self._l2_hits,
                misses=self._misses,
                sets=self._sets,
                deletes=self._deletes,
                invalidations=self._invalidations,
                refused_fills=self._refused,
                resets=self._resets,
                size=len(self._l1),
                capacity=self.capacity,
            )

    def close(self) -> None:
        """Stop the listener (waiting up to CLOSE_JOIN_S for its store call in
        flight) and empty L1; idempotent. The cache then reads and writes L2
        only."""
        self._closed = True
        self._fresh = False
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_JOIN_S)
        with self._lock:
            self._fresh = False
            self._l1.clear()
