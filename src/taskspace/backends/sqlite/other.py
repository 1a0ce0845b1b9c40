"""LeaseStore, KVStore, StreamStore, PubSub and the wait loops of the SQLite backend."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from taskspace.backends.base import Closeable, Grant, Message, StreamEntry, Versioned
from taskspace.backends.sqlite.base import SQLiteBase
from taskspace.errors import SubscriptionLost

MESSAGE_RETENTION_S = 60.0


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class Waiter:
    """Backoff polling of ``PRAGMA data_version``, woken early by local commits."""

    def __init__(self, store: SQLiteBase) -> None:
        self._store = store

    def baseline(self) -> None:
        """Note the data version before a caller checks the database, so that a
        commit by another connection after the check ends the next wait."""
        store = self._store
        if getattr(store._local, "data_version", None) is None:
            store._local.data_version = store._reading(_data_version)

    def wait(self, timeout: float) -> None:
        """Return when another connection committed, a local commit happened, or
        ``timeout`` passed; driver errors become BackendError."""
        store = self._store
        deadline = time.monotonic() + timeout
        delay = 0.0002
        seen = getattr(store._local, "data_version", None)
        while True:
            version = store._reading(_data_version)
            if seen is not None and version != seen:
                break
            seen = version
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if store._wait_commit(min(delay, remaining)):
                break
            delay = min(delay * 2, store.settings.poll_ms / 1000.0)
        store._local.data_version = store._reading(_data_version)


class SQLiteSubscription(Closeable):
    """Polls the ``messages`` table on a connection of its own.

    A driver error raises SubscriptionLost once and drops the connection; the
    next ``get`` reopens it and carries on after the last message delivered
    (messages are kept MESSAGE_RETENTION_S, so a short outage loses none)."""

    def __init__(self, store: SQLiteBase, channels: Sequence[str]) -> None:
        self._store = store
        self._channels = list(channels)
        self._conn: sqlite3.Connection | None = None
        self._buffer: list[Message] = []
        self._closed = False
        self._marks = ",".join("?" * len(self._channels))
        self._last = self._top()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._store._new_connection()
        return self._conn

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._conn = None
            self._store._discard(conn)
            raise SubscriptionLost(
                f"SQLite subscription lost its connection ({exc}); re-sync from the store"
            ) from exc

    def _top(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(id), 0) FROM messages")[0][0])

    def _fetch(self) -> None:
        # Read the top id first, then only up to it: every message up to a visible
        # id is committed (writers are serialised), so none can slip in between
        # the two reads and be skipped.
        top = self._top()
        if top <= self._last:
            return
        rows = self._query(
            "SELECT channel, data FROM messages WHERE id > ? AND id <= ?"
            f" AND channel IN ({self._marks}) ORDER BY id",
            (self._last, top, *self._channels),
        )
        self._buffer.extend(Message(channel, data) for channel, data in rows)
        self._last = top

    def get(self, timeout: float | None = None) -> Message | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        delay = 0.0005
        while not self._closed:
            if not self._buffer:
                self._fetch()
            if self._buffer:
                return self._buffer.pop(0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self._store.settings.poll_ms / 1000.0)
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._conn is not None:
                self._store._discard(self._conn)
                self._conn = None


class SQLiteOther(SQLiteBase):
    """Named leases, versioned KV, streams and pub/sub on the same file."""

    _publish_count = itertools.count()

    # -- LeaseStore ---------------------------------------------------------

    def acquire(self, name: str, holder: str, capacity: int, ttl: float) -> Grant | None:
        with self._write() as db:
            now = self.now()
            db.execute("DELETE FROM grants WHERE name = ? AND expires <= ?", (name, now))
            row = db.execute(
                "UPDATE grants SET expires = ? WHERE name = ? AND holder = ? RETURNING token",
                (now + ttl, name, holder),
            ).fetchone()
            if row is not None:
                return Grant(name, holder, int(row[0]), now + ttl)
            held = db.execute("SELECT COUNT(*) FROM grants WHERE name = ?", (name,)).fetchone()[0]
            if held >= capacity:
                return None
            token = db.execute(
                "INSERT INTO grant_tokens VALUES (?, 1) ON CONFLICT(name)"
                " DO UPDATE SET token = token + 1 RETURNING token",
                (name,),
            ).fetchone()[0]
            db.execute("INSERT INTO grants VALUES (?, ?, ?, ?)", (name, holder, token, now + ttl))
            return Grant(name, holder, int(token), now + ttl)

    def renew_grant(self, grant: Grant, ttl: float) -> Grant | None:
        with self._write() as db:
            now = self.now()
            cur = db.execute(
                "UPDATE grants SET expires = ? WHERE name = ? AND holder = ? AND token = ?"
                " AND expires > ?",
                (now + ttl, grant.name, grant.holder, grant.token, now),
            )
            return Grant(grant.name, grant.holder, grant.token, now + ttl) if cur.rowcount else None

    def release(self, grant: Grant) -> bool:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM grants WHERE name = ? AND holder = ? AND token = ? AND expires > ?",
                (grant.name, grant.holder, grant.token, self.now()),
            )
            return cur.rowcount == 1

    def holders(self, name: str) -> list[Grant]:
        rows = self._read(
            "SELECT holder, token, expires FROM grants WHERE name = ? AND expires > ?"
            " ORDER BY token",
            (name, self.now()),
        )
        return [Grant(name, holder, int(token), expires) for holder, token, expires in rows]

    # -- KVStore ------------------------------------------------------------

    KV_LIVE = (
        "SELECT value, version, expires FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)"
    )

    def _kv_live(self, db: sqlite3.Connection, key: str, now: float) -> Versioned | None:
        row = db.execute(self.KV_LIVE, (key, now)).fetchone()
        return None if row is None else Versioned(row[0], int(row[1]), row[2])

    def _kv_write(
        self, db: sqlite3.Connection, key: str, value: bytes, expires: float | None
    ) -> int:
        version = self._bump(db, "kv_version")
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, version, expires))
        return version

    def _reap_kv(self, db: sqlite3.Connection, now: float, limit: int) -> int:
        cur = db.execute(
            "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires <= ?"
            " ORDER BY expires LIMIT ?)",
            (now, limit),
        )
        return cur.rowcount

    def kv_get(self, key: str) -> Versioned | None:
        rows = self._read(self.KV_LIVE, (key, self.now()))
        return Versioned(rows[0][0], int(rows[0][1]), rows[0][2]) if rows else None

    def kv_put(self, key: str, value: bytes, ttl: float | None = None) -> int:
        with self._write() as db:
            expires = None if ttl is None else self.now() + ttl
            return self._kv_write(db, key, value, expires)

    def kv_cas(
        self, key: str, expected_version: int | None, value: bytes, ttl: float | None = None
    ) -> int | None:
        with self._write() as db:
            now = self.now()
            item = self._kv_live(db, key, now)
            if (item.version if item else None) != expected_version:
                return None
            return self._kv_write(db, key, value, None if ttl is None else now + ttl)

    def kv_incr(self, key: str, delta: int = 1, ttl: float | None = None) -> int:
        with self._write() as db:
            now = self.now()
            item = self._kv_live(db, key, now)
            result = (int(item.value) if item else 0) + delta
            expires = item.expires if item else (None if ttl is None else now + ttl)
            self._kv_write(db, key, str(result).encode(), expires)
            return result

    def kv_delete(self, key: str, expected_version: int | None = None) -> bool:
        with self._write() as db:
            item = self._kv_live(db, key, self.now())
            if item is None or (expected_version is not None and item.version != expected_version):
                return False
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            return True

    def kv_scan(self, prefix: str, limit: int | None = None) -> list[tuple[str, Versioned]]:
        rows = self._read(
            "SELECT key, value, version, expires FROM kv WHERE substr(key, 1, ?) = ?"
            " AND (expires IS NULL OR expires > ?) ORDER BY key LIMIT ?",
            (len(prefix), prefix, self.now(), -1 if limit is None else limit),
        )
        return [(k, Versioned(v, int(ver), exp)) for k, v, ver, exp in rows]

    # -- StreamStore --------------------------------------------------------

    def append(self, stream: str, data: bytes, maxlen: int | None = None) -> int:
        with self._write() as db:
            row = db.execute(
                "INSERT INTO stream_entries (stream, data, time) VALUES (?, ?, ?) RETURNING id",
                (stream, data, self.now()),
            ).fetchone()
            if maxlen is not None:
                self._trim(db, stream, maxlen)
            return int(row[0])

    def read(self, stream: str, after: int = 0, limit: int = 100) -> list[StreamEntry]:
        rows = self._read(
            "SELECT id, data, time FROM stream_entries WHERE stream = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (stream, after, limit),
        )
        return [StreamEntry(int(i), d, t) for i, d, t in rows]

    def _trim(self, db: sqlite3.Connection, stream: str, maxlen: int) -> int:
        cur = db.execute(
            "DELETE FROM stream_entries WHERE stream = ? AND id <= (SELECT id FROM stream_entries"
            " WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (stream, stream, maxlen),
        )
        return cur.rowcount

    def trim(self, stream: str, maxlen: int) -> int:
        with self._write() as db:
            return self._trim(db, stream, maxlen)

    # -- PubSub -------------------------------------------------------------

    def publish(self, channel: str, data: bytes) -> None:
        with self._write() as db:
            now = self.now()
            db.execute(
                "INSERT INTO messages (channel, data, time) VALUES (?, ?, ?)", (channel, data, now)
            )
            if next(self._publish_count) % 100 == 0:
                db.execute("DELETE FROM messages WHERE time < ?", (now - MESSAGE_RETENTION_S,))

    def subscribe(self, channels: Sequence[str]) -> SQLiteSubscription:
        return SQLiteSubscription(self, channels)
