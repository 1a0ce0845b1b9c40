"""Fenced distributed locks and semaphores, served in arrival order.

::

    with space.lock("gpu-0", ttl=10, wait=5) as lease:    # LockTimeout after 5 s
        write_checkpoint(fence=lease.token)
    with space.semaphore("openai", limit=8, ttl=30): ...

**Guarantee.** At most one holder of a lock (``limit`` of a semaphore) at a
time, as the store's lease of the name (``lock/<name>``, ``sem/<name>``)
enforces; each acquisition is a :class:`~taskspace.coordination.lease.Lease`
with a fresh fencing token, renewed in the background and given up by the
holder before its TTL can run out on the store (the renew deadline: see
:mod:`taskspace.coordination.lease`). Only the holder can renew or release;
a stale grant's ``release`` returns False and ``renew`` raises LeaseLost.

**Waiting.** ``wait=None`` blocks until acquired, ``wait=0`` tries once (a
one-key scan of the queue and ``leases.acquire``), ``wait=x`` returns (None,
or LockTimeout from ``with``) within ``x`` seconds plus the latency of one
store call in flight: after the first try, the time left is checked before
every store call, and every store wait ends by the deadline (a Redis call on
a stalled server fails after its socket timeout). Leaving the queue after a
wait that ran out is done in the background. Waiters sleep in
``store.leases.wait`` (woken by a release or an expiry, in another process
within milliseconds) or ``store.kv.wait`` on the queue (woken when a waiter
ahead leaves it); they read holders and queue again only when such a wait
ended early (and at least every 5 s), and otherwise wake only to refresh
their queue entry, every third of its TTL: a blocked waiter makes a few
store calls per second at most, whatever the lease's TTL.

**Fairness (no starvation).** A waiter that cannot take a slot at once
takes a ticket (``kv.incr`` of the space's one counter
``taskspace/locks/ticket``) and writes
``taskspace/locks/<lease name>/q/<ticket, 20 digits>`` (its holder as JSON)
with a TTL of the lease's TTL bounded to 1-5 s, which it refreshes
(``kv.touch``) while it waits (the lease name is URL-quoted in keys). It
calls ``leases.acquire`` only when the live entries ahead of it are fewer
than the free slots (capacity minus live holders), so a slot freed by a
release goes to the oldest waiter; a newcomer that finds anyone queued
queues behind them, and ``wait=0`` never takes a slot while someone is
queued. Every waiter therefore acquires after at most (waiters ahead of it)
hand-overs. Limits: arrival is the ticket, so a newcomer that finds the
queue empty at the very instant a slot frees may take it before a waiter
that is just writing its entry; a waiter paused longer than its entry's TTL
loses the entry and re-writes it with its old ticket when it resumes; a
dead or paused waiter holds up the waiters behind it for at most that TTL;
``fair=False`` skips the queue (cheaper, no order).

**Backend down.** A BackendError during a wait is retried with backoff
until the wait ends; the wait then returns None if some store call
succeeded during it, and re-raises the BackendError if the backend was down
for the whole wait (``wait=None`` retries forever). SpaceLost is never
retried. An acquire whose reply was lost is retried with the same grant id,
so it never takes a second slot. A queue entry, or a grant an acquire may
have made unseen, that cannot be cleaned up when the wait ends is handed to
the Space's lease keeper, which retries in the background until the backend
answers (or the thing has expired by itself), so a blip never leaves a
ghost entry holding up newcomers.

**asyncio.** ``async with lock`` and ``await lock.acquire_async()`` wait on a
daemon thread of their own, never the loop's default executor. Cancelling
the waiting task stops the wait within half a second plus one store call;
a lease the thread acquired after the cancel is released at once, so a
cancelled ``async with`` never leaves the lock taken.

The uncontended path is two store calls: a one-key scan of the queue (empty)
and ``leases.acquire``.
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from taskspace.backends.base import Grant
from taskspace.coordination.lease import (
    Lease,
    LeaseCallback,
    LeaseOptions,
    acquire,
    acquire_async,
    acquire_lease,
    acquire_lease_async,
    check_wait,
    default_holder,
    run_in_thread,
)
from taskspace.errors import ConfigError, LockTimeout

if TYPE_CHECKING:
    from taskspace.space import Space


class _Default:
    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Final = _Default()


class Lock:
    """A fenced distributed lock: at most one holder at a time (see the module
    docstring for waiting, fairness and faults).

    ``acquire(wait=...)`` returns a :class:`Lease` or None; ``with lock as
    lease`` (and ``async with``) raises LockTimeout if not acquired within
    ``wait`` and releases on exit. ``ttl`` is the lease's TTL (at least
    0.1 s); ``holder`` names this holder for people (default ``host:pid``);
    ``data`` rides on the grant; ``on_lost``/``on_renewed`` as
    :class:`Lease`; ``fair=False`` skips the arrival-order queue.
    """

    prefix = "lock/"
    capacity = 1

    def __init__(
        self,
        space: Space,
        name: str,
        *,
        ttl: float = 10.0,
        wait: float | None = None,
        holder: str | None = None,
        data: bytes = b"",
        on_lost: LeaseCallback | None = None,
        on_renewed: LeaseCallback | None = None,
        fair: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name={name!r}: must be a non-empty string")
        check_wait(wait)
        self.space = space
        self.name = name
        self.wait = wait
        self.options = LeaseOptions(self.prefix + name, ttl, self.capacity, holder
                                    if holder is not None else default_holder(), data, on_lost,
                                    on_renewed, fair)  # fmt: skip
        self._entered: contextvars.ContextVar[tuple[Lease, ...]] = contextvars.ContextVar(
            f"taskspace-{self.options.name}", default=()
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ttl={self.options.ttl}>"

    @property
    def lease_name(self) -> str:
        """The store's lease name (``lock/<name>``, ``sem/<name>``)."""
        return self.options.name

    @property
    def ttl(self) -> float:
        return self.options.ttl

    def acquire(self, wait: float | _Default | None = DEFAULT) -> Lease | None:
        """A held lease, or None if not acquired within ``wait`` (default: the
        one given at construction; None blocks, 0 tries once)."""
        return acquire(self.space, self.options, self._wait(wait))

    async def acquire_async(self, wait: float | _Default | None = DEFAULT) -> Lease | None:
        """``acquire`` for asyncio code: waits on a thread of its own; a
        cancelled call stops waiting and never leaves the lock taken."""
        return await acquire_async(self.space, self.options, self._wait(wait))

    def _wait(self, wait: float | _Default | None) -> float | None:
        if isinstance(wait, _Default):
            wait = self.wait
        check_wait(wait)
        return wait

    def holders(self) -> list[Grant]:
        """The live grants of this lock, oldest first."""
        return self.space.store.leases.holders(self.options.name)

    def _got(self, lease: Lease | None) -> Lease:
        if lease is None:
            raise LockTimeout(f"{self.options.name} not acquired within wait={self.wait} s")
        return self._push(lease)

    def _push(self, lease: Lease) -> Lease:
        self._entered.set((*self._entered.get(), lease))
        return lease

    def _pop(self) -> Lease:
        *rest, lease = self._entered.get()
        self._entered.set(tuple(rest))
        return lease

    def __enter__(self) -> Lease:
        return self._got(self.acquire())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pop().release()

    async def __aenter__(self) -> Lease:
        return self._got(await self.acquire_async())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._pop()
        await run_in_thread(lease.release, f"taskspace-release-{lease.name}")


__all__ = ["Lease", "Lock", "Semaphore", "acquire_lease", "acquire_lease_async"]


class Semaphore(Lock):
    """At most ``limit`` holders at once across every process of the space;
    otherwise exactly as :class:`Lock` (``ttl`` defaults to 30 s). Every
    holder of a name must use the same ``limit`` (else ConfigError while
    others hold it)."""

    prefix = "sem/"

    def __init__(self, space: Space, name: str, limit: int, *, ttl: float = 30.0,
                 **options: Any) -> None:  # fmt: skip
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit={limit!r}: must be an integer >= 1")
        self.capacity = limit
        super().__init__(space, name, ttl=ttl, **options)

    @property
    def limit(self) -> int:
        return self.capacity
