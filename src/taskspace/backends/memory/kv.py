"""KVStore of the in-process backend.

Guarantees (as the contract): one revision counter per space; every write
(put, cas, incr, delete, a txn, an expiry) takes the next revision and a
key's ``version`` is the revision of its last write, so it is never reused
(also across delete and re-create); an expired key reads as missing at once,
and its expiry is recorded in the change feed (with its own revision) by the
first ``changes``, ``wait``, write or ``reap`` after its TTL passed; ``reap``
compacts the feed to the newest KV_CHANGES_KEEP changes and asking below the
compaction point raises Compacted. ``txn``/``incr`` remember a ``request_id``
for REQUEST_ID_TTL_S and answer a repeat with the first result.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

from taskspace.backends.base import (
    KV_CHANGES_KEEP,
    Change,
    Compare,
    GrantHeld,
    Put,
    TxnResult,
    ValueIs,
    Versioned,
    VersionIs,
    Write,
)
from taskspace.backends.checks import (
    check_delta,
    check_key,
    check_limit,
    check_ttl,
    check_txn,
    in_int64,
    is_integer,
)
from taskspace.backends.memory.state import MemoryState
from taskspace.errors import Compacted, NotAnInteger


def _expires(now: float, ttl: float | None) -> float | None:
    return None if ttl is None else now + ttl


class MemoryKV:
    """Versioned keys over the space's ``kv`` table, a sorted key index (for
    ``scan``), an expiry heap (for ``reap``) and the change feed."""

    def __init__(self, state: MemoryState) -> None:
        self._s = state

    # -- helpers (hold cond) --------------------------------------------------

    def _live(self, key: str, now: float) -> Versioned | None:
        item = self._s.kv.get(key)
        if item is None or (item.expires is not None and item.expires <= now):
            return None
        return item

    def _expire_due(self, now: float, limit: float = math.inf) -> int:
        """Record the expiry of up to ``limit`` keys whose TTL passed."""
        s = self._s
        n = 0
        while n < limit and s.kv_expiry and s.kv_expiry[0][0] <= now:
            expires, key, version = heapq.heappop(s.kv_expiry)
            item = s.kv.get(key)
            # Stale entry: the key was rewritten, deleted or touched since.
            if item is None or item.version != version or item.expires != expires:
                continue
            self._remove(key)
            s.revision += 1
            s.changes.append(Change(s.revision, key, "expire", version))
            n += 1
        if n:
            s.cond.notify_all()
        return n

    def _remove(self, key: str) -> None:
        s = self._s
        del s.kv[key]
        i = bisect.bisect_left(s.kv_keys, key)
        del s.kv_keys[i]

    def _write(self, key: str, value: bytes, expires: float | None, rev: int) -> Versioned:
        s = self._s
        if key not in s.kv:
            bisect.insort(s.kv_keys, key)
        item = Versioned(value, rev, rev, expires)
        s.kv[key] = item
        if expires is not None:
            heapq.heappush(s.kv_expiry, (expires, key, rev))
        s.changes.append(Change(rev, key, "put", rev, value))
        return item

    def _delete(self, key: str, rev: int) -> None:
        s = self._s
        version = s.kv[key].version
        self._remove(key)
        s.changes.append(Change(rev, key, "delete", version))

    def _next_revision(self) -> int:
        self._s.revision += 1
        self._s.cond.notify_all()
        return self._s.revision

    # -- reads --------------------------------------------------------------

    def get(self, key: str) -> Versioned | None:
        check_key(key)
        with self._s.cond:
            return self._live(key, self._s.clock.now())

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        for key in keys:
            check_key(key)
        with self._s.cond:
            now = self._s.clock.now()
            return [self._live(key, now) for key in keys]

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        check_limit(limit)
        s = self._s
        out: list[tuple[str, Versioned]] = []
        with s.cond:
            now = s.clock.now()
            if after_key is not None and after_key >= prefix:
                i = bisect.bisect_right(s.kv_keys, after_key)
            else:
                i = bisect.bisect_left(s.kv_keys, prefix)
            keys = s.kv_keys
            while i < len(keys) and len(out) < limit and keys[i].startswith(prefix):
                item = self._live(keys[i], now)
                if item is not None:
                    out.append((keys[i], item))
                i += 1
        return out

    def revision(self) -> int:
        with self._s.cond:
            return self._s.revision

    # -- writes -------------------------------------------------------------

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        check_key(key)
        check_ttl(ttl)
        s = self._s
        with s.cond:
            now = s.clock.now()
            self._expire_due(now)
            return self._write(key, value, _expires(now, ttl), self._next_revision())

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        s = self._s
        with s.cond:
            now = s.clock.now()
            self._expire_due(now)
            item = self._live(key, now)
            if (item.version if item else None) != expected_version:
                return None
            return self._write(key, value, _expires(now, ttl), self._next_revision())

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        check_key(key)
        check_ttl(ttl)
        check_delta(delta)
        s = self._s
        with s.cond:
            now = s.clock.now()
            seen, first = s.recall("incr", request_id, now)
            if seen:
                return int(first)
            self._expire_due(now)
            item = self._live(key, now)
            if item is not None and not is_integer(item.value):
                raise NotAnInteger(
                    f"incr: key {key!r} holds {item.value[:40]!r}, not a decimal integer"
                )
            result = (int(item.value) if item else 0) + delta
            if not in_int64(result):
                raise NotAnInteger(f"incr: key {key!r} would hold {result}, beyond 64 bits")
            expires = item.expires if item else _expires(now, ttl)
            self._write(key, str(result).encode(), expires, self._next_revision())
            s.remember("incr", request_id, now, result)
            return result

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        check_key(key)
        s = self._s
        with s.cond:
            now = s.clock.now()
            self._expire_due(now)
            item = self._live(key, now)
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            self._delete(key, self._next_revision())
            return True

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        s = self._s
        with s.cond:
            now = s.clock.now()
            item = self._live(key, now)
            if item is None:
                return None
            expires = _expires(now, ttl)
            item = Versioned(item.value, item.version, item.revision, expires)
            s.kv[key] = item
            if expires is not None:
                heapq.heappush(s.kv_expiry, (expires, key, item.version))
            s.cond.notify_all()  # a kv.wait re-computes when the key may expire
            return item

    def txn(
        self,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        request_id: str | None = None,
    ) -> TxnResult:
        """As the contract. A txn whose writes change nothing (only deletes of
        absent keys, or no writes) succeeds without taking a revision."""
        check_txn(compares, writes)
        s = self._s
        with s.cond:
            now = s.clock.now()
            seen, first = s.recall("txn", request_id, now)
            if seen:
                assert isinstance(first, TxnResult)
                return first
            self._expire_due(now)
            failed = next((i for i, c in enumerate(compares) if not self._holds(c, now)), None)
            if failed is not None:
                result = TxnResult(ok=False, revision=s.revision, failed=failed)
            else:
                result = self._apply(writes, now)
            s.remember("txn", request_id, now, result)
            return result

    def _holds(self, compare: Compare, now: float) -> bool:
        if isinstance(compare, GrantHeld):
            return self._s.grant_current(compare.grant, now) is not None
        item = self._live(compare.key, now)
        if isinstance(compare, VersionIs):
            return (item.version if item else None) == compare.version
        if isinstance(compare, ValueIs):
            return item is not None and item.value == compare.value
        return (item is not None) == compare.exists

    def _apply(self, writes: Sequence[Write], now: float) -> TxnResult:
        s = self._s
        effective = [w for w in writes if isinstance(w, Put) or self._live(w.key, now)]
        if not effective:
            return TxnResult(ok=True, revision=s.revision)
        rev = self._next_revision()
        versions: list[int] = []
        for write in effective:
            if isinstance(write, Put):
                self._write(write.key, write.value, _expires(now, write.ttl), rev)
                versions.append(rev)
            else:
                self._delete(write.key, rev)
        return TxnResult(ok=True, revision=rev, versions=tuple(versions))

    # -- change feed ----------------------------------------------------------

    def _check_compacted(self, after_revision: int) -> None:
        s = self._s
        if s.compacted > after_revision:
            raise Compacted(
                f"KV changes after revision {after_revision} were compacted (up to"
                f" revision {s.compacted}); re-list with scan and follow from {s.revision}",
                revision=s.revision,
                compacted=s.compacted,
            )

    def _first_after(self, after_revision: int) -> int:
        return bisect.bisect_right(self._s.changes, after_revision, key=lambda c: c.revision)

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        check_limit(limit)
        s = self._s
        out: list[Change] = []
        with s.cond:
            self._expire_due(s.clock.now())
            self._check_compacted(after_revision)
            for change in s.changes[self._first_after(after_revision) :]:
                if len(out) >= limit and change.revision != out[-1].revision:
                    break  # the page is full and its last revision complete
                if change.key.startswith(prefix):
                    out.append(change)
        if len(out) > limit and out[0].revision != out[-1].revision:
            # A page never splits a revision: the last one, which took the page
            # past the limit, starts the next page (unless it is the only one).
            last = out[-1].revision
            out = [c for c in out if c.revision != last]
        return out

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        """Return once a change of ``prefix`` above ``after_revision`` exists
        (or the feed was compacted past it), or after ``timeout``; a key of the
        prefix expiring counts (with a ManualClock, ``advance`` wakes the wait)."""
        s = self._s
        seen = after_revision

        def ready(now: float) -> float | None:
            nonlocal seen
            self._expire_due(now)
            if s.compacted > after_revision:
                return None
            for change in s.changes[self._first_after(seen) :]:
                if change.key.startswith(prefix):
                    return None
            seen = s.revision
            return min((e for e, k, _ in s.kv_expiry if k.startswith(prefix)), default=math.inf)

        with s.cond:
            s.wait_for(ready, timeout)

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)
        s = self._s
        with s.cond:
            expired = self._expire_due(s.clock.now(), limit)
            drop = len(s.changes) - KV_CHANGES_KEEP
            if drop > 0:
                s.compacted = s.changes[drop - 1].revision
                del s.changes[:drop]
            return expired
