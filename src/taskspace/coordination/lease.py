"""A held lease, kept alive by one background renewer per Space.

A :class:`Lease` is one grant of a named lease of the store (a lock, a
semaphore slot, a leader term) while this process holds it. Modelled on
kazoo's recipes, its docstring says what it guarantees and what happens on
each fault.

**Guarantee.** While ``lease.held`` is True, no other holder can have been
granted the slot: ``held`` turns False (and ``on_lost`` fires) *before* the
store's TTL can run out. ``lease.token`` is the grant's fencing token,
strictly increasing across every grant of the space and never repeated, so a
resource that remembers the largest token it has seen refuses a stale holder
(``space.kv.put(key, value, fence=lease)`` does this on the store itself).

**The renew deadline.** Every grant is renewed every ``ttl/3`` by the
Space's renewer thread (one ``store.leases.renew`` call for all grants of
equal ttl). The holder stops at

    deadline = (send time of the last successful renewal request) + ttl * 2/3

measured on this process's monotonic clock. The store extended the grant to
at least (arrival of that request) + ttl on its own clock, and the arrival
is after the send, so as long as the two clocks advance at similar rates
(within ttl/3 over ttl) the holder stops a third of the TTL before anyone
else can be granted the slot. The acquisition itself counts as the first
renewal (its request's send time).

**Faults.**

- *Lease lost* (it expired on the store, was taken after expiry, the space
  was wiped): the next renewal learns it; ``held`` turns False, ``on_lost``
  fires once.
- *Backend down*: renewals are retried with backoff (at least every ttl/6);
  if none succeeds by the deadline, the lease is declared lost at the
  deadline by a watchdog thread that makes no store call, so even a renewal
  blocked in a socket timeout cannot delay it.
- *Process paused* (SIGSTOP, a long GC, a suspended VM): nothing runs while
  paused; ``held`` compares the deadline on every read, so a resumed holder
  sees False on its very next check, and a renewal whose reply arrives after
  the deadline is ignored (a lost lease stays lost). Code that acts on the
  resource should check ``held`` (or use fenced writes) right before acting;
  between the check and the act only the fencing token protects it.

**Acquiring.** :func:`acquire_lease` (used by locks, semaphores and
elections) waits for a slot in arrival order, wakes on releases and retries
a backend that is down until its wait ends; :mod:`taskspace.coordination.lock`
states how waiting, fairness and backend errors behave.

``on_lost(lease)`` runs once on a thread of its own; ``on_renewed(lease)``
runs on the renewer thread after each successful renewal (keep it short).
Exceptions in either are logged. The renewer and watchdog threads are
daemons started on first use; they never die of an exception (they log,
back off and carry on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from taskspace.backends.base import MAX_DURATION_S, Grant
from taskspace.errors import BackendError, ConfigError, LeaseLost, SpaceLost, TaskspaceError

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.coordination")

RENEW_EVERY = 1 / 3  # of the ttl, after the send time of the last successful renewal
DEADLINE_AT = 2 / 3  # of the ttl, after the same send time
RETRY_START_S = 0.02  # first retry of a failed renewal; doubles up to ttl/6
LOOP_BACKOFF_S = 0.5  # after an unexpected exception in a thread loop

LeaseCallback = Callable[["Lease"], None]
State = Literal["held", "lost", "released"]


def _run_callback(callback: LeaseCallback | None, lease: Lease, what: str) -> None:
    if callback is None:
        return
    try:
        callback(lease)
    except Exception:  # a user callback must never kill our threads
        log.exception("%s callback of lease %s raised", what, lease.name)


class Lease:
    """A held grant of a named lease; see the module docstring for the guarantee.

    ``name`` is the store's lease name (``lock/<name>``, ``sem/<name>``, ...),
    ``token`` the fencing token, ``grant`` the store's grant (its ``expires``
    is on the store's lease clock), ``ttl`` the renewal ttl. ``held`` is
    False as soon as the holder can no longer be sure. ``with lease:`` and
    ``async with lease:`` release on exit.
    """

    def __init__(
        self,
        space: Space,
        grant: Grant,
        ttl: float,
        *,
        sent: float,
        on_lost: LeaseCallback | None = None,
        on_renewed: LeaseCallback | None = None,
    ) -> None:
        self._space = space
        self._grant = grant
        self.ttl = ttl
        self.on_lost = on_lost
        self.on_renewed = on_renewed
        self._lock = threading.Lock()
        self._state: State = "held"
        self._deadline = sent + ttl * DEADLINE_AT
        self._next_renew = sent + ttl * RENEW_EVERY
        self._retry = RETRY_START_S
        self._failing = False
        self.lost_reason: str | None = None

    def __repr__(self) -> str:
        return f"<Lease {self.name} token={self.token} {self._state}>"

    # -- what it is -----------------------------------------------------------

    @property
    def grant(self) -> Grant:
        """The store's grant (renewed grants carry a later ``expires``)."""
        return self._grant

    @property
    def name(self) -> str:
        return self._grant.name

    @property
    def token(self) -> int:
        """The fencing token: strictly increasing across the space, never repeated."""
        return self._grant.token

    @property
    def holder(self) -> str:
        return self._grant.holder

    @property
    def data(self) -> bytes:
        return self._grant.data

    @property
    def deadline(self) -> float:
        """When this holder stops (``time.monotonic()`` seconds) unless renewed first."""
        return self._deadline

    def remaining(self) -> float:
        """Seconds until the renew deadline (0 once not held)."""
        if not self.held:
            return 0.0
        return max(0.0, self._deadline - time.monotonic())

    @property
    def held(self) -> bool:
        """True while this holder may act: not released, not known lost, and
        its renew deadline not passed (compared on every read)."""
        if self._state != "held":
            return False
        if time.monotonic() < self._deadline:
            return True
        self._lose("no renewal succeeded before the renew deadline")
        return False

    def check(self) -> None:
        """Raise LeaseLost unless ``held``."""
        if not self.held:
            raise LeaseLost(f"lease {self.name} (token {self.token}) is not held: {self._why()}")

    def _why(self) -> str:
        return "released" if self._state == "released" else self.lost_reason or "lost"

    # -- what the holder does ---------------------------------------------------

    def renew(self) -> None:
        """Renew now (the renewer does it by itself; this is for a holder that
        wants proof). Raises LeaseLost if the lease is not held or the store
        no longer holds it; BackendError if the store cannot be reached (the
        deadline is then unchanged)."""
        self.check()
        sent = time.monotonic()
        try:
            (renewed,) = self._space.store.leases.renew([self._grant], self.ttl)
        except SpaceLost:
            self._lose("the space was wiped or replaced")
            raise
        if renewed is None:
            self._lose("the store no longer holds the grant")
        else:
            self._renewed(sent, renewed)
        self.check()

    def release(self) -> bool:
        """Give the slot back and stop renewing. True if the store still held
        the grant; False for a stale grant (already released, expired or
        taken). While the backend is down the release is retried until the
        renew deadline; then False (the grant expires by itself within its
        TTL)."""
        with self._lock:
            was = self._state
            self._state = "released" if was == "held" else was
        keeper(self._space).remove(self)
        delay = RETRY_START_S
        while True:
            try:
                return self._space.store.leases.release(self._grant)
            except SpaceLost:
                return False
            except BackendError as exc:
                if time.monotonic() + delay >= self._deadline:
                    log.warning("lease %s: release failed (%s); it expires by itself", self.name,
                                exc)  # fmt: skip
                    return False
                time.sleep(delay)
                delay = min(delay * 2, max(RETRY_START_S, self.ttl / 6))

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.release)

    # -- what the renewer tells it -----------------------------------------------

    def _renewed(self, sent: float, grant: Grant) -> None:
        with self._lock:
            if self._state != "held" or time.monotonic() >= self._deadline:
                late = self._state == "held"
            else:
                self._grant = grant
                self._deadline = max(self._deadline, sent + self.ttl * DEADLINE_AT)
                self._next_renew = sent + self.ttl * RENEW_EVERY
                self._retry = RETRY_START_S
                self._failing = False
                late = False
        if late:  # the reply came after the deadline: a lost lease stays lost
            self._lose("no renewal succeeded before the renew deadline")
        elif self._state == "held":
            _run_callback(self.on_renewed, self, "on_renewed")

    def _renew_failed(self, exc: BackendError) -> None:
        with self._lock:
            self._next_renew = time.monotonic() + self._retry
            self._retry = min(self._retry * 2, max(RETRY_START_S, self.ttl / 6))
            first, self._failing = not self._failing, True
        if first:
            log.warning("lease %s: renewal failed, retrying until its deadline: %s", self.name,
                        exc)  # fmt: skip

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._state != "held":
                return
            self._state = "lost"
            self.lost_reason = reason
        log.warning("lease %s (token %d) lost: %s", self.name, self.token, reason)
        keeper(self._space).remove(self)
        if self.on_lost is not None:
            threading.Thread(
                target=_run_callback, args=(self.on_lost, self, "on_lost"),
                name=f"taskspace-lease-lost-{self.name}", daemon=True,
            ).start()  # fmt: skip


