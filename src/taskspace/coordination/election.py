"""Leader election with fenced terms and failover.

``space.election("maintainer")`` elects one leader among any number of
processes. A candidate campaigns by acquiring the lease ``election/<name>``
(capacity 1, its identity as the grant's data); winning it starts a **term**
whose number is the grant's fencing token, so terms strictly increase across
every failover, restart and backend failover (see
:mod:`taskspace.backends.base`). The lease is renewed in the background
(:mod:`taskspace.coordination.lease`).

Guarantee: a leader stops acting once it cannot renew before its renew
deadline, which is shorter than the TTL: ``term.active`` turns False (and
``on_lost`` fires) before the store can hand the lease to anyone else. So two
leaders never act in the same instant on a healthy clock, and the term number
fences what a stale one writes: a write made with ``GrantHeld(term.grant)``
(``space.kv.put(..., fence=term.lease)``) is refused once another term began.
Check ``term.active`` before each action; pass the term to every write that
must not come from a deposed leader.

Faults:

- **Lease lost** (the renewal was refused or failed past its deadline):
  ``term.active`` is False and ``on_lost(term)`` runs once, on a thread of
  its own. The term never comes back; campaign again for a new one.
- **Backend down**: renewals fail, and the term is lost at the renew
  deadline, as above. ``leader()`` raises BackendError; ``observe()`` logs,
  backs off and resumes where it was once the backend answers.
- **Process paused** (SIGSTOP, a long GC, a suspended VM) past the renew
  deadline: on waking, ``term.active`` is already False before any code of the
  leader can act on it (the renewer checks the deadline on the monotonic
  clock); if the pause outlived the TTL another candidate may have won, with
  a larger term number, and the store refuses the old term's fenced writes.
- **Process killed**: its lease expires after at most ``ttl``; a waiting
  candidate is woken by the expiry (``leases.wait``), so failover takes at
  most ``ttl`` plus the candidates' retry period.

The leader record. A winner also writes ``taskspace/elections/<name>`` =
``{"identity", "term"}`` as a fenced KV write with the term's TTL, touches it
after every renewal and deletes it (fenced) when it resigns. The touch runs on
one heartbeat thread per process (``taskspace-election-heartbeat``), never on
the lease renewer: a slow store delays the record, never the renewal of the
Space's other leases; heartbeats that pile up behind a slow one coalesce. ``observe()`` follows
that record on the KV change feed. ``leader()`` reads the lease itself, which
is the authority; the record can lag it by one write, and a killed leader's
record lasts until its TTL passes unless a new leader overwrites it first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Self

import orjson

from taskspace.backends.base import Delete, GrantHeld, KVStore, Put
from taskspace.backends.checks import check_seconds, check_ttl
from taskspace.coordination.lease import acquire_lease, default_holder
from taskspace.errors import BackendError, Compacted, ConfigError, LockTimeout, SpaceLost

if TYPE_CHECKING:
    from taskspace.backends.base import Grant
    from taskspace.coordination.lease import Lease
    from taskspace.space import Space

log = logging.getLogger("taskspace.coordination")

LEASE_PREFIX = "election/"
RECORD_PREFIX = "taskspace/elections/"
DEFAULT_TTL_S = 10.0
# observe(): the longest single kv.wait, and the page of changes it reads.
OBSERVE_WAIT_S = 1.0
OBSERVE_PAGE = 100
# observe() and the record heartbeat back off this way through an outage.
BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0

LeaderState = tuple[str | None, int | None]


# Who leads when no identity is given: ``host:pid``, as for every lease holder.
default_identity = default_holder


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"election name must be a non-empty string, got {name!r}")
    return name


def _check_identity(identity: object) -> str:
    if identity is None:
        return default_identity()
    if not isinstance(identity, str) or not identity:
        raise ConfigError(f"election identity must be a non-empty string, got {identity!r}")
    return identity


def _check_wait(wait: float | None, what: str = "wait") -> None:
    check_seconds(wait, what, optional=True)


class _Heartbeats:
    """The process's one election heartbeat thread: after each renewal the lease
    renewer only hands the term over (:meth:`due`), and this thread touches the
    leader record. Terms due while a heartbeat runs coalesce into one each."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, Term] = {}
        self._thread: threading.Thread | None = None

    def due(self, term: Term) -> None:
        """Schedule ``term``'s record heartbeat; returns at once."""
        with self._cond:
            self._due[id(term)] = term
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="taskspace-election-heartbeat", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                terms, self._due = list(self._due.values()), {}
            for term in terms:
                try:
                    term.election._heartbeat(term)
                except Exception:  # the thread outlives any one term
                    log.exception("election heartbeat failed; carrying on")


_heartbeats = _Heartbeats()


