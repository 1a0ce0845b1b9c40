"""KVStore of the SQLite backend: versioned keys, one revision counter per space
(a row of ``meta``) and a change feed (``kv_changes``). Request ids are ignored:
a local transaction's reply cannot be lost (a driver error means it did not
commit), so a call is never retried after it took effect."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from taskspace.backends.base import (
    KV_CHANGES_KEEP,
    Change,
    Compare,
    Delete,
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
from taskspace.backends.sqlite.base import SQLiteConn
from taskspace.backends.sqlite.waiter import Waiter
from taskspace.errors import Compacted, NotAnInteger

# Expiries a single write records before its own work (the rest: the next ones).
EXPIRE_BATCH = 1000
LIVE = "(expires IS NULL OR expires > ?)"
CHANGES = "SELECT revision, key, kind, version, value FROM kv_changes"


def prefix_range(prefix: str, column: str = "key") -> tuple[str, list[object]]:
    """A WHERE clause selecting ``column`` values that start with ``prefix`` as a
    range of the key index (SQLite compares TEXT as UTF-8 bytes, which sorts as
    code points)."""
    if not prefix:
        return "1", []
    last = ord(prefix[-1])
    if last < 0x10FFFF and not 0xD7FF <= last <= 0xDFFF:
        return f"{column} >= ? AND {column} < ?", [prefix, prefix[:-1] + chr(last + 1)]
    return f"{column} >= ? AND substr({column}, 1, ?) = ?", [prefix, len(prefix), prefix]


def _versioned(value: bytes, version: int, expires: float | None) -> Versioned:
    return Versioned(value, int(version), int(version), expires)


class SQLiteKV:
    """Every write takes the next revision and appends its changes to the feed in
    the same transaction; a key's version is the revision of its last write."""

    def __init__(self, conn: SQLiteConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter

    # -- helpers (inside a write transaction) --------------------------------------

    def _begin(self, db: sqlite3.Connection, keys: Sequence[str] = ()) -> float:
        """Record the expiries that are due (a batch of them, and always those of
        ``keys``, which the caller is about to write), then return now."""
        now = self._c.clock.now()
        if self._expire(db, now, EXPIRE_BATCH) < EXPIRE_BATCH:
            return now  # every due expiry is recorded, those of ``keys`` too
        for key in keys:
            row = db.execute(
                "SELECT key, version FROM kv WHERE key = ? AND expires <= ?", (key, now)
            ).fetchone()
            if row is not None:
                self._record(db, [row])
        return now

    def _expire(self, db: sqlite3.Connection, now: float, limit: int) -> int:
        rows = db.execute(
            "SELECT key, version FROM kv WHERE expires <= ? ORDER BY expires LIMIT ?",
            (now, limit),
        ).fetchall()
        self._record(db, rows)
        return len(rows)

    def _record(self, db: sqlite3.Connection, rows: Sequence[tuple[str, int]]) -> None:
        """Delete expired keys, each recorded as an ``expire`` at a revision of its own."""
        if not rows:
            return
        revision = int(self._c.meta(db, "revision", 0))
        for key, version in rows:
            revision += 1
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            db.execute(
                "INSERT INTO kv_changes VALUES (?, ?, 'expire', ?, NULL)", (revision, key, version)
            )
        self._c.set_meta(db, "revision", revision)

    def _expiry_due(self) -> bool:
        """Whether a key's TTL passed unrecorded (one read of the expiry index)."""
        sql = "SELECT 1 FROM kv WHERE expires <= ? LIMIT 1"
        return bool(self._c.read(sql, (self._c.clock.now(),)))

    def _record_expiries(self) -> None:
        if self._expiry_due():
            with self._c.write() as db:
                self._expire(db, self._c.clock.now(), EXPIRE_BATCH)

    @staticmethod
    def _live(db: sqlite3.Connection, key: str, now: float) -> Versioned | None:
        row = db.execute(
            f"SELECT value, version, expires FROM kv WHERE key = ? AND {LIVE}", (key, now)
        ).fetchone()
        return None if row is None else _versioned(*row)

    def _next_revision(self, db: sqlite3.Connection) -> int:
        return self._c.bump(db, "revision")

    @staticmethod
    def _set(
        db: sqlite3.Connection, key: str, value: bytes, revision: int, expires: float | None
    ) -> None:
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, revision, expires))
        db.execute(
            "INSERT INTO kv_changes VALUES (?, ?, 'put', ?, ?)", (revision, key, revision, value)
        )

    @staticmethod
    def _remove(db: sqlite3.Connection, key: str, version: int, revision: int) -> None:
        db.execute("DELETE FROM kv WHERE key = ?", (key,))
        db.execute(
            "INSERT INTO kv_changes VALUES (?, ?, 'delete', ?, NULL)", (revision, key, version)
        )

    # -- reads -----------------------------------------------------------------------

    def get(self, key: str) -> Versioned | None:
        check_key(key)
        rows = self._c.read(
            f"SELECT value, version, expires FROM kv WHERE key = ? AND {LIVE}",
            (key, self._c.clock.now()),
        )
        return _versioned(*rows[0]) if rows else None

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        for key in keys:
            check_key(key)
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Versioned] = {}
        now = self._c.clock.now()
        for start in range(0, len(wanted), 500):  # below SQLite's parameter limit
            part = wanted[start : start + 500]
            rows = self._c.read(
                f"SELECT key, value, version, expires FROM kv"
                f" WHERE key IN ({','.join('?' * len(part))}) AND {LIVE}",
                (*part, now),
            )
            found.update((key, _versioned(v, ver, exp)) for key, v, ver, exp in rows)
        return [found.get(key) for key in keys]

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        check_limit(limit)
        where, params = prefix_range(prefix)
        if after_key is not None:
            where += " AND key > ?"
            params.append(after_key)
        rows = self._c.read(
            f"SELECT key, value, version, expires FROM kv WHERE {where} AND {LIVE}"
            " ORDER BY key LIMIT ?",
            (*params, self._c.clock.now(), limit),
        )
        return [(k, _versioned(v, ver, exp)) for k, v, ver, exp in rows]

    def revision(self) -> int:
        rows = self._c.read("SELECT value FROM meta WHERE key = 'revision'")
        return int(rows[0][0]) if rows else 0

    # -- writes ------------------------------------------------------------------------

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        check_key(key)
        check_ttl(ttl)
        with self._c.write() as db:
            now = self._begin(db, [key])
            revision = self._next_revision(db)
            expires = None if ttl is None else now + ttl
            self._set(db, key, value, revision, expires)
            return _versioned(value, revision, expires)

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        with self._c.write() as db:
            now = self._begin(db, [key])
            item = self._live(db, key, now)
            if (item.version if item else None) != expected_version:
                return None
            revision = self._next_revision(db)
            expires = None if ttl is None else now + ttl
            self._set(db, key, value, revision, expires)
            return _versioned(value, revision, expires)

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        check_key(key)
        check_ttl(ttl)
        check_delta(delta)
        with self._c.write() as db:
            now = self._begin(db, [key])
            item = self._live(db, key, now)
            if item is not None and not is_integer(item.value):
                raise NotAnInteger(
                    f"incr of {key!r}: its value {item.value[:40]!r} is not a decimal integer"
                    " in the 64-bit range"
                )
            result = (int(item.value) if item else 0) + delta
            if not in_int64(result):
                raise NotAnInteger(f"incr of {key!r}: the result {result} is beyond 64 bits")
            expires = item.expires if item else (None if ttl is None else now + ttl)
            self._set(db, key, str(result).encode(), self._next_revision(db), expires)
            return result

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        check_key(key)
        with self._c.write() as db:
            item = self._live(db, key, self._begin(db, [key]))
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            self._remove(db, key, item.version, self._next_revision(db))
            return True

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        with self._c.write() as db:
            now = self._begin(db, [key])
            item = self._live(db, key, now)
            if item is None:
                return None
            expires = None if ttl is None else now + ttl
            db.execute("UPDATE kv SET expires = ? WHERE key = ?", (expires, key))
            return Versioned(item.value, item.version, item.revision, expires)

    def txn(
        self,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        request_id: str | None = None,
    ) -> TxnResult:
        check_txn(compares, writes)
        keys = [w.key for w in writes]
        with self._c.write() as db:
            return self._txn(db, compares, writes, self._begin(db, keys))

    def _txn(
        self,
        db: sqlite3.Connection,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        now: float,
    ) -> TxnResult:
        for i, compare in enumerate(compares):
            if not self._holds(db, compare, now):
                return TxnResult(False, int(self._c.meta(db, "revision", 0)), failed=i)
        live = {w.key: self._live(db, w.key, now) for w in writes}
        if not any(isinstance(w, Put) or live[w.key] is not None for w in writes):
            return TxnResult(True, int(self._c.meta(db, "revision", 0)))
        revision = self._next_revision(db)
        versions = []
        for write in writes:
            if isinstance(write, Put):
                expires = None if write.ttl is None else now + write.ttl
                self._set(db, write.key, write.value, revision, expires)
                versions.append(revision)
            elif isinstance(write, Delete) and (item := live[write.key]) is not None:
                self._remove(db, write.key, item.version, revision)
        return TxnResult(True, revision, tuple(versions))

    def _holds(self, db: sqlite3.Connection, compare: Compare, now: float) -> bool:
        if isinstance(compare, GrantHeld):
            g = compare.grant
            row = db.execute(
                "SELECT 1 FROM lease_grants WHERE id = ? AND token = ? AND name = ?"
                " AND expires > ?",
                (g.id, g.token, g.name, now),
            ).fetchone()
            return row is not None
        item = self._live(db, compare.key, now)
        if isinstance(compare, VersionIs):
            return (item.version if item else None) == compare.version
        if isinstance(compare, ValueIs):
            return item is not None and item.value == compare.value
        return (item is not None) == compare.exists  # an Exists: check_txn let nothing else by

    # -- the change feed ---------------------------------------------------------------

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        check_limit(limit)
        self._record_expiries()
        where, params = prefix_range(prefix)
        sql = f"{CHANGES} WHERE revision > ? AND {where} ORDER BY revision, key LIMIT ?"
        rows = self._c.read(sql, (after_revision, *params, limit + 1))
        if len(rows) > limit and rows[limit][0] != rows[limit - 1][0]:
            rows = rows[:limit]  # the limit falls between two revisions
        elif len(rows) > limit:
            # The limit would split a txn's changes (the next page starts after a
            # revision): end before that revision, unless it is the only one,
            # which is then returned whole.
            last = rows[limit - 1][0]
            whole = [row for row in rows[:limit] if row[0] != last]
            if whole:
                rows = whole
            else:
                sql = f"{CHANGES} WHERE revision = ? AND {where} ORDER BY key"
                rows = self._c.read(sql, (last, *params))
        # Read after the rows: the compaction point only grows, so if it is not
        # above after_revision now, nothing the rows should hold was dropped.
        compacted, current = self._points()
        if after_revision < compacted:
            raise Compacted(
                f"the KV change feed no longer holds changes after revision {after_revision}"
                f" (compacted up to {compacted}); re-list with scan and follow from {current}",
                revision=current,
                compacted=compacted,
            )
        return [Change(int(r), k, kind, int(v), val) for r, k, kind, v, val in rows]

    def _points(self) -> tuple[int, int]:
        rows = dict(
            self._c.read("SELECT key, value FROM meta WHERE key IN ('compacted', 'revision')")
        )
        return int(rows.get("compacted", 0)), int(rows.get("revision", 0))

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        """As the contract; only reads: a key of ``prefix`` whose TTL passed ends
        the wait (a change may exist) and ``changes`` records its expiry, so a
        wait never queues for the write lock behind another writer."""
        where, params = prefix_range(prefix)

        def ready() -> float | None:
            found = self._c.read(
                f"SELECT 1 FROM kv_changes WHERE revision > ? AND {where} LIMIT 1",
                (after_revision, *params),
            )
            if found or after_revision < self._points()[0]:
                return None  # a change, or changes() raises Compacted
            earliest = self._c.read(
                f"SELECT MIN(expires) FROM kv WHERE {where} AND expires IS NOT NULL", params
            )[0][0]
            if earliest is None:
                return timeout
            return max(0.0, float(earliest) - self._c.clock.now()) or None

        self._waiter.until(ready, timeout)

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)
        with self._c.write() as db:
            now = self._c.clock.now()
            expired = self._expire(db, now, limit)
            self._compact(db)
            return expired

    def _compact(self, db: sqlite3.Connection) -> None:
        """Drop the changes older than the newest KV_CHANGES_KEEP (whole revisions:
        a txn's changes go together) and remember the compaction point."""
        row = db.execute(
            "SELECT revision FROM kv_changes ORDER BY revision DESC, key DESC LIMIT 1 OFFSET ?",
            (KV_CHANGES_KEEP,),
        ).fetchone()
        if row is None:
            return
        point = int(row[0])
        db.execute("DELETE FROM kv_changes WHERE revision <= ?", (point,))
        if point > int(self._c.meta(db, "compacted", 0)):
            self._c.set_meta(db, "compacted", point)