class LeaseKeeper:
    """The renewer and watchdog threads of one Space, shared by all its leases.

    The renewer renews every due grant with one ``store.leases.renew`` call
    per ttl; the watchdog, which makes no store call, declares lost every
    lease whose deadline passes. Both start on first use and never die of an
    exception."""

    def __init__(self, space: Space) -> None:
        self._space = space
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._threads: list[threading.Thread] = []
        self._pid = os.getpid()
        self._closed = False

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._closed = False
            if self._pid != os.getpid():  # a forked child: our threads are not in it
                self._leases, self._threads, self._pid = set(), [], os.getpid()
            self._leases.add(lease)
            if not self._threads or not all(t.is_alive() for t in self._threads):
                self._start()
            self._cond.notify_all()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._leases.discard(lease)
            self._cond.notify_all()

    def held(self) -> list[Lease]:
        """The leases this keeper renews."""
        with self._cond:
            return list(self._leases)

    def close(self) -> None:
        """Release every held lease and stop both threads (``Space.close``).

        Like a ZooKeeper session that closes, a closed Space gives up what it
        holds: each lease is released (its ``on_lost`` does not fire; while the
        backend is down a release gives up at the lease's renew deadline, and
        the grant then expires on the store within its TTL). A lease acquired
        afterwards starts the threads again."""
        for lease in self.held():
            try:
                lease.release()
            except TaskspaceError as exc:  # closing goes on with the others
                log.warning("lease %s: release on close failed: %s", lease.name, exc)
        with self._cond:
            self._closed = True
            self._leases.clear()
            self._cond.notify_all()

    def _start(self) -> None:
        self._threads = [
            threading.Thread(target=self._forever, args=(step,), name=name, daemon=True)
            for step, name in (
                (self._renew_step, "taskspace-lease-renewer"),
                (self._watch_step, "taskspace-lease-watchdog"),
            )
        ]
        for thread in self._threads:
            thread.start()

    def _forever(self, step: Callable[[], None]) -> None:
        while not self._closed:
            try:
                step()
            except Exception:  # this thread must never die
                log.exception("lease keeper step failed; carrying on")
                time.sleep(LOOP_BACKOFF_S)

    def _wait_for(self, when: Callable[[Lease], float]) -> list[Lease]:
        """Block until some lease's ``when`` has come; those leases."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [lease for lease in self._leases if when(lease) <= now]
                if due:
                    return due
                soonest = min((when(lease) for lease in self._leases), default=None)
                self._cond.wait(None if soonest is None else soonest - now)
            return []

    def _watch_step(self) -> None:
        for lease in self._wait_for(lambda lease: lease._deadline):
            _ = lease.held  # past its deadline: declares it lost

    def _renew_step(self) -> None:
        due = self._wait_for(lambda lease: min(lease._next_renew, lease._deadline))
        # Leases of the same ttl due within half an interval ride along: one call
        # per ttl group, not one per lease acquired at another moment.
        ttls = {lease.ttl for lease in due}
        now = time.monotonic()
        by_ttl: dict[float, list[Lease]] = {}
        for lease in self.held():
            early = lease._next_renew - now <= lease.ttl * RENEW_EVERY / 2
            if lease.ttl in ttls and (lease in due or early) and lease.held:
                by_ttl.setdefault(lease.ttl, []).append(lease)  # (never past its deadline)
        for ttl, leases in by_ttl.items():
            self._renew(ttl, leases)

    def _renew(self, ttl: float, leases: list[Lease]) -> None:
        sent = time.monotonic()
        try:
            renewed = self._space.store.leases.renew([lease.grant for lease in leases], ttl)
        except SpaceLost:
            for lease in leases:
                lease._lose("the space was wiped or replaced")
            return
        except BackendError as exc:
            for lease in leases:
                lease._renew_failed(exc)
            return
        for lease, grant in zip(leases, renewed, strict=True):
            if grant is None:
                lease._lose("the store no longer holds the grant (expired or released)")
            else:
                lease._renewed(sent, grant)


MIN_TTL_S = 0.1  # the renewer runs every ttl/3: shorter leases cannot be kept reliably
QUEUE_TTL_MAX_S = 5.0  # a waiter's queue entry lives min(ttl, this) unless refreshed
TICKET_TTL_S = 24 * 3600.0  # the ticket counter of a name lives this long after its last use
BACKOFF_START_S = 0.02
BACKOFF_MAX_S = 1.0
QUEUE_PREFIX = "taskspace/locks/"


def default_holder() -> str:
    """``host:pid``: who holds a grant, for people reading ``holders()``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def queue_prefix(lease_name: str) -> str:
    """Where the fair queue of ``lease_name`` lives in the KV (ends with ``/``)."""
    return f"{QUEUE_PREFIX}{quote(lease_name, safe='')}/"


