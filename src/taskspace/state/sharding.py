"""ShardedKV: one key space spread over several spaces by hash slot.

::

    kv = ShardedKV(["sqlite:///a.db", "redis://127.0.0.1:6379/1"], coordinator="sqlite:///map.db")
    kv.put("user:1", {"name": "Ada"})
    kv.add_shard("redis://127.0.0.1:6379/2")
    kv.rebalance()                          # moves whole slots; reads and writes go on
    kv.remove_shard("sqlite:///a.db")
    kv.rebalance()

**Routing.** A key's slot is :func:`~taskspace.state.slots.key_slot` (CRC16
as Redis Cluster, ``{tag}`` rule included); the slot → shard map is one JSON
key (``taskspace/shard/map``) in the coordinating space, changed only by
compare-and-set, so its KV version is the map version. Every client caches
the map and re-reads it only when a shard refuses it (the map moved).

**Ownership markers make every operation safe during a move.** Each shard
holds a marker per slot it has ever owned (``taskspace/shard/slots/<n>``:
``"owned"``, ``"migrating"`` or ``"moved"``; at most 16,384 small keys per
shard). A write is one store transaction on the owner with a compare on its
marker being ``"owned"``; a read is one ``get_many`` of the marker and the key
and counts only if the marker is ``"owned"`` or ``"migrating"``. A refused
call re-reads the map and retries (at once if the slot's owner changed, else
with backoff up to ``wait`` seconds, then BackendError). At every instant at
most one shard serves a slot, so reads and writes stay linearizable per key
during a rebalance, from any number of processes.

**Moving a batch of slots** (``rebalance``, under a lock in the coordinator):
record the batch in the map (``moving``); if another run began it, delete
what that try left on the target; pre-copy the slots' keys with their
remaining TTLs while the source still takes writes (the target serves none
of them yet); mark the slots ``migrating`` on the source (writes to them
wait; reads go on); copy the keys changed since the pre-copy (from the
source's change feed; all of them again if it was compacted) and delete on
the target those deleted since; mark the slots ``moved`` on the source
(reads and writes wait for a round trip), then ``owned`` on the target;
publish the new map (``moving`` → ``cleanup``); delete the copies on the
source; clear ``cleanup``. A rebalance killed at any point is resumed by the
next ``rebalance()`` from the recorded batch (each step is idempotent given
the markers), and until then only the slots of that one batch may wait.

**Versions across a move.** ``Entry.version`` is the shard's version with
the shard id in its low 10 bits, so a version is never reused for a key,
also across moves: a ``cas`` with a version read before the key moved raises
VersionConflict (correct: the key was rewritten by the move). Versions do
not increase across a move; ``Entry.revision`` is the shard space's.

**Guarantees and limits.** Bad input raises ConfigError naming the argument
and changes nothing (keys are non-empty strings outside ``taskspace/``,
which is taskspace's own: a shard space may also hold tasks, locks...).
A shard or coordinator that is down raises BackendError (a write may or may
not have happened; transactions are retried once with the same request id).
``scan`` is weakly consistent: every value it yields was the key's value at
some instant during the scan, but a key whose slot moves during the scan may
be missed. ``wait`` bounds every call's waiting on a move; a rebalance's
batch (``batch_slots``) must copy in well under that. Each shard space
belongs to one ShardedKV (its markers say what it owns) and must hold no
data keys when it joins (ConfigError). Storage: one marker per slot a shard
ever owned (at most 16,384 small keys), and the shard spaces' change feeds,
bounded by ``store.kv.reap`` (a worker's maintenance, or :meth:`ShardedKV.reap`).

**Moving a batch reads only its keys.** Per source shard, one rebalance
keeps an index of keys by slot: one scan, then the change feed since the
revision read before it (a key that existed throughout the scan is in it;
any other was written later, so it is in the feed). A batch reads its
candidate keys with ``get_many``; if the feed was compacted meanwhile, that
batch scans the source instead.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from taskspace.backends import validate_url
from taskspace.backends.base import (
    Closeable,
    Compare,
    Delete,
    Exists,
    GrantHeld,
    KVStore,
    Put,
    Store,
    TxnResult,
    ValueIs,
    Versioned,
    VersionIs,
)
from taskspace.backends.checks import check_ttl
from taskspace.codec import DEFAULT_MAX_PAYLOAD, JSON
from taskspace.coordination.lease import Lease
from taskspace.errors import (
    BackendError,
    Compacted,
    ConfigError,
    LeaseLost,
    SerializationError,
    SpaceLost,
    UpdateTimeout,
    VersionConflict,
)
from taskspace.space import Space
from taskspace.state.kv import Entry
from taskspace.state.slots import (
    SHARD_ACTIVE,
    SHARD_LEAVING,
    Move,
    SlotMap,
    key_slot,
    plan_moves,
)

T = TypeVar("T")

MAP_KEY = "taskspace/shard/map"
# Keys under taskspace/ are taskspace's own records (the markers, and those of
# tasks, locks, the registry... when a shard space is shared with them): never
# data of a ShardedKV, refused as keys, skipped by scans and moves.
RESERVED_PREFIX = "taskspace/"
RESERVED_END = RESERVED_PREFIX + "\U0010ffff"  # above every such key: scans jump over them
MARKER_PREFIX = "taskspace/shard/slots/"
REBALANCE_LOCK = "taskspace/shard/rebalance"
OWNED = b'"owned"'
MIGRATING = b'"migrating"'
MOVED = b'"moved"'
SERVING = (OWNED, MIGRATING)

SHARD_ID_BITS = 10
MAX_SHARD_IDS = 1 << SHARD_ID_BITS
DEFAULT_WAIT_S = 10.0
BATCH_SLOTS = 1024
REBALANCE_LEASE_S = 10.0
WRITE_CHUNK = 500
SCAN_PAGE = 500
CHANGES_PAGE = 1000
UPDATE_TIMEOUT_S = 10.0
UPDATE_BACKOFF_BASE_S = 0.001
UPDATE_BACKOFF_CAP_S = 0.01
BACKOFF_START_S = 0.002
BACKOFF_MAX_S = 0.05
RETRY_AFTER_S = 0.05

StepCallback = Callable[[str, Move], None]


def marker_key(slot: int) -> str:
    """The ownership marker of ``slot`` in a shard space."""
    return f"{MARKER_PREFIX}{slot}"


def encode_version(shard_version: int, shard_id: int) -> int:
    """A ShardedKV version: the shard's version with the shard id in the low bits."""
    return (shard_version << SHARD_ID_BITS) | shard_id


