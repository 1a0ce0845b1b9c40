"""PubSub of the SQLite backend: messages are rows of ``messages``, kept
MESSAGE_RETENTION_S; subscribers poll them on a connection of their own.

Message ids come from an AUTOINCREMENT sequence: dense (a rolled-back insert
takes no id) and never reused, so a subscriber that finds the first id after
the last one it saw already deleted (it stayed away longer than the retention)
knows it may have missed messages and reports a Gap."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from taskspace.backends.base import SUBSCRIPTION_BUFFER, Closeable, Gap, Message, MessageBuffer
from taskspace.backends.sqlite.base import SQLiteConn, driver_error
from taskspace.errors import BackendError

MESSAGE_RETENTION_S = 60.0
# A publish deletes expired messages at most this often (per store object).
CLEANUP_EVERY_S = 1.0


class SQLiteSubscription(Closeable):
    """Polls ``messages`` (backoff capped at ``poll_ms``; a publish in this process
    wakes it at once).

    Delivery: one Message per matching subscription, as Redis does: a channel
    subscribed both by name and by a prefix is delivered twice (``pattern`` None,
    then the prefix). A driver error drops the connection and is reported as
    ``Gap("reconnect")`` once; the next ``get`` reopens it (raising BackendError
    while that fails) and carries on after the last message delivered. More than
    SUBSCRIPTION_BUFFER undelivered messages: the oldest are dropped and a
    ``Gap("overflow", missed=n)`` comes first. Messages deleted after
    MESSAGE_RETENTION_S before this subscription read them (it was not polled
    for that long) are reported the same way, as ``Gap("overflow")`` with
    ``missed=None``: how many of them it subscribed to is not known."""

    def __init__(self, conn: SQLiteConn, channels: Sequence[str], prefixes: Sequence[str]) -> None:
        self._c = conn
        self._channels = list(dict.fromkeys(channels))
        self._prefixes = list(dict.fromkeys(prefixes))
        self._conn: sqlite3.Connection | None = None
        self._buffer = MessageBuffer()
        self._expired = False  # messages were deleted before this subscription read them
        self._lost = False
        self._closed = False
        conds = []
        if self._channels:
            conds.append(f"channel IN ({','.join('?' * len(self._channels))})")
        conds += ["substr(channel, 1, ?) = ?"] * len(self._prefixes)
        self._where = " OR ".join(conds) or "0"
        self._params: list[object] = [*self._channels]
        for prefix in self._prefixes:
            self._params += [len(prefix), prefix]
        self._last = self._top()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        if self._conn is None:
            self._conn = self._c.new_connection()
        conn = self._conn
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._conn = None
            self._c.discard(conn)
            raise driver_error("subscription read", exc) from exc

    def _top(self) -> int:
        """The last message id handed out (kept by the sequence even when every
        message was deleted)."""
        rows = self._query(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
            " COALESCE((SELECT MAX(id) FROM messages), 0))"
        )
        return int(rows[0][0])

    def _fetch(self) -> None:
        # Read the top id first, then only up to it: every message up to a visible
        # id is committed (writers are serialised), so none can slip in between
        # the two reads and be skipped.
        top = self._top()
        if top <= self._last:
            return
        rows = self._query(
            f"SELECT channel, data FROM messages WHERE id > ? AND id <= ? AND ({self._where})"
            " ORDER BY id",
            (self._last, top, *self._params),
        )
        # Checked after the read (a cleanup deletes the oldest messages first), so
        # a message deleted before the read is never missed silently.
        first = self._query(
            "SELECT MIN(id) FROM messages WHERE id > ? AND id <= ?", (self._last, top)
        )[0][0]
        if first is None or first > self._last + 1:
            self._expired = True  # ids are dense: the ones before ``first`` were deleted
        for channel, data in rows:
            if channel in self._channels:
                self._buffer.push(Message(channel, data), SUBSCRIPTION_BUFFER)
            for prefix in self._prefixes:
                if channel.startswith(prefix):
                    self._buffer.push(Message(channel, data, prefix), SUBSCRIPTION_BUFFER)
        self._last = top

    def get(self, timeout: float | None = None) -> Message | Gap | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        delay = 0.0005
        while not self._closed:
            if self._expired:
                self._expired, self._buffer.missed = False, 0  # one Gap covers both
                return Gap("overflow")
            item = self._buffer.pop()
            if item is not None:
                return item
            try:
                self._fetch()
            except BackendError:
                if self._lost:
                    raise  # still away: BackendError
                self._lost = True
                return Gap("reconnect")
            self._lost = False
            if self._buffer.pending() or self._expired:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._c.wait_commit(min(delay, remaining))
            delay = min(delay * 2, self._c.settings.poll_ms / 1000.0)
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._conn is not None:
                self._c.discard(self._conn)
                self._conn = None


class SQLitePubSub:
    """Best-effort broadcast through the file (see SQLiteSubscription)."""

    def __init__(self, conn: SQLiteConn) -> None:
        self._c = conn
        self._cleaned = float("-inf")

    def publish(self, channel: str, data: bytes) -> None:
        with self._c.write() as db:
            now = self._c.clock.now()
            db.execute(
                "INSERT INTO messages (channel, data, time) VALUES (?, ?, ?)", (channel, data, now)
            )
            if now - self._cleaned >= CLEANUP_EVERY_S:
                db.execute("DELETE FROM messages WHERE time < ?", (now - MESSAGE_RETENTION_S,))
                self._cleaned = now

    def subscribe(
        self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> SQLiteSubscription:
        return SQLiteSubscription(self._c, channels, prefixes)