def _check_number(what: str, value: Any, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or not low <= value <= MAX_DURATION_S
    ):
        none = " or None" if allow_none else ""
        raise ConfigError(f"{what}={value!r}: must be a number of seconds from {low} to ten"
                          f" years{none}")  # fmt: skip


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """The checked options of an acquisition (see :func:`acquire_lease`)."""

    name: str
    ttl: float
    capacity: int = 1
    holder: str = ""
    data: bytes = b""
    on_lost: LeaseCallback | None = None
    on_renewed: LeaseCallback | None = None
    fair: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name={self.name!r}: must be a non-empty string")
        _check_number("ttl", self.ttl, MIN_TTL_S)
        cap = self.capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"capacity={cap!r}: must be an integer >= 1")
        if not isinstance(self.holder, str):
            raise ConfigError(f"holder={self.holder!r}: must be a string")
        if not isinstance(self.data, bytes):
            raise ConfigError(f"data={self.data!r}: must be bytes")
        for what, fn in (("on_lost", self.on_lost), ("on_renewed", self.on_renewed)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{what}={fn!r}: must be callable or None")

    def queue_ttl(self) -> float:
        return min(self.ttl, QUEUE_TTL_MAX_S)


def check_wait(wait: float | None) -> None:
    """``wait``: None (block) or seconds >= 0."""
    _check_number("wait", wait, 0.0, allow_none=True)


def acquire_lease(
    space: Space,
    lease_name: str,
    *,
    ttl: float,
    capacity: int = 1,
    holder: str | None = None,
    data: bytes = b"",
    wait: float | None = None,
    on_lost: LeaseCallback | None = None,
    on_renewed: LeaseCallback | None = None,
    fair: bool = True,
) -> Lease | None:
    """A held, auto-renewed lease of the store's ``lease_name`` (the full
    name: ``lock/x``, ``election/x``), or None if not acquired within
    ``wait`` (None: block; 0: try once). Waiting, fairness and faults as the
    module docstring says; ConfigError for bad options or a capacity that
    differs from the live holders'."""
    opts = LeaseOptions(lease_name, ttl, capacity, holder if holder is not None else
                        default_holder(), data, on_lost, on_renewed, fair)  # fmt: skip
    check_wait(wait)
    return acquire(space, opts, wait)


def acquire(space: Space, opts: LeaseOptions, wait: float | None) -> Lease | None:
    got = _Waiter(space, opts, wait).run()
    if got is None:
        return None
    grant, sent = got
    lease = Lease(space, grant, opts.ttl, sent=sent, on_lost=opts.on_lost,
                  on_renewed=opts.on_renewed)  # fmt: skip
    keeper(space).add(lease)
    return lease


class _Waiter:
    """One acquisition: tries, queues, waits, retries BackendError, cleans up."""

    def __init__(self, space: Space, opts: LeaseOptions, wait: float | None) -> None:
        self.store = space.store
        self.o = opts
        self.deadline = math.inf if wait is None else time.monotonic() + wait
        self.grant_id = uuid.uuid4().hex
        self.unseen = False  # an acquire with grant_id may have taken effect unseen
        self.prefix = queue_prefix(opts.name) + "q/"
        self.entry: str | None = None
        self.touched = 0.0
        self.first = True
        self.reached = False  # some step succeeded during this wait
        self.failing = False  # the last step failed with BackendError

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> tuple[Grant, float] | None:
        try:
            got = self._loop()
        except BaseException:
            self._leave(gave_up=True)
            raise
        self._leave(gave_up=got is None)
        return got

    def _loop(self) -> tuple[Grant, float] | None:
        delay = BACKOFF_START_S
        while True:
            try:
                got = self._step()
                self.reached, self.failing = True, False
                if got is not None:
                    return got
                delay = BACKOFF_START_S
            except SpaceLost:
                raise
            except BackendError as exc:
                self.failing = True
                if self.remaining() <= 0:
                    if self.reached:
                        return None
                    raise
                if delay == BACKOFF_START_S:
                    log.warning("lease %s: backend error while acquiring, retrying: %s",
                                self.o.name, exc)  # fmt: skip
                time.sleep(max(0.0, min(delay, self.remaining())))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if self.remaining() <= 0:
                return None

    def _step(self) -> tuple[Grant, float] | None:
        """One try, then (if time remains) one bounded wait; the grant, or None."""
        if not self.o.fair:
            got = self._try()
            if got is None:
                self._wait_slot()
            return got
        if self.entry is None and self.first:
            self.first = False
            if not self.store.kv.scan(self.prefix, limit=1):  # nobody queued: try directly
                got = self._try()
                if got is not None:
                    return got
            if self.remaining() <= 0:
                return None
        if self.entry is None:
            self._enqueue()
        else:
            self._refresh()
        return self._queued_step()

    def _queued_step(self) -> tuple[Grant, float] | None:
        kv = self.store.kv
        revision = kv.revision()
        ahead = sum(1 for key, _ in kv.scan(self.prefix, limit=self.o.capacity)
                    if self.entry is not None and key < self.entry)  # fmt: skip
        free = self.o.capacity - len(self.store.leases.holders(self.o.name))
        if ahead < free:
            got = self._try()
            if got is not None:
                return got
            self._wait_slot()
        elif free > 0:  # a slot is free but kept for the waiters ahead: wait for them
            kv.wait(self.prefix, revision, self._step_time())
        else:
            self._wait_slot()
        return None

    def _step_time(self) -> float:
        return max(0.0, min(self.remaining(), self.o.queue_ttl() / 3))

    def _wait_slot(self) -> None:
        step = self._step_time()
        if step > 0:
            self.store.leases.wait(self.o.name, step)

    def _try(self) -> tuple[Grant, float] | None:
        """``leases.acquire`` with this wait's grant id; the grant and the send
        time its renew deadline counts from."""
        leases, o = self.store.leases, self.o
        sent = time.monotonic()
        earlier, self.unseen = self.unseen, True
        grant = leases.acquire(o.name, o.holder, o.ttl, o.capacity, o.data, self.grant_id)
        if grant is not None and earlier:
            # An earlier attempt whose reply was lost may have made this grant
            # before ``sent``: renew it so the deadline counts from a known send.
            sent = time.monotonic()
            grant = leases.renew([grant], o.ttl)[0]
        self.unseen = False
        return None if grant is None else (grant, sent)

    def _enqueue(self) -> None:
        kv, base = self.store.kv, queue_prefix(self.o.name)
        ticket = kv.incr(base + "ticket", 1, ttl=TICKET_TTL_S)
        kv.touch(base + "ticket", TICKET_TTL_S)
        self.entry = f"{self.prefix}{ticket:020d}"
        self._write_entry()

    def _write_entry(self) -> None:
        assert self.entry is not None
        self.store.kv.put(self.entry, self.o.holder.encode(), ttl=self.o.queue_ttl())
        self.touched = time.monotonic()

    def _refresh(self) -> None:
        if time.monotonic() - self.touched < self.o.queue_ttl() / 3:
            return
        assert self.entry is not None
        if self.store.kv.touch(self.entry, self.o.queue_ttl()) is None:
            self._write_entry()  # expired while this waiter was paused: back in, same ticket
        else:
            self.touched = time.monotonic()

    def _leave(self, gave_up: bool) -> None:
        """Delete the queue entry; after giving up, release a grant an acquire
        may have made unseen. Best effort: both expire by themselves, and
        nothing is tried while the backend is failing (a wait's end is a promise)."""
        if self.failing:
            return
        try:
            if self.entry is not None:
                self.store.kv.delete(self.entry)
                self.entry = None
            if gave_up and self.unseen:
                for grant in self.store.leases.holders(self.o.name):
                    if grant.id == self.grant_id:
                        self.store.leases.release(grant)
        except BackendError as exc:
            log.warning("lease %s: could not leave the wait queue (it expires): %s",
                        self.o.name, exc)  # fmt: skip


def keeper(space: Space) -> LeaseKeeper:
    """The lease keeper of ``space`` (one per Space, created on first use)."""
    return space._facade("lease_keeper", LeaseKeeper)