def decode_version(version: int) -> tuple[int, int]:
    """``(shard_version, shard_id)`` of a ShardedKV version."""
    return version >> SHARD_ID_BITS, version & (MAX_SHARD_IDS - 1)


class _Bounce:
    """A shard refused the call: it does not serve the slot (the map moved)."""


BOUNCE = _Bounce()


@dataclass(frozen=True, slots=True)
class RebalanceReport:
    """What one ``rebalance()`` did: batches and slots moved, keys copied
    (including a resumed batch), the map version it left, seconds taken."""

    batches: int
    slots_moved: int
    keys_moved: int
    map_version: int
    seconds: float


def _once(call: Callable[[str], T]) -> T:
    """``call(request_id)``, retried once after a BackendError with the same
    request id: a store that had applied it returns the first result."""
    request_id = uuid.uuid4().hex
    try:
        return call(request_id)
    except SpaceLost:
        raise
    except BackendError:
        time.sleep(RETRY_AFTER_S)
        return call(request_id)


def _chunks(items: Sequence[T], size: int = WRITE_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_shard_url(url: Any, what: str = "url") -> str:
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{what}={url!r}: must be a backend URL string")
    scheme = validate_url(url)
    if scheme == "memory" and url.rstrip("/") in ("memory:", "memory://"):
        raise ConfigError(
            f"{what}={url!r}: an unnamed memory:// store is new on every open; use memory://<name>"
        )
    return url


def _check_urls(urls: Any) -> list[str] | None:
    if urls is None:
        return None
    if isinstance(urls, str) or not isinstance(urls, Sequence):
        raise ConfigError(f"urls={urls!r}: must be a list of backend URLs")
    checked = [_check_shard_url(url, "urls item") for url in urls]
    if not checked:
        raise ConfigError("urls=[]: a ShardedKV needs at least one shard URL")
    duplicates = sorted({url for url in checked if checked.count(url) > 1})
    if duplicates:
        raise ConfigError(f"urls: duplicate shard(s) {duplicates}")
    if len(checked) > MAX_SHARD_IDS:
        raise ConfigError(f"urls: at most {MAX_SHARD_IDS} shards, got {len(checked)}")
    return checked


def _own_pages(
    kv: KVStore, prefix: str, with_revision: bool = False
) -> Iterator[tuple[int, list[tuple[str, Versioned]]]]:
    """Pages of a shard's keys starting with ``prefix`` in key order, without
    ShardedKV's own keys (jumped over, not read), each with the shard's
    revision read just before it (``with_revision``; else 0)."""
    after: str | None = None
    while True:
        revision = kv.revision() if with_revision else 0
        page = kv.scan(prefix, after_key=after, limit=SCAN_PAGE)
        yield revision, [(k, found) for k, found in page if not k.startswith(RESERVED_PREFIX)]
        if len(page) < SCAN_PAGE:
            return
        after = page[-1][0]
        if after.startswith(RESERVED_PREFIX):
            after = RESERVED_END


def _changed_keys(kv: KVStore, after: int, slots: set[int]) -> list[str] | None:
    """The data keys of ``slots`` with a change (put, delete, expiry) above
    revision ``after``; None if the change feed dropped some of them."""
    keys: set[str] = set()
    try:
        while page := kv.changes("", after, limit=CHANGES_PAGE):
            for change in page:
                if not change.key.startswith(RESERVED_PREFIX) and key_slot(change.key) in slots:
                    keys.add(change.key)
            after = page[-1].revision
    except Compacted:
        return None
    return sorted(keys)


def _check_empty(kv: KVStore, url: str) -> None:
    """ConfigError if the space at ``url`` holds data keys (outside taskspace/)."""
    for _, page in _own_pages(kv, ""):
        if page:
            raise ConfigError(
                f"url={url!r} holds keys (e.g. {page[0][0]!r}); a new shard must hold no data"
                " outside taskspace/ (its records of tasks, locks... may stay)"
            )
        return


def _check_key(key: Any) -> int:
    slot = key_slot(key)
    if key.startswith(RESERVED_PREFIX):
        raise ConfigError(f"key={key!r}: keys under {RESERVED_PREFIX!r} are taskspace's own")
    return slot


class _KeyIndex:
    """The keys of one source shard by slot, so that a batch reads only its own
    keys: a scan that began after ``revision``, then the change feed after it
    (a key that existed throughout the scan is in it; any other was written
    later, so it is in the feed). Deleted keys stay listed (``get_many`` skips
    them)."""

    def __init__(self, kv: KVStore) -> None:
        self.revision = kv.revision()
        self.by_slot: dict[int, set[str]] = {}
        for _, page in _own_pages(kv, ""):
            for key, _found in page:
                self.by_slot.setdefault(key_slot(key), set()).add(key)

    def catch_up(self, kv: KVStore) -> None:
        """Add the keys written since ``revision``; Compacted if the feed dropped some."""
        while page := kv.changes("", self.revision, limit=CHANGES_PAGE):
            for change in page:
                if not change.key.startswith(RESERVED_PREFIX):
                    self.by_slot.setdefault(key_slot(change.key), set()).add(change.key)
            self.revision = page[-1].revision

    def keys(self, slots: set[int]) -> set[str]:
        return {key for slot in slots for key in self.by_slot.get(slot, ())}


class _Run:
    """What one ``rebalance()`` call knows beyond the map: each source's key
    index, and the keys it copied in the batch that awaits cleanup."""

    def __init__(self) -> None:
        self.indexes: dict[int, _KeyIndex] = {}
        self.copied: dict[int, tuple[list[int], list[str]]] = {}
        self.planned: dict[str, Any] | None = None

    def keys_of(self, kv: KVStore, shard_id: int, slots: set[int]) -> set[str] | None:
        """A superset of the keys ``slots`` hold on shard ``shard_id`` now
        (keys written later: the caller reads the change feed from a revision
        read before this call); None if the feed was compacted meanwhile (the
        caller scans; the next batch indexes again)."""
        index = self.indexes.get(shard_id)
        if index is None:
            index = self.indexes[shard_id] = _KeyIndex(kv)
        try:
            index.catch_up(kv)
        except Compacted:
            del self.indexes[shard_id]
            return None
        return index.keys(slots)


class ShardedKV(Closeable):
    """JSON values spread over several spaces by hash slot, with the methods of
    ``space.kv`` (get, get_versioned, put, cas, update, delete, scan) and
    online rebalancing (see the module docstring for the guarantees).

    ``urls`` seed the slot map (an even split) the first time; once the
    coordinator holds a map, that map is authoritative and ``urls`` may be
    None (a ConfigError if there is no map yet). ``coordinator`` is a Space
    or URL holding the map (it may also be a shard). ``wait``: how long a
    call waits for a slot that is being moved before BackendError.
    """

    def __init__(
        self,
        urls: Sequence[str] | None = None,
        *,
        coordinator: Space | str,
        wait: float = DEFAULT_WAIT_S,
        max_payload: int | None = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        checked = _check_urls(urls)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait <= 3600:
            raise ConfigError(f"wait={wait!r}: must be a positive number of seconds (at most 3600)")
        if isinstance(coordinator, Space):
            self._coord, self._own_coord = coordinator, False
        elif isinstance(coordinator, str):
            self._coord, self._own_coord = Space(_check_shard_url(coordinator, "coordinator")), True
        else:
            raise ConfigError(f"coordinator={coordinator!r}: must be a Space or a backend URL")
        self._wait = float(wait)
        self._codec = JSON.limited(max_payload)
        self._spaces: dict[str, Space] = {}
        self._lock = threading.Lock()
        try:
            self._map = self._bootstrap(checked)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        m = self._map
        return f"<ShardedKV shards={len(m.shards)} map_version={m.version}>"

    # -- shards and the map ---------------------------------------------------

    def _store(self, url: str) -> Store:
        space = self._spaces.get(url)
        if space is None:
            with self._lock:
                space = self._spaces.get(url)
                if space is None:
                    space = self._coord if url == self._coord.url else Space(url)
                    self._spaces[url] = space
        return space.store

    def _kv(self, url: str) -> KVStore:
        return self._store(url).kv

    def _read_map(self) -> SlotMap:
        found = self._coord.store.kv.get(MAP_KEY)
        if found is None:
            raise BackendError(f"the shard map {MAP_KEY!r} is gone from {self._coord.url}")
        try:
            data = self._codec.decode(found.value)
        except SerializationError as exc:
            raise ConfigError(f"the shard map in {self._coord.url} is not JSON: {exc}") from None
        return SlotMap.from_json(found.version, data)

    def _bootstrap(self, urls: list[str] | None) -> SlotMap:
        kv = self._coord.store.kv
        if kv.get(MAP_KEY) is None:
            if urls is None:
                raise ConfigError(
                    f"urls=None: {self._coord.url} holds no shard map yet; pass the shard URLs"
                )
            for url in urls:  # every shard reachable and empty before the map names it
                _check_empty(self._kv(url), url)
            fresh = SlotMap.initial(urls)
            data = self._codec.encode(fresh.to_json(), "the shard map")
            _once(lambda rid: kv.txn([VersionIs(MAP_KEY, None)], [Put(MAP_KEY, data)], rid))
        slot_map = self._read_map()
        if not slot_map.ready:
            slot_map = self._finish_init(slot_map)
        return slot_map

    def _finish_init(self, slot_map: SlotMap) -> SlotMap:
        """Create each first shard's markers (only where absent: a marker that
        exists was written by init or by a later move) and mark the map ready."""
        for shard_id, url in slot_map.shards.items():
            kv = self._kv(url)
            for chunk in _chunks(slot_map.slots_of(shard_id)):
                keys = [marker_key(slot) for slot in chunk]
                absent: list[Compare] = [Exists(key, False) for key in keys]
                puts = [Put(key, OWNED) for key in keys]
                if not _once(lambda rid: kv.txn(absent, puts, rid)).ok:  # noqa: B023
                    for key in keys:
                        _once(lambda rid: kv.txn([Exists(key, False)], [Put(key, OWNED)], rid))  # noqa: B023
        return self._update_map(lambda cur: None if cur.ready else cur.replace(ready=True))

    def _update_map(
        self, change: Callable[[SlotMap], SlotMap | None], fence: Lease | None = None
    ) -> SlotMap:
        """Read-modify-cas the map until it sticks; ``change`` returns the new
        map or None (no change). ``fence``: only while that lease is held."""
        kv = self._coord.store.kv
        while True:
            current = self._read_map()
            new = change(current)
            if new is None:
                self._map = current
                return current
            data = self._codec.encode(new.to_json(), "the shard map")
            compares: list[Compare] = [VersionIs(MAP_KEY, current.version)]
            if fence is not None:
                if not fence.held:
                    raise LeaseLost(f"rebalance lock {fence.name} lost: map unchanged")
                compares.insert(0, GrantHeld(fence.grant))
            result = _once(lambda rid: kv.txn(compares, [Put(MAP_KEY, data)], rid))  # noqa: B023
            if result.ok:
                self._map = new.replace(version=result.versions[0])
                return self._map
            if fence is not None and result.failed == 0:
                raise LeaseLost(f"rebalance lock {fence.name} lost: map unchanged")

    def refresh(self) -> SlotMap:
        """Re-read the map from the coordinator (calls do it by themselves when a
        shard refuses them); completes an unfinished first setup."""
        slot_map = self._read_map()
        if not slot_map.ready:
            slot_map = self._finish_init(slot_map)
        self._map = slot_map
        return slot_map

    @property
    def slot_map(self) -> SlotMap:
        """The map as this client last read it."""
        return self._map

    @property
    def map_version(self) -> int:
        """The version of the map this client last read (increases with every change)."""
        return self._map.version

    @property
    def shards(self) -> list[str]:
        """The URLs of the shards in the map this client last read (leaving ones too)."""
        return [self._map.shards[i] for i in sorted(self._map.shards)]

    def shard_for(self, key: str) -> str:
        """The URL of the shard owning ``key``'s slot in the map this client last read."""
        slot = _check_key(key)
        return self._map.shards[self._map.owners[slot]]

    # -- routing ------------------------------------------------------------------

    def _run(
        self, slot: int, call: Callable[[int, KVStore], T | _Bounce], until: float | None = None
    ) -> T:
        """``call(shard_id, kv)`` on the slot's owner until a shard serves it:
        on a refusal re-read the map, retry at once if the owner changed, else
        back off, up to ``wait`` seconds or until ``until`` (monotonic clock),
        whichever is first (then BackendError)."""
        deadline: float | None = None
        delay = BACKOFF_START_S
        slot_map = self._map
        while True:
            owner = slot_map.owners[slot]
            out = call(owner, self._kv(slot_map.shards[owner]))
            if not isinstance(out, _Bounce):
                return out
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._wait if until is None else min(until, now + self._wait)
            slot_map = self.refresh()
            if slot_map.owners[slot] != owner:
                continue
            if now >= deadline:
                raise BackendError(
                    f"slot {slot} is not served by {slot_map.shards[owner]} although map version"
                    f" {slot_map.version} names it, after {self._wait} s: a rebalance is moving"
                    " it or stopped mid-move (run rebalance() again)"
                )
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _encode(self, key: str, value: Any) -> bytes:
        return self._codec.encode(value, f"the value of {key!r}")

    def _decode(self, key: str, data: bytes) -> Any:
        try:
            return self._codec.decode(data)
        except SerializationError as exc:
            raise SerializationError(f"the value of {key!r} is not JSON: {exc}") from None

    # -- the KV methods --------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if it is absent or expired."""
        found = self.get_versioned(key)
        return default if found is None else found.value

    def get_versioned(self, key: str) -> Entry | None:
        """The value of ``key`` with its version (see the module docstring),
        the shard's revision and expiry, or None."""
        return self._get_versioned(key, None)

    def _get_versioned(self, key: str, until: float | None) -> Entry | None:
        slot = _check_key(key)
        marker = marker_key(slot)

        def read(shard_id: int, kv: KVStore) -> Entry | _Bounce | None:
            mark, found = kv.get_many([marker, key])
            if mark is None or mark.value not in SERVING:
                return BOUNCE
            if found is None:
                return None
            version = encode_version(found.version, shard_id)
            return Entry(self._decode(key, found.value), version, found.revision, found.expires)

        return self._run(slot, read, until)

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        """Write ``value`` (expiring after ``ttl`` seconds; None: never); return
        the new version."""
        check_ttl(ttl)
        slot = _check_key(key)
        data = self._encode(key, value)
        owned: list[Compare] = [ValueIs(marker_key(slot), OWNED)]

        def write(shard_id: int, kv: KVStore) -> int | _Bounce:
            result = _once(lambda rid: kv.txn(owned, [Put(key, data, ttl)], rid))
            return encode_version(result.versions[0], shard_id) if result.ok else BOUNCE

        return self._run(slot, write)

    def cas(self, key: str, value: Any, *, version: int | None, ttl: float | None = None) -> int:
        """Write only if ``key`` is at ``version`` (None: only if absent); return
        the new version, or raise VersionConflict (``.current``: the version
        found, None if absent) and write nothing. A version read before the
        key moved to another shard always conflicts."""
        return self._cas(key, value, version, ttl, None)

    def _cas(
        self, key: str, value: Any, version: int | None, ttl: float | None, until: float | None
    ) -> int:
        check_ttl(ttl)
        slot = _check_key(key)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise ConfigError(f"version={version!r}: must be a non-negative integer or None")
        data = self._encode(key, value)
        marker = marker_key(slot)
        wanted = None if version is None else decode_version(version)

        def conflict(shard_id: int, kv: KVStore) -> VersionConflict:
            found = kv.get(key)
            current = None if found is None else encode_version(found.version, shard_id)
            return VersionConflict(
                f"{key!r} is at version {current}, not {version}: nothing written", current
            )

        def write(shard_id: int, kv: KVStore) -> int | _Bounce:
            if wanted is not None and wanted[1] != shard_id:
                mark = kv.get(marker)  # read on another shard: a conflict if this one serves
                if mark is None or mark.value not in SERVING:
                    return BOUNCE
                raise conflict(shard_id, kv)
            compares: list[Compare] = [
                ValueIs(marker, OWNED),
                VersionIs(key, None if wanted is None else wanted[0]),
            ]
            result = _once(lambda rid: kv.txn(compares, [Put(key, data, ttl)], rid))
            if result.ok:
                return encode_version(result.versions[0], shard_id)
            if result.failed == 0:
                return BOUNCE
            raise conflict(shard_id, kv)

        return self._run(slot, write, until)

    def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = None,
        ttl: float | None = None,
        timeout: float = UPDATE_TIMEOUT_S,
    ) -> Any:
        """Replace the value of ``key`` with ``fn(current)`` (``default`` when
        absent) and return the new value, as ``space.kv.update``: read, then
        ``cas``; on a conflict back off (full jitter) and try again, so ``fn``
        may run several times (keep it pure). ``timeout`` is a promise, also
        while the key's slot is being moved: past it UpdateTimeout (a
        VersionConflict and a TimeoutError) or BackendError, and the call
        wrote nothing. An exception from ``fn`` propagates; nothing is written."""
        _check_key(key)
        if not callable(fn):
            raise ConfigError(f"fn={fn!r}: must be callable (current value -> new value)")
        check_ttl(ttl)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ConfigError(f"timeout={timeout!r}: must be a number of seconds >= 0")
        until = time.monotonic() + timeout
        lost = 0
        while True:
            found = self._get_versioned(key, until)
            current = None if found is None else found.version
            new = fn(default if found is None else found.value)
            try:
                self._cas(key, new, current, ttl, until)
                return new
            except VersionConflict as exc:
                current = exc.current
            delay = random.uniform(0, min(UPDATE_BACKOFF_CAP_S, UPDATE_BACKOFF_BASE_S * 2**lost))
            lost += 1
            if time.monotonic() + delay >= until:
                raise UpdateTimeout(
                    f"update {key!r}: lost the race to other writers {lost} times within"
                    f" timeout={timeout:g} s (last seen at version {current}); nothing written",
                    current,
                )
            time.sleep(delay)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        slot = _check_key(key)
        compares: list[Compare] = [ValueIs(marker_key(slot), OWNED), Exists(key)]

        def remove(shard_id: int, kv: KVStore) -> bool | _Bounce:
            result = _once(lambda rid: kv.txn(compares, [Delete(key)], rid))
            if result.ok:
                return True
            return BOUNCE if result.failed == 0 else False

        return self._run(slot, remove)

    def scan(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Every live ``(key, value)`` whose key starts with ``prefix``, in key
        order, merged from every shard page by page. Each value was the key's
        value at some instant of the scan; a key whose slot moves during the
        scan may be missed (scan again after the rebalance)."""
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix={prefix!r}: must be a string")
        slot_map = self._map
        streams = [
            self._scan_shard(shard_id, url, prefix) for shard_id, url in slot_map.shards.items()
        ]
        last: str | None = None
        for key, data in heapq.merge(*streams, key=lambda item: item[0]):
            if key == last:
                continue
            last = key
            if data is not None:
                yield key, self._decode(key, data)
                continue
            found = self.get_versioned(key)  # this shard did not serve the slot throughout
            if found is not None:
                yield key, found.value

    def _scan_shard(
        self, shard_id: int, url: str, prefix: str
    ) -> Iterator[tuple[str, bytes | None]]:
        """A shard's keys in order, each with its value if the shard served the
        key's slot from before the page was read until its markers were (the
        marker unchanged since a revision read before the page), else None."""
        kv = self._kv(url)
        for before, items in _own_pages(kv, prefix, with_revision=True):
            slots = sorted({key_slot(key) for key, _ in items})
            marks = kv.get_many([marker_key(slot) for slot in slots]) if slots else []
            served = {
                slot
                for slot, mark in zip(slots, marks, strict=True)
                if mark is not None and mark.value in SERVING and mark.revision <= before
            }
            for key, found in items:
                yield key, found.value if key_slot(key) in served else None

    # -- membership and rebalancing ---------------------------------------------

    def add_shard(self, url: str) -> int:
        """Add the space at ``url`` as a shard (no slots yet: ``rebalance()``
        gives it its share) and return its id. ConfigError if it is already a
        shard or holds data keys; BackendError (map unchanged) if it cannot
        be reached."""
        _check_shard_url(url)
        if self._map.shard_of(url) is None:
            _check_empty(self._kv(url), url)

        def change(cur: SlotMap) -> SlotMap:
            existing = cur.shard_of(url)
            if existing is not None:
                raise ConfigError(
                    f"url={url!r} is already shard {existing} ({cur.status[existing]})"
                )
            if cur.next_id >= MAX_SHARD_IDS:
                raise ConfigError(f"url={url!r}: all {MAX_SHARD_IDS} shard ids are used")
            new_id = cur.next_id
            return cur.replace(shards={**cur.shards, new_id: url},
                               status={**cur.status, new_id: SHARD_ACTIVE},
                               next_id=new_id + 1)  # fmt: skip

        slot_map = self._update_map(change)
        shard_id = slot_map.shard_of(url)
        assert shard_id is not None
        return shard_id

    def remove_shard(self, url: str) -> None:
        """Mark the shard at ``url`` as leaving: ``rebalance()`` moves its slots
        to the others and then drops it from the map (its space keeps only
        ``moved`` markers). Idempotent while it is leaving. ConfigError if it
        is not a shard or is the last active one."""
        _check_shard_url(url)

        def change(cur: SlotMap) -> SlotMap | None:
            shard_id = cur.shard_of(url)
            if shard_id is None:
                known = sorted(cur.shards.values())
                raise ConfigError(f"url={url!r} is not a shard; shards: {known}")
            if cur.status[shard_id] == SHARD_LEAVING:
                return None
            if not any(st == SHARD_ACTIVE for i, st in cur.status.items() if i != shard_id):
                raise ConfigError(f"url={url!r} is the last active shard; add another first")
            return cur.replace(status={**cur.status, shard_id: SHARD_LEAVING})

        self._update_map(change)

    def rebalance(
        self,
        *,
        batch_slots: int = BATCH_SLOTS,
        lock_wait: float = 30.0,
        lock_ttl: float = REBALANCE_LEASE_S,
        on_step: StepCallback | None = None,
    ) -> RebalanceReport:
        """Move slots until every active shard holds an even share and no
        shard is leaving (then drop the leaving ones), ``batch_slots`` slots
        per batch, under a lock in the coordinator (LockTimeout after
        ``lock_wait`` s; ``lock_ttl``: the lease a killed rebalance leaves
        behind, renewed while it runs). Resumes a batch a killed rebalance left. Reads and
        writes of other clients go on; those of a batch's slots wait while it
        is copied. ``on_step(step, move)`` is called after each step of a
        batch (``planned``, ``migrating``, ``copied``, ``switched``,
        ``published``, ``cleaned``); an exception from it stops the rebalance
        there (the next one resumes). BackendError if a shard is down, and
        LeaseLost if the lock was lost (a long pause): run it again. Two
        rebalances at once (any processes) take turns on the lock; the later
        one finds what is left to do, usually nothing."""
        if isinstance(batch_slots, bool) or not isinstance(batch_slots, int) or batch_slots < 1:
            raise ConfigError(f"batch_slots={batch_slots!r}: must be a positive integer")
        step: StepCallback = on_step if on_step is not None else (lambda name, move: None)
        started = time.monotonic()
        batches = slots_moved = keys_moved = 0
        run = _Run()
        with self._coord.lock(REBALANCE_LOCK, ttl=lock_ttl, wait=lock_wait) as lease:
            slot_map = self.refresh()
            while True:
                if slot_map.cleanup is not None:
                    slot_map = self._clean(slot_map, lease, step, run)
                    continue
                if slot_map.moving is not None:
                    slots_moved += len(slot_map.moving["slots"])
                    fresh = slot_map.moving == run.planned  # else another run began it
                    keys, slot_map = self._migrate(slot_map, lease, step, run, fresh)
                    batches += 1
                    keys_moved += keys
                    continue
                moves = plan_moves(slot_map)
                if not moves:
                    break
                move = Move(moves[0].source, moves[0].target, moves[0].slots[:batch_slots])
                moving = {"from": move.source, "to": move.target, "slots": move.slots}
                slot_map = self._update_map(lambda cur: cur.replace(moving=moving), fence=lease)  # noqa: B023
                run.planned = moving
                step("planned", move)

            def drop(cur: SlotMap) -> SlotMap | None:
                gone = [
                    i for i, st in cur.status.items() if st == SHARD_LEAVING and not cur.counts[i]
                ]
                if not gone:
                    return None
                keep = [i for i in cur.shards if i not in gone]
                return cur.replace(shards={i: cur.shards[i] for i in keep},
                                   status={i: cur.status[i] for i in keep})  # fmt: skip

            slot_map = self._update_map(drop, fence=lease)
        return RebalanceReport(batches, slots_moved, keys_moved, slot_map.version,
                               time.monotonic() - started)  # fmt: skip

    def _check_lease(self, lease: Lease) -> None:
        if not lease.held:
            raise LeaseLost(f"rebalance lock {lease.name} lost: stopped; run rebalance() again")

    def _migrate(
        self, slot_map: SlotMap, lease: Lease, step: StepCallback, run: _Run, fresh: bool
    ) -> tuple[int, SlotMap]:
        """Carry out (or resume) the map's ``moving`` batch; see the module
        docstring. ``fresh``: this run planned it, so the target holds
        nothing of its slots (else leftovers of the stopped try are deleted)."""
        assert slot_map.moving is not None
        source, target = int(slot_map.moving["from"]), int(slot_map.moving["to"])
        slots = [int(slot) for slot in slot_map.moving["slots"]]
        move = Move(source, target, slots)
        src_url, dst_url = slot_map.shards[source], slot_map.shards[target]
        src, dst = self._kv(src_url), self._kv(dst_url)
        markers = [marker_key(slot) for slot in slots]
        src_marks = [None if m is None else m.value for m in src.get_many(markers)]
        dst_marks = [None if m is None else m.value for m in dst.get_many(markers)]
        copy: list[int] = []
        switch: list[int] = []
        for slot, at_src, at_dst in zip(slots, src_marks, dst_marks, strict=True):
            if at_dst == OWNED:
                continue
            switch.append(slot)
            if at_src in SERVING:
                copy.append(slot)
            elif at_src != MOVED:
                raise BackendError(
                    f"slot {slot}: neither {src_url} nor {dst_url} owns it (markers"
                    f" {at_src!r}, {at_dst!r}); was a shard space wiped?"
                )
        copied: list[str] = []
        if copy:
            wanted = set(copy)
            src_store = self._store(src_url)
            if not fresh:
                self._delete_slots(dst, wanted)  # leftovers of the try that was stopped
            # 1. pre-copy while the source still takes writes (the target serves nothing yet)
            since = src.revision()
            candidates = run.keys_of(src, source, wanted)
            precopied = self._copy_slots(src_store, dst, wanted, candidates)
            step("precopied", move)
            # 2. stop writes, then copy what changed since the pre-copy
            self._check_lease(lease)
            self._put_markers(src, copy, MIGRATING)
            step("migrating", move)
            changed = _changed_keys(src, since, wanted)
            if changed is None:  # the feed was compacted: copy again from scratch
                self._delete_keys(dst, precopied)
                copied = self._copy_slots(src_store, dst, wanted, None)
            else:
                copied = sorted(set(precopied) | set(self._sync_keys(src_store, dst, changed)))
            step("copied", move)
            self._check_lease(lease)
            self._put_markers(src, copy, MOVED)
        self._check_lease(lease)
        self._put_markers(dst, switch, OWNED)
        step("switched", move)

        def publish(cur: SlotMap) -> SlotMap | None:
            if cur.moving is None:
                return None
            owners = list(cur.owners)
            for slot in slots:
                owners[slot] = target
            return cur.replace(owners=owners, moving=None,
                               cleanup={"shard": source, "slots": slots})  # fmt: skip

        slot_map = self._update_map(publish, fence=lease)
        if len(copy) == len(slots):  # this run copied every slot of the batch
            run.copied[source] = (slots, copied)
        step("published", move)
        return len(copied), slot_map

    def _clean(self, slot_map: SlotMap, lease: Lease, step: StepCallback, run: _Run) -> SlotMap:
        """Delete the old copies of the map's ``cleanup`` batch (only of slots
        whose marker there says ``moved``), then clear ``cleanup``: the keys
        this run copied, or (resuming another run's batch) a scan's."""
        assert slot_map.cleanup is not None
        cleanup = slot_map.cleanup
        shard_id = int(cleanup["shard"])
        slots = [int(slot) for slot in cleanup["slots"]]
        if shard_id in slot_map.shards:
            kv = self._kv(slot_map.shards[shard_id])
            marks = kv.get_many([marker_key(slot) for slot in slots])
            dead = {s for s, m in zip(slots, marks, strict=True) if m is None or m.value == MOVED}
            self._check_lease(lease)
            known = run.copied.pop(shard_id, None)
            if known is not None and known[0] == slots:
                self._delete_keys(kv, [key for key in known[1] if key_slot(key) in dead])
            else:
                self._delete_slots(kv, dead)
        slot_map = self._update_map(
            lambda cur: cur.replace(cleanup=None) if cur.cleanup == cleanup else None, fence=lease
        )
        step("cleaned", Move(shard_id, -1, slots))
        return slot_map

    def _put_markers(self, kv: KVStore, slots: Sequence[int], value: bytes) -> None:
        for chunk in _chunks(slots):
            puts = [Put(marker_key(slot), value) for slot in chunk]
            _once(lambda rid: kv.txn([], puts, rid))  # noqa: B023

    def _slot_pages(
        self, kv: KVStore, slots: set[int] | None
    ) -> Iterator[list[tuple[str, Versioned]]]:
        """Pages of the shard's own keys (not markers) whose slot is in ``slots``
        (None: every slot)."""
        for _, page in _own_pages(kv, ""):
            yield [(key, found) for key, found in page if slots is None or key_slot(key) in slots]

    def _delete_slots(self, kv: KVStore, slots: set[int]) -> None:
        """Delete every key of ``slots`` on a shard, found by a full scan."""
        if slots:
            for page in self._slot_pages(kv, slots):
                self._delete_keys(kv, [key for key, _ in page])

    def _delete_keys(self, kv: KVStore, keys: Sequence[str]) -> None:
        for chunk in _chunks(keys):
            deletes = [Delete(key) for key in chunk]
            _once(lambda rid: kv.txn([], deletes, rid))  # noqa: B023

    def _copy_slots(
        self, source: Store, target: KVStore, slots: set[int], candidates: set[str] | None
    ) -> list[str]:
        """Copy the keys of ``slots`` and return them. ``candidates``: a
        superset of the slots' keys (read with ``get_many``); None: find them
        by a full scan of the source."""
        if candidates is None:
            pages: Iterator[list[tuple[str, Versioned]]] = self._slot_pages(source.kv, slots)
        else:
            pages = self._read_keys(source.kv, sorted(candidates))
        copied: list[str] = []
        for page in pages:
            copied += self._put_found(source, target, page)
        return copied

    def _put_found(
        self, source: Store, target: KVStore, page: Sequence[tuple[str, Versioned]]
    ) -> list[str]:
        """Write ``page`` (read from ``source``) to ``target`` with each key's
        remaining TTL on the source's lease clock (a key about to expire is
        left out); return the keys written."""
        now = source.clock.now()
        puts: list[Put] = []
        for key, found in page:
            if found.expires is None:
                puts.append(Put(key, found.value))
            elif found.expires - now > 0.001:
                puts.append(Put(key, found.value, found.expires - now))
        for chunk in _chunks(puts):
            result: TxnResult = _once(lambda rid: target.txn([], chunk, rid))  # noqa: B023
            if not result.ok:  # pragma: no cover - a txn without compares always applies
                raise BackendError(f"copying {len(chunk)} keys to a shard failed")
        return [put.key for put in puts]

    def _sync_keys(self, source: Store, target: KVStore, keys: Sequence[str]) -> list[str]:
        """Make ``keys`` on the target what they are on the source (copied, or
        deleted there if absent here); return those copied."""
        copied: list[str] = []
        for chunk in _chunks(sorted(keys), SCAN_PAGE):
            found = source.kv.get_many(chunk)
            live = [(key, item) for key, item in zip(chunk, found, strict=True) if item is not None]
            copied += self._put_found(source, target, live)
            present = {key for key, _ in live}
            self._delete_keys(target, [key for key in chunk if key not in present])
        return copied

    @staticmethod
    def _read_keys(kv: KVStore, keys: list[str]) -> Iterator[list[tuple[str, Versioned]]]:
        for chunk in _chunks(keys, SCAN_PAGE):
            found = kv.get_many(chunk)
            yield [(key, item) for key, item in zip(chunk, found, strict=True) if item is not None]

    def reap(self, limit: int = 1000) -> int:
        """Run ``store.kv.reap`` on every shard (record expiries, compact the
        change feed to its newest KV_CHANGES_KEEP changes) and return how many
        keys expired. A worker's maintenance does this on its own space; call
        it periodically for shard spaces no worker runs on, so their change
        feeds stay bounded."""
        return sum(self._kv(url).reap(limit) for url in self.shards)

    def counts(self) -> dict[str, int]:
        """Keys held per shard URL (served or not; markers excluded), by a full scan."""
        out: dict[str, int] = {}
        for url in self.shards:
            out[url] = sum(len(page) for page in self._slot_pages(self._kv(url), None))
        return out

    def close(self) -> None:
        """Close the spaces this ShardedKV opened (not a coordinator Space it was given)."""
        with self._lock:
            spaces = list(self._spaces.values())
            self._spaces.clear()
        for space in spaces:
            if space is not self._coord:
                space.close()
        if self._own_coord:
            self._coord.close()