@dataclass(frozen=True, slots=True)
class LeaderChange:
    """The leader record changed at ``revision``: ``identity`` leads in term
    ``term``, or nobody does (both None: resigned, or the record expired)."""

    identity: str | None
    term: int | None
    revision: int


class Term:
    """One leader's term: from winning the election until it is resigned or lost.

    ``number`` is the fencing epoch (the lease's token; strictly increasing
    across terms), ``identity`` the leader's, ``lease``/``grant`` what fenced
    writes take. ``active`` is False as soon as the leader can no longer be
    sure it leads (see the module docstring). ``with term:`` resigns on exit.
    """

    def __init__(self, election: Election, lease: Lease, identity: str, ttl: float) -> None:
        self.election = election
        self.lease = lease
        self.identity = identity
        self.ttl = ttl
        self.number = lease.token
        self._resigned = False
        self._lock = threading.Lock()

    @property
    def grant(self) -> Grant:
        """The lease grant: ``GrantHeld(term.grant)`` fences a KV txn."""
        return self.lease.grant

    @property
    def active(self) -> bool:
        """True while this process may act as the leader."""
        return not self._resigned and self.lease.held

    def resign(self) -> bool:
        """Step down: delete the leader record (fenced) and release the lease,
        so a waiting candidate wins at once. True if this term was still
        current; idempotent. BackendError if the store cannot be reached (the
        lease then expires by itself within its TTL)."""
        with self._lock:
            if self._resigned:
                return False
            self._resigned = True
        store = self.election.space.store
        try:
            store.kv.txn([GrantHeld(self.grant)], [Delete(self.election.key)])
        finally:
            released = self.lease.release()
        return released

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<Term {self.election.name} #{self.number} {self.identity} {state}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.resign()


