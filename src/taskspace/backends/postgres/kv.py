"""KVStore on PostgreSQL: versioned keys, revisions from the SEQUENCE
``kv_revision``, a change feed table, request ids for retried calls.

Writes are serialised: each write first locks the existing rows of the keys
it compares or writes (in key order; the losers of a compare-and-set race on
one key are woken together by the winner's commit and fail at once, in
parallel, instead of queueing for the KV lock one by one), then takes the
space's KV lock
(``kv_lock()``, a transaction-level advisory lock: a txn whose compare fails
writes no WAL and commits nothing), so revision order is commit order. That
is what makes the feed safe to follow: a reader that saw revision r can never
be passed by a later commit of a revision below r, and a compare and the
write it guards see the same state. Then, in order: the request id is looked
up (a retry after a lost reply returns the first reply), due expiries are
recorded (each an ``expire`` change at its own revision, always those of the
keys about to be written), and the write takes one ``nextval('kv_revision')``
for all its changes. ``kv_revision`` is raised to the wall clock in
microseconds by ``bump_counters`` (schema.py), so a restore or failover never
hands a revision out twice. txn (hence put, cas, delete) and incr are one
statement each (the functions ``kv_txn`` and ``kv_incr`` of state_schema.py:
one round trip, the lock held only while the server runs it).

Durability: those two commit with ``synchronous_commit = off``, so the lock
is released at once instead of after the commit's fsync (every KV write
waiting for the fsync of the one before would cap a space at one write per
fsync). The call then waits for the WAL flush outside the lock (``_durable``:
a transaction with an xid commits synchronously, flushing the WAL up to and
past the write; the same statement wakes the waiters of the written keys,
after the commit, so no wake-up is lost) before it returns. A call that
returns has survived a crash, as with ``synchronous_commit = on``; the
difference: another client may read the write during the flush (a
millisecond or so), and a server crash in that moment loses it with the
writer never told it succeeded.

A key's version is the revision of its last write. Reads (get, scan,
changes, revision) take no lock: an expired key reads as missing at once.
Retention: ``reap`` records up to ``limit`` expiries, compacts the feed to
its newest KV_CHANGES_KEEP changes (at most COMPACT_STEP older changes per
call, whole revisions), drops expired request ids (kept REQUEST_ID_TTL_S)
and prunes expired lease grants (leases.prune_leases). Waiters of a prefix
are woken through the waiter (key ``kv:<prefix>``; a write NOTIFYs, at
commit, the prefixes of the keys it touched that someone waits on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from taskspace.backends.base import (
    KV_CHANGES_KEEP,
    REQUEST_ID_TTL_S,
    Change,
    Compare,
    Delete,
    Exists,
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
)
from taskspace.backends.postgres.clock import LEASE_NOW_SQL
from taskspace.backends.postgres.leases import prune_leases
from taskspace.errors import BackendError, Compacted, NotAnInteger

if TYPE_CHECKING:
    import psycopg

    from taskspace.backends.postgres.conn import PgConn
    from taskspace.backends.postgres.waiter import Waiter

T = TypeVar("T")
Cursor = Any  # psycopg.Cursor[Any], named loosely so this module imports without psycopg

# Expiries a write records before its own work (the rest: the next writes, reap).
EXPIRE_BATCH = 100
# Older changes one reap drops at most (beyond one revision larger than that).
COMPACT_STEP = 10_000
# SQLSTATE deadlock_detected: the transaction was rolled back whole.
DEADLOCK = "40P01"
# Expired request ids each remembered request drops (reap drops the rest).
REQUEST_PRUNE = 16
NOW = f"t AS MATERIALIZED (SELECT {LEASE_NOW_SQL} AS now)"
LIVE = "(kv.expires IS NULL OR kv.expires > t.now)"
CHANGES = "SELECT revision, key, kind, version, value FROM kv_changes"


def prefix_where(prefix: str, column: str = "key") -> tuple[str, list[Any]]:
    """A condition on ``column`` (COLLATE "C": byte order) selecting the values
    that start with ``prefix``, as a range of its index."""
    if not prefix:
        return "true", []
    end = _prefix_end(prefix)
    if end is None:
        return f"{column} >= %s AND starts_with({column}, %s)", [prefix, prefix]
    return f"{column} >= %s AND {column} < %s", [prefix, end]


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None if
    its last character cannot be incremented)."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF or 0xD7FF <= last <= 0xDFFF:
        return None
    return prefix[:-1] + chr(last + 1)


def _versioned(value: bytes, version: int, expires: float | None) -> Versioned:
    return Versioned(bytes(value), int(version), int(version), expires)


class _Request:
    """Request ids of one family (``stream`` here; ``kv.txn``/``kv.incr`` live in
    their SQL functions): replies kept REQUEST_ID_TTL_S on the lease clock, in
    the caller's transaction after it took the lock that serialises the calls
    the id may repeat."""

    def __init__(self, family: str) -> None:
        self.family = family

    def recall(self, cur: Cursor, request_id: str | None) -> Any:
        """The remembered reply (JSON), or None."""
        if not request_id:
            return None
        cur.execute(
            f"WITH {NOW} SELECT reply FROM request_ids, t"
            " WHERE family = %s AND id = %s AND expires > t.now",
            (self.family, request_id),
        )
        row = cur.fetchone()
        return None if row is None else row[0]

    def remember(self, cur: Cursor, request_id: str | None, reply: Any) -> None:
        """Keep ``reply`` for ``request_id``; drop a few expired ids on the way."""
        if not request_id:
            return
        from psycopg.types.json import Jsonb

        cur.execute(
            f"WITH {NOW} SELECT request_remember(%s, %s, %s, t.now, %s) FROM t",
            (self.family, request_id, Jsonb(reply), REQUEST_ID_TTL_S),
        )


def prune_requests(cur: Cursor, limit: int) -> None:
    """Drop up to ``limit`` expired request ids of every family."""
    cur.execute(
        f"WITH {NOW} DELETE FROM request_ids WHERE (family, id) IN"
        " (SELECT family, id FROM request_ids, t WHERE expires <= t.now"
        "  LIMIT %s FOR UPDATE SKIP LOCKED)",
        (limit,),
    )


class _Writes:
    """One write transaction: its lease clock ``now`` and the keys whose expiry
    it recorded (notified on commit)."""

    def __init__(self, now: float, expired: list[str]) -> None:
        self.now = now
        self.expired = expired


def _compare_row(c: Compare) -> tuple[str, str, int | None, bytes | None, str | None]:
    """One compare as (kind, key, version or token, value, argument) of ``kv_txn``."""
    if isinstance(c, GrantHeld):
        return ("grant", c.grant.name, c.grant.token, None, c.grant.id)
    if isinstance(c, VersionIs):
        return ("ver", c.key, c.version, None, None)
    if isinstance(c, ValueIs):
        return ("val", c.key, None, c.value, None)
    assert isinstance(c, Exists)  # check_txn let nothing else by
    return ("ex", c.key, None, None, "t" if c.exists else "f")


def _compare_args(compares: Sequence[Compare]) -> dict[str, list[Any]]:
    """The compares as the arrays ``kv_txn`` takes."""
    rows = [_compare_row(c) for c in compares]
    names = ("ck", "ckey", "cver", "cval", "carg")
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def _write_args(writes: Sequence[Write]) -> dict[str, list[Any]]:
    """The writes as the arrays ``kv_txn`` takes."""
    return {
        "wk": ["put" if isinstance(w, Put) else "del" for w in writes],
        "wkey": [w.key for w in writes],
        "wval": [w.value if isinstance(w, Put) else None for w in writes],
        "wttl": [w.ttl if isinstance(w, Put) else None for w in writes],
    }


KV_TXN_SQL = (
    "SELECT kv_txn(%(request)s, %(ck)s::text[], %(ckey)s::text[], %(cver)s::bigint[],"
    " %(cval)s::bytea[], %(carg)s::text[], %(wk)s::text[], %(wkey)s::text[],"
    " %(wval)s::bytea[], %(wttl)s::float8[], %(channel)s, %(ttl)s)"
)


class PgKV:
    """Versioned keys (see base.KVStore and the module docstring)."""

    def __init__(self, conn: PgConn, waiter: Waiter) -> None:
        self._c = conn
        self._waiter = waiter
        self._channel = waiter.channel

    # -- writes done in Python (touch, reap, recording expiries) --------------------

    def _write(
        self,
        what: str,
        keys: Sequence[str],
        fn: Callable[[Cursor, _Writes], T],
        expire_limit: int = EXPIRE_BATCH,
    ) -> T:
        """``fn`` in a write transaction: the KV lock, then the due expiries
        (up to ``expire_limit``, and those of ``keys``) recorded and notified."""

        def body(cur: psycopg.Cursor[Any]) -> T:
            # The rows first, then the KV lock, as every KV writer (state_schema.py).
            cur.execute("SELECT kv_lock_rows(%s::text[], '{}', '{}')", (list(keys),))
            cur.execute(
                "WITH t AS MATERIALIZED (SELECT kv_lock() AS now)"
                " SELECT t.now, kv_expire_due(t.now, %s::text[], %s) FROM t",
                (list(keys), expire_limit),
            )
            now, expired = cur.fetchone() or (0.0, [])
            w = _Writes(float(now), list(expired))
            out = fn(cur, w)
            if w.expired:
                cur.execute("SELECT kv_notify(%s, %s::text[])", (self._channel, w.expired))
            return out

        return self._c.run(body, what)

    # -- reads ------------------------------------------------------------------------

    def get(self, key: str) -> Versioned | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        for key in keys:
            check_key(key)
        if not keys:
            return []
        rows = self._c.read(
            f"WITH {NOW} SELECT key, value, version, expires FROM kv, t"
            f" WHERE key = ANY(%s::text[]) AND {LIVE}",
            (list(dict.fromkeys(keys)),),
        )
        found = {str(k): _versioned(v, ver, exp) for k, v, ver, exp in rows}
        return [found.get(key) for key in keys]

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        check_limit(limit)
        where, params = prefix_where(prefix)
        if after_key is not None:
            where += " AND key > %s"
            params.append(after_key)
        rows = self._c.read(
            f"WITH {NOW} SELECT key, value, version, expires FROM kv, t"
            f" WHERE {where} AND {LIVE} ORDER BY key LIMIT %s",
            (*params, limit),
        )
        return [(str(k), _versioned(v, ver, exp)) for k, v, ver, exp in rows]

    def revision(self) -> int:
        return int(self._c.read("SELECT COALESCE(max(revision), 0) FROM kv_changes")[0][0])

    # -- writes ---------------------------------------------------------------------

    def _txn_call(
        self, compares: Sequence[Compare], writes: Sequence[Write], request_id: str | None
    ) -> dict[str, Any]:
        params = {
            "request": request_id or "",
            **_compare_args(compares),
            **_write_args(writes),
            "channel": self._channel,
            "ttl": REQUEST_ID_TTL_S,
        }
        reply: dict[str, Any] = self._call(KV_TXN_SQL, params)
        if reply["ok"]:
            self._durable([w.key for w in writes])
        return reply

    def _call(self, sql: str, params: Any) -> Any:
        """The one value of a KV function call. A deadlock (a key created while
        another writer locked it and waits for the KV lock: rare) rolled the
        call back whole, so it is run once more."""
        for attempt in range(2):
            try:
                return self._c.execute(sql, params)[0][0]
            except BackendError as exc:
                if attempt or getattr(exc.__cause__, "sqlstate", None) != DEADLOCK:
                    raise
        raise AssertionError("unreachable")

    def _durable(self, keys: Sequence[str]) -> None:
        """After a write committed: wait until it is flushed to the WAL (a
        transaction that takes an xid commits synchronously, and its flush
        covers every earlier commit record), and wake the waiters of ``keys``'
        prefixes. Checked after the commit, so a waiter that registered
        before this check is woken and one that registered after it sees the
        write in its own check: no wake-up is lost."""
        self._c.execute(
            "SELECT pg_current_xact_id(), kv_notify(%s, %s::text[])", (self._channel, list(keys))
        )

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        written = self._put([], key, value, ttl)
        assert written is not None  # no compares: always written
        return written

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        return self._put([VersionIs(key, expected_version)], key, value, ttl)

    def _put(
        self, compares: Sequence[Compare], key: str, value: bytes, ttl: float | None
    ) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        reply = self._txn_call(compares, [Put(key, value, ttl)], None)
        if not reply["ok"]:
            return None
        expires = None if ttl is None else float(reply["now"]) + ttl
        return _versioned(value, int(reply["revision"]), expires)

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        check_key(key)
        check_ttl(ttl)
        check_delta(delta)
        reply = self._call(
            "SELECT kv_incr(%s, %s, %s, %s, %s, %s)",
            (key, delta, ttl, request_id or "", self._channel, REQUEST_ID_TTL_S),
        )
        if "nan" in reply:
            raise NotAnInteger(
                f"incr of {key!r}: its value is not a decimal integer in the 64-bit range,"
                f" or adding {delta} would leave that range"
            )
        self._durable([key])
        return int(reply["value"])

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        check_key(key)
        compare: Compare = (
            Exists(key) if expected_version is None else VersionIs(key, expected_version)
        )
        return self.txn([compare], [Delete(key)]).ok

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)

        def fn(cur: Cursor, w: _Writes) -> Versioned | None:
            expires = None if ttl is None else w.now + ttl
            cur.execute(
                "UPDATE kv SET expires = %s WHERE key = %s AND (expires IS NULL OR expires > %s)"
                " RETURNING value, version",
                (expires, key, w.now),
            )
            row = cur.fetchone()
            return None if row is None else _versioned(row[0], row[1], expires)

        return self._write("kv.touch", [key], fn)

    def txn(
        self,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        request_id: str | None = None,
    ) -> TxnResult:
        check_txn(compares, writes)
        reply = self._txn_call(compares, writes, request_id)
        revision = int(reply["revision"])
        if not reply["ok"]:
            return TxnResult(False, revision, failed=int(reply["failed"]))
        puts = sum(1 for w in writes if isinstance(w, Put))
        return TxnResult(True, revision, (revision,) * puts)

    # -- the change feed ----------------------------------------------------------------

    def _expiry_due(self, prefix: str = "") -> bool:
        where, params = prefix_where(prefix)
        rows = self._c.read(
            f"WITH {NOW} SELECT 1 FROM kv, t WHERE kv.expires <= t.now AND {where} LIMIT 1",
            params,
        )
        return bool(rows)

    def _record_expiries(self) -> None:
        if self._expiry_due():
            self._write("kv.changes (recording expiries)", [], lambda cur, w: None)

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        check_limit(limit)
        self._record_expiries()
        where, params = prefix_where(prefix)
        rows = self._c.read(
            f"{CHANGES} WHERE revision > %s AND {where} ORDER BY revision, key LIMIT %s",
            (after_revision, *params, limit + 1),
        )
        if len(rows) > limit:
            last = rows[limit - 1][0]
            if rows[limit][0] != last:
                rows = rows[:limit]  # the limit falls between two revisions
            elif whole := [row for row in rows[:limit] if row[0] != last]:
                rows = whole  # end before the revision the limit would split
            else:  # one revision alone fills the page: it comes whole
                rows = self._c.read(
                    f"{CHANGES} WHERE revision = %s AND {where} ORDER BY key", (last, *params)
                )
        # Read after the rows: the compaction point only grows, so if it is not
        # above after_revision now, nothing the rows should hold was dropped.
        compacted, current = self._c.read(
            "SELECT compacted, (SELECT COALESCE(max(revision), 0) FROM kv_changes)"
            " FROM kv_state WHERE id = 1"
        )[0]
        if after_revision < int(compacted):
            raise Compacted(
                f"the KV change feed no longer holds changes after revision {after_revision}"
                f" (compacted up to {compacted}); re-list with scan and follow from {current}",
                revision=int(current),
                compacted=int(compacted),
            )
        return [
            Change(int(r), str(k), kind, int(v), None if val is None else bytes(val))
            for r, k, kind, v, val in rows
        ]

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        """As the contract: a write of a key of ``prefix`` wakes it through the
        waiter (key ``kv:<prefix>``); a key of the prefix whose TTL passed ends
        it (``changes`` then records the expiry)."""
        where, params = prefix_where(prefix)

        def ready() -> float | None:
            found, compacted, until = self._c.read(
                f"WITH {NOW} SELECT"
                f" EXISTS (SELECT 1 FROM kv_changes WHERE revision > %s AND {where}),"
                " (SELECT compacted FROM kv_state WHERE id = 1),"
                f" (SELECT min(kv.expires) - min(t.now) FROM kv, t WHERE {where}"
                "  AND kv.expires IS NOT NULL) FROM t",
                (after_revision, *params, *params),
            )[0]
            if found or after_revision < int(compacted):
                return None  # a change, or changes() raises Compacted
            if until is None:
                return timeout
            return max(0.0, float(until)) or None

        self._waiter.until([f"kv:{prefix}"], ready, timeout)

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)

        def fn(cur: Cursor, w: _Writes) -> int:
            self._compact(cur)
            prune_requests(cur, limit)
            prune_leases(cur, w.now)
            return len(w.expired)

        return self._write("kv.reap", [], fn, expire_limit=limit)

    @staticmethod
    def _compact(cur: Cursor) -> None:
        """Drop the changes older than the newest KV_CHANGES_KEEP (whole revisions,
        at most about COMPACT_STEP per call) and raise the compaction point."""
        cur.execute(
            "SELECT revision FROM kv_changes ORDER BY revision DESC, key DESC LIMIT 1 OFFSET %s",
            (KV_CHANGES_KEEP,),
        )
        row = cur.fetchone()
        if row is None:
            return
        point = int(row[0])
        cur.execute(
            "SELECT revision FROM kv_changes WHERE revision <= %s ORDER BY revision, key"
            " LIMIT 1 OFFSET %s",
            (point, COMPACT_STEP),
        )
        step = cur.fetchone()
        below = "revision <= %s"
        if step is not None:
            cur.execute("SELECT 1 FROM kv_changes WHERE revision < %s LIMIT 1", (step[0],))
            if cur.fetchone() is not None:
                point, below = int(step[0]), "revision < %s"
        cur.execute(
            f"WITH d AS (DELETE FROM kv_changes WHERE {below} RETURNING revision)"
            " UPDATE kv_state SET compacted = GREATEST(compacted, (SELECT max(revision) FROM d))"
            " WHERE id = 1 AND EXISTS (SELECT 1 FROM d)",
            (point,),
        )
