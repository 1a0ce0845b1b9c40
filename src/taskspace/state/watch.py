"""Following the KV change feed of a prefix: every change once, in order,
through outages and compaction (:class:`Follower`, the engine of
``space.kv.watch``).

The follower knows a *position* (a revision: every change at or below it has
been taken into its buffer) and, for the keys of its prefix, the version it
last reported (``known``). One step reads the next page of
``store.kv.changes`` after the position; when there is none it blocks in
``store.kv.wait`` (at most WAIT_STEP_S, so a ``close`` is seen within it).
No polling with sleeps.

**Outages.** A BackendError (server down, restarting, a dropped connection)
is logged and retried with exponential backoff (BACKOFF_START_S doubling to
BACKOFF_MAX_S) from the same position: the feed is read-only, so a retry
can neither repeat nor skip a change. The follower never gives up by
itself; ``failure`` holds the last error while the store does not answer,
so a caller with a deadline can raise it (never ending silently).
SpaceLost (the space was wiped) is raised at once.

**Compaction.** ``store.kv.changes`` raises Compacted when the feed dropped
changes above the position (``reap`` keeps the newest KV_CHANGES_KEEP). The
follower then re-lists: it reads the current revision R, scans the prefix,
and reports the *net difference* against ``known``: a ``put`` for each key
whose live version it has not reported (only values written after the
position), a ``delete`` for each key it reported that is gone (a synthetic
delete: whether it was deleted or expired is no longer known). Then it
follows the feed from R, skipping each change the scan already reflected
(a put of a version at or below the one listed, the removal of a key it
saw gone), so nothing is reported twice. What is lost is only what the
store itself dropped: several writes of one key collapse into its last
value, and a key created and removed inside the dropped part is never
seen. The final state of every key is always delivered.

**Knowledge.** With ``since=None`` the follower lists the prefix when it is
made (one scan; it keeps one version per live key of the prefix), so it can
report the removal of any key after a compaction. Resumed with ``since=R``
it knows nothing yet: after a compaction it reports every key written after
R, but cannot report the removal of a key it never saw.

Each event carries its change's revision. A listing (``initial=True``, or
the net difference after Compacted; ``relist=True``) is a batch whose stamps
make resuming from any of them miss nothing (see :class:`FeedEvent`).

Reusable: the registry's and the election's watches follow the same
pattern; they could be built on this class (it knows nothing of JSON).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from taskspace.backends.base import Change, ChangeKind, KVStore, Versioned
from taskspace.errors import BackendError, Compacted, SpaceLost

log = logging.getLogger("taskspace.kv")

WAIT_STEP_S = 1.0  # one store.kv.wait at most this long: close() is seen within it
PAGE = 500  # changes read per store call
SCAN_PAGE = 500
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One change delivered by a :class:`Follower` (values still encoded).

    ``kind``: ``put``, ``delete`` or ``expire``; ``value``: the new value of a
    put (None otherwise); ``version``: the key's version after a put, or the
    version removed. ``revision``: the change's revision (a txn's changes
    share one). ``relist=True`` marks an event of a listing (the initial
    one, or the net difference after Compacted): its ``revision`` is a
    resume stamp, not the write's own revision: the last event of a listing
    carries the revision the listing was read at; each earlier one a
    revision from which a resumed watch delivers the rest of the batch again
    (after Compacted: the position before it, so the resumed watch re-lists
    too; for the initial listing, ordered by write revision: one below the
    next event's write revision).
    """

    kind: ChangeKind
    key: str
    value: bytes | None
    version: int
    revision: int
    relist: bool = False