class Election:
    """Leader election ``name`` of a Space (see the module docstring).

    ``identity`` and ``ttl`` are the defaults of this election's campaigns."""

    def __init__(
        self,
        space: Space,
        name: str,
        *,
        identity: str | None = None,
        ttl: float = DEFAULT_TTL_S,
    ) -> None:
        self.space = space
        self.name = _check_name(name)
        self.identity = _check_identity(identity)
        check_ttl(ttl, "ttl", optional=False)
        self.ttl = ttl
        self.lease_name = LEASE_PREFIX + name
        self.key = RECORD_PREFIX + name

    def __repr__(self) -> str:
        return f"<Election {self.name}>"

    # -- campaigning ----------------------------------------------------------

    def campaign(
        self,
        identity: str | None = None,
        ttl: float | None = None,
        wait: float | None = None,
        on_lost: Callable[[Term], None] | None = None,
    ) -> Term:
        """Block until this process leads (at most ``wait`` seconds: LockTimeout
        past it; None waits for ever) and return its term. ``ttl``: how long the
        store keeps the term alive without a renewal (failover time after a
        crash; default the election's, 10 s). ``identity``: who leads, as
        ``leader()`` and ``observe()`` report it (default ``host:pid``).
        ``on_lost(term)`` runs on a thread of its own if the term is lost."""
        who, seconds, deadline = self._check(identity, ttl, wait)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            term = self._win(who, seconds, left, on_lost, fair=True)
            if term is not None:
                return term
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"election {self.name!r}: not elected within {wait} s")

    def try_campaign(
        self,
        identity: str | None = None,
        ttl: float | None = None,
        on_lost: Callable[[Term], None] | None = None,
    ) -> Term | None:
        """Try once, without waiting: the new term, or None if another leads."""
        who, ttl, _ = self._check(identity, ttl, 0)
        return self._win(who, ttl, 0, on_lost, fair=False)

    def _check(
        self, identity: str | None, ttl: float | None, wait: float | None
    ) -> tuple[str, float, float | None]:
        """The campaign's identity and ttl (the election's defaults for None) and deadline."""
        who = self.identity if identity is None else _check_identity(identity)
        if ttl is None:
            ttl = self.ttl
        check_ttl(ttl, "ttl", optional=False)
        _check_wait(wait)
        return who, ttl, None if wait is None else time.monotonic() + wait

    def _win(
        self,
        identity: str,
        ttl: float,
        wait: float | None,
        on_lost: Callable[[Term], None] | None,
        fair: bool,
    ) -> Term | None:
        """One acquisition and the leader record; None if the lease was not won
        within ``wait`` or was lost before the record was written."""
        box: list[Term] = []

        def lost(_: Lease) -> None:
            if box and on_lost is not None:
                on_lost(box[0])

        def renewed(_: Lease) -> None:  # on the renewer thread: hand over, never block it
            if box:
                _heartbeats.due(box[0])

        lease = acquire_lease(
            self.space, self.lease_name, ttl=ttl, holder=identity, data=identity.encode(),
            wait=wait, on_lost=lost, on_renewed=renewed, fair=fair,
        )  # fmt: skip
        if lease is None:
            return None
        term = Term(self, lease, identity, ttl)
        box.append(term)
        try:
            written = self._write_record(term)
        except BackendError as exc:
            if isinstance(exc, SpaceLost):
                lease.release()
                raise
            # The lease is the authority: the heartbeat writes the record later.
            log.warning("election %s: leader record not written yet: %s", self.name, exc)
            written = True
        if not written or not lease.held:
            lease.release()
            return None
        log.info("election %s: %s leads, term %d", self.name, identity, term.number)
        return term

    def _record(self, term: Term) -> bytes:
        return orjson.dumps({"identity": term.identity, "term": term.number})

    def _write_record(self, term: Term) -> bool:
        """The fenced write of the leader record; False if the term is no longer current."""
        put = Put(self.key, self._record(term), ttl=term.ttl)
        return self.space.store.kv.txn([GrantHeld(term.grant)], [put]).ok

    def _heartbeat(self, term: Term) -> None:
        """After a renewal (on the heartbeat thread): extend the record's TTL, or
        write it again if it is gone. Never raises: a failure waits for the next
        renewal."""
        if not term.active:
            return
        try:
            if self.space.store.kv.touch(self.key, term.ttl) is None:
                self._write_record(term)
        except Exception as exc:  # noqa: BLE001 - never the renewer thread's death
            log.debug("election %s: leader record heartbeat failed: %s", self.name, exc)

    # -- watching -------------------------------------------------------------

    def leader(self) -> tuple[str, int] | None:
        """The current leader's ``(identity, term)`` from the lease itself, or None."""
        holders = self.space.store.leases.holders(self.lease_name)
        if not holders:
            return None
        grant = holders[0]
        return grant.data.decode(errors="replace") or grant.holder, grant.token

    def observe(
        self, since: int | None = None, *, idle_timeout: float | None = None
    ) -> Iterator[LeaderChange]:
        """Leader changes: first the current leader record (unless ``since``, a
        KV revision, says where to resume: then only the changes after it),
        then each change of it, for ever (or until ``idle_timeout`` seconds
        pass without one; resume with ``since=`` the last change's revision).

        Built on the KV change feed. It never misses the latest state: after
        ``Compacted`` (the feed dropped changes it had not read) it re-reads
        the record and yields it if it differs from the last one yielded, so
        changes in between may collapse into one. Through a backend outage it
        logs, backs off and resumes from the last revision it saw; it never
        ends by itself (SpaceLost, a wiped space, is raised). Each step blocks
        at most OBSERVE_WAIT_S."""
        _check_wait(idle_timeout, "idle_timeout")
        kv = self.space.store.kv
        after, last = since, None
        delay = BACKOFF_START_S
        quiet_since = time.monotonic()
        while True:
            left = OBSERVE_WAIT_S
            if idle_timeout is not None:
                left = min(left, quiet_since + idle_timeout - time.monotonic())
                if left <= 0:
                    return
            try:
                after, found = self._read(kv, after, left)
                delay = BACKOFF_START_S
            except Compacted as exc:
                log.info("election %s: change feed compacted past revision %s (%s); re-reading",
                         self.name, after, exc)  # fmt: skip
                after = None
                continue
            except SpaceLost:
                raise
            except BackendError as exc:
                log.warning("election %s: observe retrying in %.2f s: %s", self.name, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            for change in found:
                if (change.identity, change.term) != last:
                    last = change.identity, change.term
                    quiet_since = time.monotonic()
                    yield change

    def _read(self, kv: KVStore, after: int | None, wait: float) -> tuple[int, list[LeaderChange]]:
        """One step of observe: the snapshot (``after`` None), or the next page of
        changes after ``after`` (waiting up to ``wait`` for one). Returns the
        revision to continue from and the leader states found, oldest first."""
        if after is None:
            revision = kv.revision()
            current = kv.get(self.key)
            if current is None:
                return revision, [LeaderChange(None, None, revision)]
            return revision, [LeaderChange(*self._decode(current.value), current.revision)]
        changes = kv.changes(self.key, after, limit=OBSERVE_PAGE)
        if not changes:
            kv.wait(self.key, after, wait)
            return after, []
        found = [
            LeaderChange(*self._decode(c.value if c.kind == "put" else None), c.revision)
            for c in changes
            if c.key == self.key
        ]
        return changes[-1].revision, found

    def _decode(self, value: bytes | None) -> LeaderState:
        if value is None:
            return None, None
        try:
            record = orjson.loads(value)
            return str(record["identity"]), int(record["term"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("election %s: unreadable leader record %r", self.name, value[:100])
            return None, None
