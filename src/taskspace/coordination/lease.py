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
renewal (its request's send time). On Redis the store's clock is the
server's wall clock (kept from going backwards, not from jumping forwards):
a forward step of the server's clock expires grants early, and then only
fenced writes keep a stale holder out.

**Faults.**

- *Lease lost* (it expired on the store, was taken after expiry, the space
  was wiped): the next renewal learns it; ``held`` turns False, ``on_lost``
  fires once.
- *Backend down*: renewals are retried with backoff (at least every ttl/6);
  if none succeeds by the deadline, the lease is declared lost at the
  deadline by a watchdog thread that makes no store call, so even a renewal
  blocked in a socket timeout cannot delay it. A lease declared lost at its
  deadline is then released on the store in the background (best effort,
  retried until the grant would have expired anyway), so the next holder
  need not wait out the rest of the TTL; an act begun before the deadline
  is from then on protected by its fencing token only.
- *Process paused* (SIGSTOP, a long GC, a suspended VM): nothing runs while
  paused; ``held`` compares the deadline on every read, so a resumed holder
  sees False on its very next check, and a renewal whose reply arrives after
  the deadline is ignored (a lost lease stays lost). Code that acts on the
  resource should check ``held`` (or use fenced writes) right before acting;
  between the check and the act only the fencing token protects it.
- *Space closed*: :meth:`LeaseKeeper.close` releases every held lease (in
  parallel, within CLOSE_BUDGET_S overall; a release the backend does not
  answer in time is abandoned and its grant expires within its TTL) and
  stops the threads; ``release()`` after that makes no store call.

**Acquiring.** :func:`acquire_lease` (used by locks, semaphores and
elections) waits for a slot in arrival order, wakes on releases and retries
a backend that is down until its wait ends; :mod:`taskspace.coordination.lock`
states how waiting, fairness and backend errors behave.
:func:`acquire_lease_async` does the same for asyncio code on a daemon thread
of its own (never the loop's default executor); cancelling it ends the wait
and gives back a lease taken after the cancel.

``on_lost(lease)`` runs once on a thread of its own; ``on_renewed(lease)``
runs on the renewer thread after each successful renewal (keep it short: it
delays the renewal of the Space's other leases). Exceptions in either are
logged. The renewer, watchdog and cleaner threads are daemons started on
first use; they never die of an exception (they log, back off and carry on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
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
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import quote

from taskspace.backends.base import Grant
from taskspace.backends.checks import check_seconds
from taskspace.errors import BackendError, ConfigError, LeaseLost, SpaceLost

if TYPE_CHECKING:
    from taskspace.backends.base import Store
    from taskspace.space import Space

log = logging.getLogger("taskspace.coordination")

RENEW_EVERY = 1 / 3  # of the ttl, after the send time of the last successful renewal
DEADLINE_AT = 2 / 3  # of the ttl, after the same send time
RETRY_START_S = 0.02  # first retry of a failed renewal; doubles up to ttl/6
LOOP_BACKOFF_S = 0.5  # after an unexpected exception in a thread loop
CLOSE_BUDGET_S = 2.0  # LeaseKeeper.close releases in parallel within this, overall
CLOSE_THREADS = 16  # at most this many releases in flight during close

LeaseCallback = Callable[["Lease"], None]
State = Literal["held", "lost", "released"]
T = TypeVar("T")


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
        self._keeper: LeaseKeeper | None = None  # the keeper renewing it (set by its add)
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
            self._lose("the space was wiped or replaced", give_back=False)
            raise
        if renewed is None:
            self._lose("the store no longer holds the grant", give_back=False)
        else:
            self._renewed(sent, renewed)
        self.check()

    def release(self) -> bool:
        """Give the slot back and stop renewing. True if the store still held
        the grant; False for a stale grant (expired or taken). Idempotent:
        only the first release of a held lease makes a store call; a lease
        already released, or lost (whose grant the keeper gives back in the
        background), returns False at once, also after ``Space.close()``.
        While the backend is down the release is retried until the renew
        deadline; then False (the grant expires by itself within its TTL)."""
        if not self._stop():
            return False
        self._detach()
        return self._give_back(self._deadline)

    def _stop(self) -> bool:
        """held -> released; False if it was not held."""
        with self._lock:
            if self._state != "held":
                return False
            self._state = "released"
            return True

    def _detach(self) -> None:
        if self._keeper is not None:
            self._keeper.remove(self)

    def _give_back(self, until: float) -> bool:
        """``leases.release`` of the grant, retried through BackendError until ``until``."""
        delay = RETRY_START_S
        while True:
            try:
                return self._space.store.leases.release(self._grant)
            except SpaceLost:
                return False
            except BackendError as exc:
                if time.monotonic() + delay >= until:
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
        await run_in_thread(self.release, f"taskspace-release-{self.name}")

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

    def _lose(self, reason: str, *, give_back: bool = True) -> None:
        """Declare the lease lost (once). ``give_back``: the store may still
        hold the grant (a missed deadline), so the keeper releases it in the
        background until the grant would have expired anyway."""
        with self._lock:
            if self._state != "held":
                return
            self._state = "lost"
            self.lost_reason = reason
        log.warning("lease %s (token %d) lost: %s", self.name, self.token, reason)
        self._detach()
        if give_back and self._keeper is not None:
            grant = self._grant
            self._keeper.later(Chore(
                f"release lost lease {self.name}", lambda store: store.leases.release(grant),
                until=self._deadline + self.ttl * (1 - DEADLINE_AT),
            ))  # fmt: skip
        if self.on_lost is not None:
            threading.Thread(
                target=_run_callback, args=(self.on_lost, self, "on_lost"),
                name=f"taskspace-lease-lost-{self.name}", daemon=True,
            ).start()  # fmt: skip


@dataclass(slots=True)
class Chore:
    """A best-effort store call the keeper's cleaner thread makes in the
    background (leave a wait queue, release a grant nobody holds any more):
    retried with backoff through BackendError, dropped at ``until``
    (``time.monotonic()``; past it the thing has expired by itself) or when
    the keeper closes."""

    what: str
    run: Callable[[Store], object]
    until: float
    due: float = 0.0
    delay: float = RETRY_START_S


RENEWER = "taskspace-lease-renewer"
WATCHDOG = "taskspace-lease-watchdog"


class LeaseKeeper:
    """The renewer, watchdog and cleaner threads of one Space, shared by all
    its leases.

    The renewer renews every due grant with one ``store.leases.renew`` call
    per ttl; the watchdog, which makes no store call, declares lost every
    lease whose deadline passes; the cleaner runs :class:`Chore` objects.
    All start on first use and never die of an exception."""

    def __init__(self, space: Space) -> None:
        self._space = space
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._chores: list[Chore] = []
        self._threads: dict[str, threading.Thread] = {}
        # When the renewer and the watchdog next wake by themselves: an added
        # lease wakes them only if it is due sooner (a notify on every acquire
        # and release cost a third of an uncontended lock's time).
        self._plans: dict[str, float] = {}
        self._pid = os.getpid()
        self._closed = False

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._closed = False
            self._forked()
            lease._keeper = self
            self._leases.add(lease)
            self._start()
            renewer = self._plans.get(RENEWER, -math.inf)
            watchdog = self._plans.get(WATCHDOG, -math.inf)
            if min(lease._next_renew, lease._deadline) < renewer or lease._deadline < watchdog:
                self._cond.notify_all()

    def remove(self, lease: Lease) -> None:
        # No wake-up: a thread waiting for this lease's time finds nothing due then.
        with self._cond:
            self._leases.discard(lease)

    def later(self, chore: Chore) -> None:
        """Run ``chore`` on the cleaner thread (dropped if the keeper is closed)."""
        with self._cond:
            if self._closed:
                return
            self._forked()
            self._chores.append(chore)
            self._start()
            self._cond.notify_all()

    def held(self) -> list[Lease]:
        """The leases this keeper renews."""
        with self._cond:
            return list(self._leases)

    def close(self) -> None:
        """Release every held lease and stop the threads (``Space.close``).

        Like a ZooKeeper session that closes, a closed Space gives up what it
        holds: each lease is marked released at once (``held`` is False, its
        ``on_lost`` does not fire) and released on the store, all in parallel
        and within CLOSE_BUDGET_S overall (plus at most one store call in
        flight); a release the backend does not answer by then is abandoned
        and the grant expires on the store within its TTL. Pending chores are
        dropped (what they would clean up expires by itself). A lease
        acquired afterwards starts the threads again."""
        with self._cond:
            leases = [lease for lease in self._leases if lease._stop()]
            self._closed = True
            self._leases.clear()
            self._chores.clear()
            self._cond.notify_all()
        _release_all(leases, time.monotonic() + CLOSE_BUDGET_S)

    def _forked(self) -> None:
        if self._pid != os.getpid():  # a forked child: our threads are not in it
            self._leases, self._chores, self._threads = set(), [], {}
            self._pid = os.getpid()

    def _start(self) -> None:
        for step, name in (
            (self._renew_step, RENEWER),
            (self._watch_step, WATCHDOG),
            (self._clean_step, "taskspace-lease-cleaner"),
        ):
            thread = self._threads.get(name)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self._forever, args=(step,), name=name,
                                          daemon=True)  # fmt: skip
                self._threads[name] = thread
                thread.start()

    def _forever(self, step: Callable[[], None]) -> None:
        while not self._closed:
            try:
                step()
            except Exception:  # this thread must never die
                log.exception("lease keeper step failed; carrying on")
                time.sleep(LOOP_BACKOFF_S)

    def _wait_for(self, when: Callable[[Lease], float]) -> list[Lease]:
        """Block until some held lease's ``when`` has come; those leases."""
        with self._cond:
            while not self._closed:
                self._leases = {lease for lease in self._leases if lease._state == "held"}
                now = time.monotonic()
                due = [lease for lease in self._leases if when(lease) <= now]
                if due:
                    return due
                soonest = min((when(lease) for lease in self._leases), default=None)
                self._plans[threading.current_thread().name] = (
                    math.inf if soonest is None else soonest
                )
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
                lease._lose("the space was wiped or replaced", give_back=False)
            return
        except BackendError as exc:
            for lease in leases:
                lease._renew_failed(exc)
            return
        for lease, grant in zip(leases, renewed, strict=True):
            if grant is None:
                lease._lose("the store no longer holds the grant (expired or released)",
                            give_back=False)  # fmt: skip
            else:
                lease._renewed(sent, grant)

    def _next_chore(self) -> Chore | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [chore for chore in self._chores if chore.due <= now]
                if due:
                    chore = min(due, key=lambda c: c.due)
                    self._chores.remove(chore)
                    return chore
                soonest = min((chore.due for chore in self._chores), default=None)
                self._cond.wait(None if soonest is None else soonest - now)
            return None

    def _clean_step(self) -> None:
        chore = self._next_chore()
        if chore is None or time.monotonic() >= chore.until:
            return  # closed, or expired by itself meanwhile
        try:
            chore.run(self._space.store)
        except SpaceLost:
            return
        except BackendError as exc:
            if chore.delay == RETRY_START_S:
                log.warning("%s failed, retrying in the background: %s", chore.what, exc)
            chore.due = time.monotonic() + chore.delay
            chore.delay = min(chore.delay * 2, BACKOFF_MAX_S)
            with self._cond:
                if not self._closed:
                    self._chores.append(chore)


def _release_all(leases: list[Lease], until: float) -> None:
    """Release ``leases`` on the store in parallel, giving up at ``until``."""
    if not leases:
        return
    pending = list(leases)
    guard = threading.Lock()

    def work() -> None:
        while time.monotonic() < until:
            with guard:
                if not pending:
                    return
                lease = pending.pop()
            try:
                lease._give_back(min(until, lease._deadline))
            except Exception as exc:  # noqa: BLE001 - closing goes on with the others
                log.warning("lease %s: release on close failed: %s", lease.name, exc)

    threads = [
        threading.Thread(target=work, name="taskspace-lease-close", daemon=True)
        for _ in range(min(CLOSE_THREADS, len(leases)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))


def spawn(fn: Callable[[], T], name: str, orphan: Callable[[T], None] | None = None
          ) -> concurrent.futures.Future[T]:  # fmt: skip
    """Run ``fn`` on a daemon thread of its own; its future. If the future
    was cancelled before ``fn`` returned, ``orphan(result)`` gets the result.
    Coordination waits use this, never the event loop's default executor: a
    wait that blocks must neither starve ``asyncio.to_thread`` nor hold up
    ``asyncio.run`` at exit."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting caller
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                done.set_exception(exc)
            return
        try:
            done.set_result(result)
        except concurrent.futures.InvalidStateError:  # the caller was cancelled meanwhile
            if orphan is not None:
                orphan(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


async def run_in_thread(fn: Callable[[], T], name: str) -> T:
    """``await`` ``fn`` run on a daemon thread of its own (see :func:`spawn`)."""
    return await asyncio.wrap_future(spawn(fn, name))


MIN_TTL_S = 0.1  # the renewer runs every ttl/3: shorter leases cannot be kept reliably
QUEUE_TTL_MIN_S = 1.0  # a waiter's queue entry lives its lease's ttl, within these
QUEUE_TTL_MAX_S = 5.0  # bounds, and is refreshed every third of that while it waits
LOOK_EVERY_S = 5.0  # a waiter re-reads holders and queue at least this often
CANCEL_STEP_S = 0.5  # a cancellable wait checks its cancel event at least this often
EARLY_S = 0.01  # a store wait that ended this much before its timeout ended early
BACKOFF_START_S = 0.02
BACKOFF_MAX_S = 1.0
QUEUE_PREFIX = "taskspace/locks/"
TICKET_KEY = QUEUE_PREFIX + "ticket"  # one ticket counter for every queue of the space


def default_holder() -> str:
    """``host:pid``: who holds a grant, for people reading ``holders()``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def queue_prefix(lease_name: str) -> str:
    """Where the fair queue of ``lease_name`` lives in the KV (ends with ``/``)."""
    return f"{QUEUE_PREFIX}{quote(lease_name, safe='')}/"


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
        check_seconds(self.ttl, "ttl", minimum=MIN_TTL_S)
        cap = self.capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"capacity={cap!r}: must be an integer >= 1")
        if not isinstance(self.holder, str):
            raise ConfigError(f"holder={self.holder!r}: must be a string")
        if not isinstance(self.data, bytes):
            raise ConfigError(f"data={self.data!r}: must be bytes")
        if not isinstance(self.fair, bool):
            raise ConfigError(f"fair={self.fair!r}: must be True or False")
        for what, fn in (("on_lost", self.on_lost), ("on_renewed", self.on_renewed)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{what}={fn!r}: must be callable or None")

    def queue_ttl(self) -> float:
        """The TTL of a waiter's queue entry: the lease's, from 1 to 5 s."""
        return min(max(self.ttl, QUEUE_TTL_MIN_S), QUEUE_TTL_MAX_S)


def check_wait(wait: float | None) -> None:
    """``wait``: None (block) or seconds >= 0."""
    check_seconds(wait, "wait", optional=True)


def _options(
    lease_name: str, ttl: float, capacity: int, holder: str | None, data: bytes,
    on_lost: LeaseCallback | None, on_renewed: LeaseCallback | None, fair: bool, wait: float | None,
) -> LeaseOptions:  # fmt: skip
    opts = LeaseOptions(lease_name, ttl, capacity, holder if holder is not None else
                        default_holder(), data, on_lost, on_renewed, fair)  # fmt: skip
    check_wait(wait)
    return opts


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
    cancel: threading.Event | None = None,
) -> Lease | None:
    """A held, auto-renewed lease of the store's ``lease_name`` (the full
    name: ``lock/x``, ``election/x``), or None if not acquired within
    ``wait`` (None: block; 0: try once) or once ``cancel`` is set (checked
    before every store call and at least every CANCEL_STEP_S). Waiting,
    fairness and faults as the module docstring says; ConfigError for bad
    options or a capacity that differs from the live holders'."""
    opts = _options(lease_name, ttl, capacity, holder, data, on_lost, on_renewed, fair, wait)
    return acquire(space, opts, wait, cancel)


async def acquire_lease_async(
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
    """:func:`acquire_lease` for asyncio code (see :func:`acquire_async`)."""
    opts = _options(lease_name, ttl, capacity, holder, data, on_lost, on_renewed, fair, wait)
    return await acquire_async(space, opts, wait)


def acquire(
    space: Space, opts: LeaseOptions, wait: float | None, cancel: threading.Event | None = None
) -> Lease | None:
    got = _Waiter(space, opts, wait, cancel).run()
    if got is None:
        return None
    grant, sent = got
    lease = Lease(space, grant, opts.ttl, sent=sent, on_lost=opts.on_lost,
                  on_renewed=opts.on_renewed)  # fmt: skip
    keeper(space).add(lease)
    return lease


async def acquire_async(space: Space, opts: LeaseOptions, wait: float | None) -> Lease | None:
    """``acquire`` on a daemon thread of its own (never the loop's default
    executor). Cancelling the awaiting task sets the wait's cancel event: the
    thread stops within CANCEL_STEP_S plus one store call, leaves the queue,
    and a lease it acquired after the cancel is released at once, so a
    cancelled ``async with`` never leaves the lock taken."""
    cancel = threading.Event()
    done = spawn(lambda: acquire(space, opts, wait, cancel), f"taskspace-acquire-{opts.name}",
                 orphan=_give_back_late)  # fmt: skip
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        cancel.set()
        done.add_done_callback(_release_result)  # acquired just as the caller was cancelled
        raise


def _give_back_late(lease: Lease | None) -> None:
    if lease is not None:
        lease.release()


def _release_result(done: concurrent.futures.Future[Lease | None]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    lease = done.result()
    if lease is not None:
        threading.Thread(target=lease.release, name=f"taskspace-release-{lease.name}",
                         daemon=True).start()  # fmt: skip


class _OutOfTime(Exception):
    """The wait is over (its deadline passed, or it was cancelled): no more store calls."""


class _Waiter:
    """One acquisition: tries, queues, waits, retries BackendError, cleans up.

    The first try (a one-key queue scan and ``leases.acquire``) is always
    made; every later store call is made only while the wait has time left
    and is not cancelled, so the wait returns within ``wait`` plus one store
    call in flight. Cleaning up after the wait (leaving the queue, giving
    back a grant an acquire may have made unseen) happens inline while time
    remains and otherwise on the keeper's cleaner thread."""

    def __init__(
        self, space: Space, opts: LeaseOptions, wait: float | None, cancel: threading.Event | None
    ) -> None:
        self.store = space.store
        self.keeper = keeper(space)
        self.o = opts
        self.deadline = math.inf if wait is None else time.monotonic() + wait
        self.cancel = cancel
        self.grant_id = uuid.uuid4().hex
        self.unseen = False  # an acquire with grant_id may have taken effect unseen
        self.unseen_since = 0.0  # send time of the first acquire of that unseen streak
        self.prefix = queue_prefix(opts.name) + "q/"
        self.entry: str | None = None
        self.refresh_at = math.inf  # when the queue entry's TTL is refreshed next
        self.first = True
        self.fresh = True  # holders/queue must be read before the next sleep
        self.looked = -math.inf  # when they were last read
        self.revision: int | None = None  # sleep on the queue from here (None: on the lease)
        self.reached = False  # some step succeeded during this wait
        self.failing = False  # the last step failed with BackendError

    def remaining(self) -> float:
        if self.cancel is not None and self.cancel.is_set():
            return -math.inf
        return self.deadline - time.monotonic()

    def _guard(self) -> None:
        """Before each store call after the first try: is there time left?"""
        if self.remaining() <= 0:
            raise _OutOfTime

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
        error: BackendError | None = None
        while True:
            try:
                got = self._step()
                self.reached, self.failing = True, False
                if got is not None:
                    return got
                delay = BACKOFF_START_S
            except _OutOfTime:
                if error is not None and not self.reached and self.remaining() > -math.inf:
                    raise error from None  # the backend was down for the whole wait
                return None
            except SpaceLost:
                raise
            except BackendError as exc:
                self.failing, self.fresh, error = True, True, exc
                if self.remaining() <= 0:
                    if self.reached or self.remaining() == -math.inf:
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
        """One pass: (first) a direct try, then keep the queue entry, read
        holders and queue if something may have changed, and sleep in one
        bounded store wait. The grant, or None."""
        if self.first:
            self.first = False
            if not self.o.fair or not self.store.kv.scan(self.prefix, limit=1):
                got = self._try()  # nobody queued: try directly
                if got is not None:
                    return got
            self.fresh, self.looked = self.o.fair, time.monotonic()  # unfair: the try was the look
        if self.o.fair:
            self._keep_entry()
        if self.fresh or time.monotonic() - self.looked >= LOOK_EVERY_S:
            got = self._look()
            if got is not None:
                return got
        self._sleep()
        return None

    def _look(self) -> tuple[Grant, float] | None:
        """Read the free slots (and, if one is free, the queue ahead): try if
        this waiter's turn has come, else choose what to sleep on."""
        self.fresh, self.looked, self.revision = False, time.monotonic(), None
        o, kv = self.o, self.store.kv
        if o.fair:
            self._guard()
            free = o.capacity - len(self.store.leases.holders(o.name))
            if free <= 0:
                return None  # sleep on the lease: a release or an expiry wakes it
            self._guard()
            revision = kv.revision()
            self._guard()
            ahead = sum(1 for key, _ in kv.scan(self.prefix, limit=o.capacity)
                        if self.entry is not None and key < self.entry)  # fmt: skip
            if ahead >= free:  # a slot is free but kept for the waiters ahead
                self.revision = revision
                return None
        self._guard()
        return self._try()

    def _sleep(self) -> None:
        """One bounded store wait; a wait that ends before its timeout (a
        release, a queue change, an expiry) makes the next step look again."""
        now = time.monotonic()
        step = min(self.remaining(), self.refresh_at - now, self.looked + LOOK_EVERY_S - now)
        if self.cancel is not None:
            step = min(step, CANCEL_STEP_S)
        if step <= 0:
            return
        if self.revision is not None:
            self.store.kv.wait(self.prefix, self.revision, step)
        else:
            self.store.leases.wait(self.o.name, step)
        if time.monotonic() - now < step - EARLY_S:
            self.fresh = True

    def _try(self) -> tuple[Grant, float] | None:
        """``leases.acquire`` with this wait's grant id; the grant and the send
        time its renew deadline counts from."""
        leases, o = self.store.leases, self.o
        sent = time.monotonic()
        if not self.unseen:
            self.unseen_since = sent
        earlier, self.unseen = self.unseen, True
        grant = leases.acquire(o.name, o.holder, o.ttl, o.capacity, o.data, self.grant_id)
        if grant is not None and earlier:
            # An earlier attempt whose reply was lost may have made this grant
            # before ``sent``: renew it so the deadline counts from a known
            # send, or (no time left for that) count from that attempt's send.
            if self.remaining() > 0:
                sent = time.monotonic()
                grant = leases.renew([grant], o.ttl)[0]
            else:
                sent = self.unseen_since
        self.unseen = False
        return None if grant is None else (grant, sent)

    def _keep_entry(self) -> None:
        """Take a ticket and write the queue entry, or refresh it when due."""
        kv = self.store.kv
        if self.entry is None:
            self._guard()
            ticket = kv.incr(TICKET_KEY, 1)
            self.entry = f"{self.prefix}{ticket:020d}"
            self._write_entry()
            self.fresh = True
        elif time.monotonic() >= self.refresh_at:
            self._guard()
            sent = time.monotonic()
            if kv.touch(self.entry, self.o.queue_ttl()) is None:
                self._write_entry()  # expired while this waiter was paused: back in, same ticket
                self.fresh = True
            else:
                self.refresh_at = sent + self.o.queue_ttl() / 3

    def _write_entry(self) -> None:
        assert self.entry is not None
        self._guard()
        sent = time.monotonic()
        self.store.kv.put(self.entry, json.dumps(self.o.holder).encode(), ttl=self.o.queue_ttl())
        self.refresh_at = sent + self.o.queue_ttl() / 3

    def _leave(self, gave_up: bool) -> None:
        """Delete the queue entry; after giving up, release a grant an acquire
        may have made unseen. Inline while the wait has time left and the
        backend answers; otherwise a chore of the keeper's cleaner, retried
        until the entry or grant would have expired anyway (a wait's end is a
        promise, and a ghost entry must not hold up newcomers)."""
        now = time.monotonic()
        chores: list[Chore] = []
        if self.entry is not None:
            entry, self.entry = self.entry, None
            chores.append(Chore(f"lease {self.o.name}: leaving the wait queue",
                                lambda store: store.kv.delete(entry),
                                until=now + self.o.queue_ttl()))  # fmt: skip
        if gave_up and self.unseen:
            name, grant_id = self.o.name, self.grant_id
            chores.append(Chore(f"lease {name}: releasing a grant acquired unseen",
                                lambda store: _release_grant(store, name, grant_id),
                                until=now + self.o.ttl))  # fmt: skip
        for chore in chores:
            if not self.failing and self.remaining() > 0:
                try:
                    chore.run(self.store)
                    continue
                except SpaceLost:
                    continue
                except BackendError:
                    self.failing = True
            self.keeper.later(chore)


def _release_grant(store: Store, name: str, grant_id: str) -> None:
    for grant in store.leases.holders(name):
        if grant.id == grant_id:
            store.leases.release(grant)


def keeper(space: Space) -> LeaseKeeper:
    """The lease keeper of ``space`` (one per Space, created on first use)."""
    return space._facade("lease_keeper", LeaseKeeper)