class Follower:
    """The change feed of ``prefix`` as a buffer of :class:`FeedEvent`.

    ``kv_of()`` returns the store's KV protocol (called for each store call,
    so a Space that reopened its store is followed). ``since=None``: from
    now (the prefix is listed at once: ``start_limit`` seconds of retries
    at most, then BackendError); ``since=R``: every change after revision R.
    ``initial=True`` (with ``since=None``): first a ``put`` for every live key.

    Not for concurrent consumers: one thread (or one asyncio task) pops; ``close``
    may be called from anywhere. :meth:`fill` is serialised by a lock, so a
    call still running in an abandoned thread (a cancelled ``asyncio.to_thread``)
    only adds to the buffer, never loses an event.
    """

    def __init__(
        self,
        kv_of: Callable[[], KVStore],
        prefix: str,
        *,
        since: int | None,
        initial: bool = False,
        start_limit: float = 10.0,
        name: str = "kv watch",
    ) -> None:
        self._kv_of = kv_of
        self.prefix = prefix
        self.name = name
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self.buffer: deque[FeedEvent] = deque()
        self.known: dict[str, int] = {}
        self.complete = False  # ``known`` holds every live key (after a listing)
        self.position = 0 if since is None else since
        self.failure: BackendError | None = None
        self._delay = BACKOFF_START_S
        self.relists = 0
        if since is None:
            self._start(initial, time.monotonic() + start_limit)

    # -- the start ----------------------------------------------------------------------

    def _start(self, initial: bool, deadline: float) -> None:
        while True:
            try:
                revision, found = self._snapshot(-1 if initial else None)
                self._answered()
                break
            except SpaceLost:
                raise
            except BackendError as exc:
                if not self._backoff(exc, deadline):
                    raise BackendError(
                        f"{self.name} {self.prefix!r}: could not list its start: {exc}"
                    ) from exc
        self.position = revision
        if initial:
            adds = sorted(found.values(), key=lambda item: (item[1].revision, item[0]))
            stamps = [max(0, nxt[1].revision - 1) for nxt in adds[1:]] + [revision]
            for (key, item), stamp in zip(adds, stamps, strict=True):
                self.buffer.append(FeedEvent("put", key, item.value, item.version, stamp, True))
        self.known = {key: item.version for key, item in found.values()}
        self.complete = True

    def _snapshot(self, values_after: int | None) -> tuple[int, dict[str, tuple[str, Versioned]]]:
        """The current revision, then every live key of the prefix (page by
        page, so writes during the scan may or may not show: the feed after
        the revision is replayed). Values are kept only for keys written
        after ``values_after`` (None: none)."""
        kv = self._kv_of()
        revision = kv.revision()
        found: dict[str, tuple[str, Versioned]] = {}
        after: str | None = None
        while True:
            page = kv.scan(self.prefix, after_key=after, limit=SCAN_PAGE)
            for key, item in page:
                if values_after is None or item.revision <= values_after:
                    item = Versioned(b"", item.version, item.revision)
                found[key] = (key, item)
            if len(page) < SCAN_PAGE:
                return revision, found
            after = page[-1][0]

    # -- filling the buffer ---------------------------------------------------------------

    def fill(self, deadline: float | None) -> bool:
        """Make the buffer hold an event: True once it does; False when
        ``deadline`` (monotonic) passes or the follower is closed first. It
        reads the feed at least once, also past its deadline (so what is
        already there is delivered). Never raises BackendError (retried with
        backoff; see ``failure``)."""
        with self._lock:
            while not self.buffer:
                if self.stopped.is_set():
                    return False
                try:
                    self._step(deadline)
                    self._answered()
                except SpaceLost:
                    raise
                except BackendError as exc:
                    if not self._backoff(exc, deadline):
                        return False
                    continue
                if not self.buffer and deadline is not None and time.monotonic() >= deadline:
                    return False
            return True

    def _step(self, deadline: float | None) -> None:
        kv = self._kv_of()
        try:
            page = kv.changes(self.prefix, self.position, limit=PAGE)
        except Compacted as exc:
            self._relist(exc)
            return
        if page:
            for change in page:
                event = self._apply(change)
                if event is not None:
                    self.buffer.append(event)
                self.position = max(self.position, change.revision)
            return
        left = WAIT_STEP_S
        if deadline is not None:
            left = min(left, deadline - time.monotonic())
        if left > 0 and not self.stopped.is_set():
            kv.wait(self.prefix, self.position, left)

    def _apply(self, change: Change) -> FeedEvent | None:
        known = self.known.get(change.key)
        if change.kind == "put":
            if self.complete and known is not None and change.version <= known:
                return None  # the listing already reported it
            self.known[change.key] = change.version
        else:
            if self.complete and (known is None or change.version < known):
                return None  # the listing saw it gone, or an older incarnation
            self.known.pop(change.key, None)
        return FeedEvent(change.kind, change.key, change.value, change.version, change.revision)

    def _relist(self, exc: Compacted) -> None:
        before = self.position
        log.info(
            "%s %r: the change feed was compacted past revision %d (%s); re-listing",
            self.name,
            self.prefix,
            before,
            exc,
        )
        revision, found = self._snapshot(before)
        out: list[FeedEvent] = []
        for key, item in found.values():
            if item.revision > before and self.known.get(key) != item.version:
                out.append(FeedEvent("put", key, item.value, item.version, revision, True))
        for key, version in self.known.items():
            if key not in found:
                out.append(FeedEvent("delete", key, None, version, revision, True))
        stamps = [before] * (len(out) - 1) + [revision]
        for event, stamp in zip(out, stamps, strict=False):
            self.buffer.append(
                FeedEvent(event.kind, event.key, event.value, event.version, stamp, True)
            )
        self.known = {key: item.version for key, item in found.values()}
        self.complete = True
        self.position = revision
        self.relists += 1

    # -- faults -----------------------------------------------------------------------------

    def _answered(self) -> None:
        if self.failure is not None:
            log.warning("%s %r: the store answers again", self.name, self.prefix)
        self.failure = None
        self._delay = BACKOFF_START_S

    def _backoff(self, exc: BackendError, deadline: float | None) -> bool:
        """Record ``exc`` and sleep the backoff (cut short by ``close`` and
        ``deadline``); False if there is no time left or the follower closed."""
        self.failure = exc
        pause = self._delay
        if deadline is not None:
            pause = min(pause, deadline - time.monotonic())
        if pause <= 0 or self.stopped.is_set():
            return False
        log.warning(
            "%s %r: %s; retrying from revision %d in %.2f s",
            self.name,
            self.prefix,
            exc,
            self.position,
            pause,
        )
        self.stopped.wait(pause)
        self._delay = min(self._delay * 2, BACKOFF_MAX_S)
        return not self.stopped.is_set()

    # -- consuming --------------------------------------------------------------------------

    def pop(self) -> FeedEvent | None:
        """The next buffered event, or None."""
        try:
            return self.buffer.popleft()
        except IndexError:
            return None

    def resume_point(self) -> int:
        """A revision to resume from (``since=``) that misses nothing of what
        was not popped yet: below the next buffered event, else the position."""
        try:
            return max(0, self.buffer[0].revision - 1) if self.buffer else self.position
        except IndexError:
            return self.position

    def close(self) -> None:
        """Stop: a ``fill`` in progress returns within WAIT_STEP_S; idempotent."""
        self.stopped.set()
