"""PubSub on PostgreSQL: NOTIFY on one channel per space, subscriptions each
on a LISTEN connection of their own.

A message travels as one NOTIFY payload (text) on the space's channel
``tp_<schema>``: ``m<len>:<channel><base64 data>``. NOTIFY payloads must be
shorter than 8,000 bytes; a larger message (data above about 5.9 KB, less a
long channel name) is not refused: its data is stored in ``pubsub_payloads``
and the payload carries its id (``r<len>:<channel><id>``), in one statement,
so the NOTIFY (sent at commit) never arrives before the row. Subscribers read
the row as the reference arrives; rows are deleted PAYLOAD_RETENTION_S after
they were written, and a reference whose row is gone (a subscriber that did
not read for that long) is reported as ``Gap("overflow")``.

Delivery is PostgreSQL's: in commit order, to every session listening when
the publishing transaction committed. Prefix and channel filtering happens in
the subscriber, so every subscription of a space receives every message of
the space; a channel subscribed both by name and by a prefix is delivered
once per subscription, as on Redis.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import SUBSCRIPTION_BUFFER, Closeable, Gap, Message, MessageBuffer
from taskspace.backends.postgres.clock import WALL_SQL
from taskspace.backends.postgres.conn import map_error
from taskspace.errors import BackendError, ConfigError

if TYPE_CHECKING:
    import psycopg

    from taskspace.backends.postgres.conn import PgConn

log = logging.getLogger("taskspace.backends.postgres")

# NOTIFY refuses payloads of 8,000 bytes or more.
MAX_PAYLOAD = 7999
# Stored payloads of large messages are kept this long (seconds).
PAYLOAD_RETENTION_S = 60.0
# A publish of a large message deletes expired payloads at most this often.
CLEANUP_EVERY_S = 1.0
# get(timeout=None) waits in steps of this long, checking the connection between.
IDLE_STEP_S = 5.0
FOREVER_S = 1e9


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a space's pub/sub (at most 63 bytes)."""
    return f"tp_{schema}"[:63]


def _check_channel(name: object, what: str = "channel") -> str:
    if not isinstance(name, str) or "\x00" in name:
        raise ConfigError(f"{what} {name!r}: must be a string without NUL characters")
    return name


def _payload(channel: str, kind: str, body: str) -> str:
    return f"{kind}{len(channel)}:{channel}{body}"


def _parse(payload: str) -> tuple[str, str, str]:
    """(kind, channel, body) of a payload made by ``_payload``."""
    size, _, rest = payload[1:].partition(":")
    n = int(size)
    return payload[0], rest[:n], rest[n:]


