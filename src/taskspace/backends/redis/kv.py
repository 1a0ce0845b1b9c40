"""KVStore on Redis: versioned keys, one revision per space, a change feed.

Every write is one Lua script (``lua/kv_*.lua`` with the library
``lua/_kv.lua``, which lists the keys). Revisions (hence versions) are
advanced like fencing tokens, ``max(last + 1, server wall clock in µs)``: never
handed out twice, also across a failover that lost the last writes, and not
dense. Retention of each key family (under
the space prefix P):

- ``kv:<key>``, ``kvidx``, ``kvexp``: one hash and two index entries per live
  key. A key whose TTL passed reads as missing at once and is deleted (its
  expiry logged) by the next write, ``changes``, ``wait`` or ``reap``.
- ``kvlog`` (the change feed, a Redis stream with ids ``<revision>-<n>``):
  ``reap`` compacts it to the newest KV_CHANGES_KEEP changes (at most
  COMPACT_STEP dropped per call, or one whole older revision larger than
  that), recording the newest dropped revision in ``kvcompact``.
- ``kvreq``/``kvincr`` (+``exp``): request ids of txn/incr with their reply,
  pruned after REQUEST_ID_TTL_S (a few per call) and capped at 100,000.
- ``kvwaiters`` (waiter and prefix -> end of its wait) and ``kvw:<waiter>``
  (its wake list): a matching write removes the registration and pushes one
  token; both expire within seconds of the wait.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

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
from taskspace.backends.checks import check_delta, check_key, check_limit, check_ttl, check_txn
from taskspace.backends.redis.conn import RedisConnection
from taskspace.backends.redis.leases import pop_wake
from taskspace.errors import Compacted, NotAnInteger

# Feed entries one changes/wait script reads before handing back a cursor.
SCAN_BUDGET = 2000
# Feed entries one reap drops at most.
COMPACT_STEP = 10_000
# One BLPOP of a wait lasts at most this long (below conn.READ_TIMEOUT_S).
WAIT_STEP_S = 0.5
# Waits remember how far they scanned the feed for this many (prefix, revision) pairs.
SCANNED_MAX = 256


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _versioned(row: Sequence[bytes]) -> Versioned:
    value, version, expires = row
    rev = int(version)
    return Versioned(value, rev, rev, float(expires) if expires else None)


def _compare_args(c: Compare) -> list[Any]:
    if isinstance(c, VersionIs):
        return ["ver", c.key, "" if c.version is None else int(c.version), ""]
    if isinstance(c, ValueIs):
        return ["val", c.key, c.value, ""]
    if isinstance(c, Exists):
        return ["ex", c.key, int(bool(c.exists)), ""]
    assert isinstance(c, GrantHeld)
    g = c.grant  # a GrantHeld: check_txn let nothing else through
    return ["grant", g.name, g.id, g.token]


def _write_args(writes: Sequence[Write]) -> list[Any]:
    args: list[Any] = []
    for w in writes:
        if isinstance(w, Put):
            args += ["put", w.key, w.value, _number(w.ttl)]
        else:
            args += ["del", w.key, "", ""]
    return args


def _whole_revisions(page: list[Change], limit: int) -> list[Change]:
    """``page`` (whole revisions, only its last one may take it past ``limit``)
    without that last revision when it went past ``limit`` and is not the only one."""
    if len(page) <= limit or page[0].revision == page[-1].revision:
        return page
    last = page[-1].revision
    return [c for c in page if c.revision != last]


class RedisKV:
    """Versioned keys (see base.KVStore and the module docstring)."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        # (prefix, after_revision) -> the feed id a wait scanned up to.
        self._scanned: dict[tuple[str, int], str] = {}

    def _run_txn(self, args: Sequence[Any]) -> Any:
        return self._conn.run("kv_txn", args)

    # -- reads ----------------------------------------------------------------

    def get(self, key: str) -> Versioned | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Versioned | None]:
        for key in keys:
            check_key(key)
        if not keys:
            return []
        rows = self._conn.run("kv_get", list(keys), read=True)
        return [None if row is None else _versioned(row) for row in rows]

    def scan(
        self, prefix: str, after_key: str | None = None, limit: int = 1000
    ) -> list[tuple[str, Versioned]]:
        check_limit(limit)
        out: list[tuple[str, Versioned]] = []
        # Python's str order is the byte order of UTF-8, as ZRANGEBYLEX's (Lua's
        # string comparison follows the server's locale: not used for this).
        cursor = after_key if after_key is not None and after_key >= prefix else ""
        while len(out) < limit:
            rows, cursor_b = self._conn.run(
                "kv_scan", [prefix, cursor, limit - len(out)], read=True
            )
            out += [(row[0].decode(), _versioned(row[1:])) for row in rows]
            if not cursor_b:
                break
            cursor = cursor_b.decode()
        return out

    def revision(self) -> int:
        conn = self._conn
        return int(conn.call(lambda: conn.reads.get(conn.prefix + "kvrev")) or 0)

    # -- writes -----------------------------------------------------------------

    def txn(
        self,
        compares: Sequence[Compare],
        writes: Sequence[Write],
        request_id: str | None = None,
    ) -> TxnResult:
        check_txn(compares, writes)
        args: list[Any] = [request_id or "", repr(REQUEST_ID_TTL_S), len(compares)]
        for c in compares:
            args += _compare_args(c)
        args += _write_args(writes)
        reply = self._run_txn(args)
        if not reply[0]:
            return TxnResult(ok=False, revision=int(reply[1]), failed=int(reply[2]))
        versions = tuple(int(v) for v in reply[3::2])
        return TxnResult(ok=True, revision=int(reply[1]), versions=versions)

    def _put(
        self, compares: Sequence[Compare], key: str, value: bytes, ttl: float | None
    ) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        args: list[Any] = ["", "", len(compares)]
        for c in compares:
            args += _compare_args(c)
        args += ["put", key, value, _number(ttl)]
        reply = self._run_txn(args)
        if not reply[0]:
            return None
        return _versioned([value, reply[3], reply[4]])

    def put(self, key: str, value: bytes, ttl: float | None = None) -> Versioned:
        written = self._put([], key, value, ttl)
        assert written is not None  # no compares: always written
        return written

    def cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> Versioned | None:
        return self._put([VersionIs(key, expected_version)], key, value, ttl)

    def incr(
        self, key: str, delta: int = 1, ttl: float | None = None, request_id: str | None = None
    ) -> int:
        check_key(key)
        check_ttl(ttl)
        check_delta(delta)
        args = [key, int(delta), _number(ttl), request_id or "", repr(REQUEST_ID_TTL_S)]
        reply = self._conn.run("kv_incr", args)
        if reply[0] != b"ok":
            raise NotAnInteger(
                f"incr: key {key!r} does not hold a 64-bit decimal integer "
                f"(or adding {delta} would leave 64 bits)"
            )
        return int(reply[1])

    def delete(self, key: str, expected_version: int | None = None) -> bool:
        check_key(key)
        compare: Compare = (
            Exists(key) if expected_version is None else VersionIs(key, expected_version)
        )
        return self.txn([compare], [Delete(key)]).ok

    def touch(self, key: str, ttl: float | None) -> Versioned | None:
        check_key(key)
        check_ttl(ttl)
        row = self._conn.run("kv_touch", [key, _number(ttl)])
        return None if row is None else _versioned(row)

    # -- change feed --------------------------------------------------------------

    def changes(self, prefix: str, after_revision: int, limit: int = 1000) -> list[Change]:
        """Scans the feed in script calls of SCAN_BUDGET entries until the page
        holds ``limit`` changes and its last revision is complete; a last
        revision that took the page past ``limit`` is then left for the next
        page, unless it is the page's only one (never split, never empty)."""
        check_limit(limit)
        out: list[Change] = []
        cursor = ""
        while True:
            open_rev = str(out[-1].revision) if out else ""
            args = [
                prefix,
                max(0, int(after_revision)),
                cursor,
                max(0, limit - len(out)),
                SCAN_BUDGET,
                open_rev,
            ]
            reply = self._conn.run("kv_changes", args)
            if reply[0] == b"compacted":
                raise Compacted(
                    f"KV changes after revision {after_revision} were compacted (up to "
                    f"revision {int(reply[2])}); re-list with scan and follow from "
                    f"{int(reply[1])}",
                    revision=int(reply[1]),
                    compacted=int(reply[2]),
                )
            _, _, last, state, rows = reply
            for rev, key, kind, version, value in rows:
                kind_s = kind.decode()
                out.append(
                    Change(
                        int(rev),
                        key.decode(),
                        kind_s,
                        int(version),
                        value if kind_s == "put" else None,
                    )
                )
            if state != b"more":
                return _whole_revisions(out, limit)
            cursor = last.decode()

    def wait(self, prefix: str, after_revision: int, timeout: float) -> None:
        """Scans the feed from ``after_revision`` (remembering how far, so a
        repeated wait does not rescan), then blocks in BLPOP (steps of
        WAIT_STEP_S on the reads client) on this wait's own wake list, which
        the first write of a matching key fills; ends by the earliest expiry
        of a key of the prefix."""
        conn = self._conn
        after_revision = max(0, int(after_revision))
        memo = (prefix, after_revision)
        deadline = time.monotonic() + timeout
        waiter = uuid.uuid4().hex
        wake = f"{conn.prefix}kvw:{waiter}"
        while (left := deadline - time.monotonic()) > 0:
            step = min(left, WAIT_STEP_S)
            cursor = self._scanned.get(memo, "")
            args = [prefix, after_revision, cursor, SCAN_BUDGET, repr(step), waiter]
            # On the reads client: a stalled server fails the wait within about a second.
            reply = conn.run("kv_wait", args, read=True)
            if reply[0] == b"now":
                return
            self._remember(memo, reply[1].decode())
            if reply[0] == b"more":
                continue
            until_expiry = float(reply[2]) if reply[2] else step
            block = max(0.001, min(step, until_expiry))
            if pop_wake(conn, wake, block):
                return
            if until_expiry <= step:
                return

    def _remember(self, memo: tuple[str, int], cursor: str) -> None:
        if len(self._scanned) >= SCANNED_MAX and memo not in self._scanned:
            self._scanned.clear()
        self._scanned[memo] = cursor

    def reap(self, limit: int = 1000) -> int:
        check_limit(limit)
        return int(self._conn.run("kv_reap", [limit, KV_CHANGES_KEEP, COMPACT_STEP]))