class PgSubscription(Closeable):
    """LISTEN on a connection of its own (see the module docstring).

    Notifications are drained into a buffer of at most SUBSCRIPTION_BUFFER
    messages; past that the oldest are dropped and ``Gap("overflow",
    missed=n)`` comes first. A lost connection is made again within the
    ``get``'s timeout: once it listens again, ``get`` returns
    ``Gap("reconnect")`` and then what is published after that; while the
    server stays away ``get`` raises BackendError."""

    def __init__(self, conn: PgConn, channels: Sequence[str], prefixes: Sequence[str]) -> None:
        self._c = conn
        self._channel = channel_name(conn.schema)
        self._channels = set(channels)
        self._prefixes = list(dict.fromkeys(prefixes))
        self._listen: psycopg.Connection[Any] | None = None
        self._buffer = MessageBuffer()
        self._closed = False
        if self._channels or self._prefixes:
            self._connect()

    def _connect(self) -> None:
        """Open a connection and LISTEN; returns once it listens (BackendError if not)."""
        psycopg = __import__("psycopg")
        listen = self._c.dedicated(autocommit=True)
        try:
            listen.execute(f'LISTEN "{self._channel}"')
        except psycopg.Error as exc:
            listen.close()
            raise map_error(exc, "subscribe (LISTEN)", self._c.display) from exc
        self._listen = listen

    def _drop(self) -> None:
        listen, self._listen = self._listen, None
        if listen is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to release
                listen.close()

    def _take(self, payload: str) -> None:
        """Buffer the message(s) ``payload`` carries for this subscription."""
        kind, channel, body = _parse(payload)
        wanted: list[str | None] = [None] if channel in self._channels else []
        wanted += [p for p in self._prefixes if channel.startswith(p)]
        if not wanted:
            return
        if kind == "r":
            data = self._stored(int(body))
            if data is None:
                self._push(Gap("overflow"))
                return
        else:
            data = base64.b64decode(body)
        for pattern in wanted:
            self._push(Message(channel, data, pattern))

    def _stored(self, payload_id: int) -> bytes | None:
        """The data of a stored large message, or None if it is gone already."""
        assert self._listen is not None
        row = self._listen.execute(
            "SELECT data FROM pubsub_payloads WHERE id = %s", (payload_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _push(self, item: Message | Gap) -> None:
        self._buffer.push(item, SUBSCRIPTION_BUFFER)

    def _fill(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a notification, then buffer every one that
        has arrived (at most twice SUBSCRIPTION_BUFFER per call). Any driver
        error drops the connection and raises BackendError."""
        psycopg = __import__("psycopg")
        listen = self._listen
        assert listen is not None
        try:
            # Collected first: the generator holds the connection's lock, and a
            # stored payload is read on this connection.
            payloads = [n.payload for n in listen.notifies(timeout=timeout, stop_after=1)]
            while payloads and len(payloads) < 2 * SUBSCRIPTION_BUFFER:
                more = [n.payload for n in listen.notifies(timeout=0)]
                if not more:
                    break
                payloads += more
            for payload in payloads:
                self._take(payload)
            if not payloads:
                listen.execute("")  # an idle step: notice a dead connection
        except psycopg.Error as exc:
            self._drop()
            raise map_error(exc, "subscription read", self._c.display) from exc

    def get(self, timeout: float | None = None) -> Message | Gap | None:
        if self._closed:
            return None
        deadline = time.monotonic() + (FOREVER_S if timeout is None else timeout)
        if not self._channels and not self._prefixes:
            time.sleep(max(0.0, min(deadline - time.monotonic(), IDLE_STEP_S)))
            return None
        while True:
            item = self._buffer.pop()
            if item is not None:
                return item
            left = max(0.0, deadline - time.monotonic())
            if self._listen is None:
                self._reconnect()
                continue
            try:
                self._fill(min(left, IDLE_STEP_S))
            except BackendError:
                self._reconnect()
                continue
            if not self._buffer.pending() and time.monotonic() >= deadline:
                return None

    def _reconnect(self) -> None:
        """LISTEN again (BackendError while the server is away); queue the Gap
        after what was received before the loss."""
        self._connect()
        self._buffer.push(Gap("reconnect"), SUBSCRIPTION_BUFFER)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop()
            self._buffer.clear()


class PgPubSub:
    """Best-effort broadcast (see base.PubSub and the module docstring)."""

    def __init__(self, conn: PgConn) -> None:
        self._c = conn
        self._channel = channel_name(conn.schema)
        self._cleaned = float("-inf")
        self._subs: weakref.WeakSet[PgSubscription] = weakref.WeakSet()

    def publish(self, channel: str, data: bytes) -> None:
        _check_channel(channel)
        body = base64.b64encode(data).decode("ascii")
        payload = _payload(channel, "m", body)
        if len(payload.encode()) <= MAX_PAYLOAD:
            self._c.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
            return
        reference = _payload(channel, "r", "")
        if len(reference.encode()) + 20 > MAX_PAYLOAD:
            raise ConfigError(
                f"channel name of {len(channel.encode())} bytes: too long for a PostgreSQL"
                f" NOTIFY payload (at most {MAX_PAYLOAD - 20} bytes)"
            )
        self._c.execute(
            f"WITH p AS (INSERT INTO pubsub_payloads (data, time) SELECT %s, {WALL_SQL}"
            " RETURNING id) SELECT pg_notify(%s, %s || p.id) FROM p",
            (data, self._channel, reference),
        )
        self._cleanup()

    def _cleanup(self) -> None:
        """Delete stored payloads older than PAYLOAD_RETENTION_S (at most once a
        CLEANUP_EVERY_S per store)."""
        now = time.monotonic()
        if now - self._cleaned < CLEANUP_EVERY_S:
            return
        self._cleaned = now
        self._c.execute(
            f"DELETE FROM pubsub_payloads WHERE time < {WALL_SQL} - %s", (PAYLOAD_RETENTION_S,)
        )

    def subscribe(
        self, channels: Sequence[str] = (), prefixes: Sequence[str] = ()
    ) -> PgSubscription:
        if isinstance(channels, str) or isinstance(prefixes, str):
            raise ConfigError(f"subscribe({channels!r}, {prefixes!r}): pass sequences of names")
        for name in (*channels, *prefixes):
            _check_channel(name, "channel or prefix")
        sub = PgSubscription(self._c, channels, prefixes)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """Close every subscription made through this object (their LISTEN
        connections); idempotent."""
        for sub in list(self._subs):
            sub.close()
