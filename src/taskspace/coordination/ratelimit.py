"""Global rate limits: one budget shared by every process of a space.

``space.rate_limit("openai", limits={"requests": "500/m", "tokens": "90000/m"},
concurrency=8)`` is the same budget for every worker on every machine that
opens the space (Celery's ``rate_limit`` is per worker).

**Algorithm.** GCRA (the generic cell rate algorithm, a leaky bucket kept
as one number). Each limit ``count/period`` with burst ``B`` costs
``T = period / count`` seconds of *theoretical arrival time* per unit of
cost; its TAT is stored in the KV key ``taskspace/ratelimits/<name>/<limit>``.
A cost ``c`` is admitted at lease-clock time ``now`` iff

    max(TAT, now) + c*T - B*T <= now

and then ``TAT := max(TAT, now) + c*T``. Every limit of one acquisition is
checked and written in ONE ``kv.txn`` whose ``VersionIs`` compares make it
atomic across processes (a conflict re-reads and decides again). ``now`` is
always ``store.clock.now()``, the store's lease clock, never this process's
clock.

**Guarantee.** For each limit, over any window of ``W`` seconds of the lease
clock, the cost admitted across all processes is at most
``count/period * W + burst`` (admissions are stamped with the clock reading
that decided them, taken just before the txn that commits them; W is exact
to float rounding: a decision may admit EPSILON_S = 1 µs early). In the long
run the admitted rate is exactly ``count/period``. ``burst`` defaults to
DEFAULT_BURST = 2 units of cost, so ``"600/m"`` admits at most 602 in any
minute and 600 per minute in the long run. (Celery's token bucket holds 1;
with 1, every admission loses the time between its due moment and the
clock reading of the caller that takes it, and 4 processes on a loaded
machine got 583 of "600/m" in 60 s; a second unit absorbs up to one interval
of such lag per admission.) Give a larger burst to let an idle budget be
spent at once (``burst=50``), and for weighted costs: a cost above a
limit's burst can never fit and is refused with ConfigError (a
``"90000/m"`` token budget charged 1200 at a time needs ``burst`` >= 1200).

**Concurrency.** ``concurrency=K`` adds a semaphore (lease ``ratelimit/<name>``
with K slots, see :mod:`taskspace.coordination.lease`): at most K permits
are held at once; ``Permit.release()`` (or leaving its ``with`` block) gives
the slot back, and a holder that dies gives it back when its lease expires
(``ttl``). The rate budget spent by an acquisition is never refunded.

**Waiting.** ``try_acquire`` never waits for budget or a slot: a Permit or
None after one decision (two or three store calls, plus two for a
concurrency slot; a decision that loses a race with another process is
re-read and made again, at most CONFLICTS_MAX times). ``acquire(wait=...)`` takes a concurrency slot
first (waiting on ``leases.wait``), then sleeps until the computed moment the
budget allows, on ``kv.wait`` of the limiter's keys: a change made by another
process wakes it, and it reads the change from the feed and re-plans, so it
never polls. Since a TAT only moves forward, a waiter that cannot be admitted
within ``wait`` raises :class:`~taskspace.errors.RateLimited` at once, with
``retry_after``. Waiters are not served in arrival order.

**Reservations** (how the worker gates a task's ``rate_limit=``):
``reserve(holder)`` admits now, or charges the budget at the earliest moment
it allows (an admission stamped in the future: the guarantee holds) and
records it under ``taskspace/ratelimits/<name>/held/<holder>``; the holder's
reserve() near that moment consumes it and starts at it. Each waiting task
is thus deferred once, in claim order. A holder that comes back later than
one cost's worth of budget after its moment (at most RESERVATION_GRACE_S)
finds its reservation void (the charge is spent, not refunded) and is
decided afresh, so overdue work never starts in a bunch: task starts keep
within ``rate * W + burst + cost`` (starts lag their stamps by at most that
grace).

**Faults.** The store decides every admission: when it is unreachable,
``acquire`` and ``try_acquire`` raise BackendError (never admitting without
it); a lost reply of the admitting txn may have spent the budget. A process
paused between reading the clock and its txn commits an admission stamped
before the pause (the guarantee holds on stamps). Processes should agree on
a limiter's rates: each one applies its own to the shared TATs.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from taskspace.backends.base import (
    MAX_DURATION_S,
    Change,
    Compare,
    Delete,
    Put,
    Versioned,
    VersionIs,
    Write,
)
from taskspace.backends.checks import check_seconds
from taskspace.coordination.lease import MIN_TTL_S
from taskspace.errors import Compacted, ConfigError, RateLimited

if TYPE_CHECKING:
    from taskspace.coordination.lease import Lease
    from taskspace.space import Space

KEY_PREFIX = "taskspace/ratelimits/"
LEASE_PREFIX = "ratelimit/"
SINGLE = "rate"  # the limit name of ``rate=``
DEFAULT_TTL_S = 30.0
# A TAT key lives this long past its TAT (after which it means the same as absent).
KEY_SLACK_S = 10.0
# Decisions that lose this many txn races in a row report a short retry.
CONFLICTS_MAX = 16
CONFLICT_RETRY_S = 0.001
EPSILON_S = 1e-6  # float rounding of lease-clock sums
MIN_INTERVAL_S = 1e-6  # the fastest rate: one unit per microsecond
WAIT_OVERSHOOT_S = 0.15
HELD = "held/"  # <prefix>held/<holder>: a reservation (limit names have no '/')
RESERVATION_GRACE_S = 2.0
RESERVE_HORIZON_S = 300.0
DEFAULT_BURST = 2.0  # units of cost (see the module docstring)

UNITS: dict[str, float] = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-zA-Z]+)\s*$")
Cost = float | Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` units per ``period`` seconds, parsed from ``text``."""

    count: int
    period: float
    text: str

    @property
    def interval(self) -> float:
        """Seconds of budget one unit of cost takes (GCRA's T)."""
        return self.period / self.count


def parse_rate(text: Any) -> Rate:
    """``"500/m"``, ``"10/s"``, ``"90000/min"``, ``"10/5s"``, ``"1/1.5h"``: a
    positive integer count per an optional positive number of a unit (s, m,
    h, d or their long forms). ConfigError naming the value otherwise."""
    match = _RATE.match(text) if isinstance(text, str) else None
    unit = UNITS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        raise ConfigError(
            f"rate must look like '500/m', '10/s' or '10/5s' (a count per [n] s, m, h or d),"
            f" got {text!r}"
        )
    count, many = int(match.group(1)), float(match.group(2) or 1)
    period = many * unit
    if count < 1 or not 0 < period <= MAX_DURATION_S:
        raise ConfigError(
            f"rate {text!r} needs a count >= 1 per a period above 0 and up to ten years"
        )
    if period / count < MIN_INTERVAL_S:
        raise ConfigError(
            f"rate {text!r} is too fast: one unit every {period / count:.3g} s, below"
            f" {MIN_INTERVAL_S:g} s (the lease clock's float sums could no longer count it)"
        )
    return Rate(count, period, text.strip())


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of a limiter: its rate, burst (in units of cost) and KV key."""

    name: str
    rate: Rate
    burst: float
    key: str

    def to_json(self, tat: float) -> bytes:
        return json.dumps({"tat": tat, "rate": self.rate.text, "burst": self.burst}).encode()


@dataclass(frozen=True, slots=True)
class _Seen:
    """What this process last knew of a limit's key (version None: absent)."""

    version: int | None
    revision: int
    tat: float


def _tat_of(value: bytes | None) -> float:
    if value is None:
        return -math.inf
    try:
        tat = json.loads(value)["tat"]
        return float(tat) if isinstance(tat, int | float) else -math.inf
    except (ValueError, TypeError, KeyError):
        return -math.inf  # not ours: overwritten by the next admission


def _at_json(at: float) -> bytes:
    return json.dumps({"tat": at}).encode()


def _seen(found: Versioned | None) -> _Seen:
    if found is None:
        return _Seen(None, 0, -math.inf)
    return _Seen(found.version, found.revision, _tat_of(found.value))


@dataclass(frozen=True, slots=True)
class _Denied:
    retry_after: float  # seconds on the lease clock
    revision: int  # the newest revision the decision saw
    now: float  # the lease clock of the decision
    limit: str
    read_at: float = 0.0  # this process's monotonic clock when ``now`` was read

    @property
    def due(self) -> float:
        """When to try again, on this process's monotonic clock: measured from
        the clock reading, so the time the decision took is not added."""
        return self.read_at + self.retry_after


def _check_number(label: str, value: Any, *, positive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise ConfigError(f"{label} must be {need}, got {value!r}")
    return float(value)


def _check_wait(wait: Any) -> float | None:
    check_seconds(wait, "wait", optional=True)
    return None if wait is None else float(wait)


def _check_name(label: str, name: Any, *, slash: bool) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"{label} must be a non-empty string without whitespace, got {name!r}")
    if not slash and "/" in name:
        raise ConfigError(f"{label} must not contain '/', got {name!r}")
    return name


def escape(text: str) -> str:
    """``text`` as one part of a KV key or limiter name: '%', '/' and
    whitespace written as ``%XX`` (any string maps to a valid, distinct name)."""
    return "".join(f"%{ord(c):02X}" if c in "%/" or c.isspace() else c for c in text)


def build_limits(name: str, rate: Any, burst: Any, limits: Any) -> dict[str, Limit]:
    """The limits of a limiter from its ``rate``/``burst``/``limits`` arguments."""
    rates: dict[str, Rate] = {}
    if rate is not None:
        rates[SINGLE] = parse_rate(rate)
    if limits is not None:
        if not isinstance(limits, Mapping) or not limits:
            raise ConfigError(f"limits must be a non-empty dict of name -> rate, got {limits!r}")
        for limit, text in limits.items():
            _check_name("limit name", limit, slash=False)
            if limit in rates:
                raise ConfigError(f"limit {limit!r} is given twice (rate= is named {SINGLE!r})")
            rates[limit] = parse_rate(text)
    bursts = _bursts(burst, rates)
    return {
        limit: Limit(limit, r, bursts.get(limit, DEFAULT_BURST), f"{KEY_PREFIX}{name}/{limit}")
        for limit, r in rates.items()
    }


def _bursts(burst: Any, rates: Mapping[str, Rate]) -> dict[str, float]:
    if burst is None:
        return {}
    if isinstance(burst, Mapping):
        unknown = sorted(set(burst) - set(rates))
        if unknown:
            raise ConfigError(
                f"burst names unknown limit(s) {', '.join(map(repr, unknown))};"
                f" limits: {', '.join(rates) or 'none'}"
            )
        return {k: _check_number(f"burst of {k!r}", v, positive=True) for k, v in burst.items()}
    if len(rates) != 1:
        raise ConfigError(
            f"burst={burst!r} is ambiguous with {len(rates)} limits;"
            " give a dict of limit name -> burst"
        )
    return {next(iter(rates)): _check_number("burst", burst, positive=True)}


@dataclass(frozen=True, slots=True)
class Plan:
    """When a cost fits every limit: ``at`` (lease clock, never before ``now``),
    the limit that waits longest (``""`` when none waits) and each limit's TAT
    after an admission stamped ``at``."""

    at: float
    worst: str
    tats: list[float]


def plan(limits: list[Limit], costs: list[float], seen: list[_Seen], now: float) -> Plan:
    """GCRA for several limits at once. Limit i admits cost c at time t iff
    ``max(TAT_i, t) + c*T_i - B_i*T_i <= t``; ``at`` is the earliest t >= now at
    which every limit admits, and charging each limit as admitted at ``at``
    (``TAT_i := max(TAT_i, at) + c*T_i``) keeps every limit's guarantee."""
    at, worst = now, ""
    for limit, cost, s in zip(limits, costs, seen, strict=True):
        interval = limit.rate.interval
        allow = max(s.tat, now) + (cost - limit.burst) * interval
        if allow > at + EPSILON_S:
            at, worst = allow, limit.name
    tats = [
        max(s.tat, at) + c * lim.rate.interval
        for lim, c, s in zip(limits, costs, seen, strict=True)
    ]
    return Plan(at, worst, tats)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`RateLimiter.reserve` did: ``delay`` seconds until the
    reserved moment ``at`` (lease clock; delay 0: start now); ``charged``: the
    budget was taken (False past the horizon: nothing was reserved);
    ``held``: recorded under the holder, to be consumed by its reserve() near
    that moment (not held: the caller may start once ``delay`` has passed)."""

    delay: float
    charged: bool = True
    held: bool = False
    at: float = 0.0


class Permit:
    """An admission by a :class:`RateLimiter`.

    ``cost`` is what it was charged per limit, ``admitted_at`` the lease-clock
    time that decided it, ``lease`` the concurrency slot it holds (None
    without ``concurrency``). ``release()`` (idempotent; also on leaving a
    ``with``/``async with`` block) gives the slot back; spent budget is not
    refunded."""

    def __init__(
        self,
        limiter: RateLimiter,
        cost: Mapping[str, float],
        admitted_at: float,
        lease: Lease | None = None,
    ) -> None:
        self.limiter = limiter
        self.cost = dict(cost)
        self.admitted_at = admitted_at
        self.lease = lease
        self._released = False

    def __repr__(self) -> str:
        return f"<Permit {self.limiter.name} cost={self.cost} at={self.admitted_at:.3f}>"

    @property
    def held(self) -> bool:
        """False once released, or once its concurrency slot was lost."""
        return not self._released and (self.lease is None or self.lease.held)

    def release(self) -> None:
        """Give the concurrency slot back (nothing without one); idempotent."""
        if self._released:
            return
        self._released = True
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.lease is None:
            self._released = True
        else:
            await asyncio.to_thread(self.release)


class RateLimiter:
    """A rate limit shared by every process of ``space`` (see the module docstring).

    ``rate``: one limit, ``"500/m"``; ``limits``: several, ``{"requests":
    "500/m", "tokens": "90000/m"}`` (both may be given; ``rate`` is the limit
    named ``"rate"``). ``burst``: the most cost admitted at once from idle,
    default DEFAULT_BURST (2 units; weighted costs need a burst of at least
    the largest cost); a number (one limit) or a dict per limit.
    ``concurrency``: at most this many permits held at once; ``ttl``: the
    lease of a concurrency slot (a dead holder's slot returns after it).
    Bad arguments raise ConfigError naming the value; nothing is written.
    """

    def __init__(
        self,
        space: Space,
        name: str,
        rate: str | None = None,
        *,
        burst: float | Mapping[str, float] | None = None,
        limits: Mapping[str, str] | None = None,
        concurrency: int | None = None,
        ttl: float = DEFAULT_TTL_S,
    ) -> None:
        self.space = space
        self.name = _check_name("rate limit name", name, slash=False)
        self.limits = build_limits(name, rate, burst, limits)
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ConfigError(f"concurrency must be an integer >= 1 or None, got {concurrency!r}")
        if not self.limits and concurrency is None:
            raise ConfigError(f"rate limit {name!r} needs a rate, limits or concurrency")
        self.concurrency = concurrency
        check_seconds(ttl, "ttl", minimum=MIN_TTL_S)
        self.ttl = float(ttl)
        self.prefix = f"{KEY_PREFIX}{name}/"
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        rates = ", ".join(f"{k}={v.rate.text} burst {v.burst:g}" for k, v in self.limits.items())
        return f"<RateLimiter {self.name} {rates} concurrency={self.concurrency}>"

    def bound_to(self, space: Space) -> RateLimiter:
        """The same limiter on another Space (the CLI's ``--url``)."""
        other = RateLimiter.__new__(RateLimiter)
        other.__dict__.update(self.__dict__)
        other.space, other._seen, other._lock = space, {}, threading.Lock()
        return other

    # -- public API ----------------------------------------------------------

    def try_acquire(self, cost: Cost = 1) -> Permit | None:
        """A Permit if the budget (and a concurrency slot) allows ``cost`` now,
        else None; never blocks. ``cost``: a number charged to every limit, or
        a dict of limit name -> cost (limits not named are not charged)."""
        costs = self.costs(cost)
        lease = self.slot(0.0)
        if self.concurrency is not None and lease is None:
            return None
        try:
            verdict = self._attempt(costs)
        except BaseException:
            _release(lease)
            raise
        if isinstance(verdict, _Denied):
            _release(lease)
            return None
        return Permit(self, costs, verdict, lease)

    def acquire(self, cost: Cost = 1, wait: float | None = None) -> Permit:
        """Block until the budget allows ``cost`` (and a slot is free), at most
        ``wait`` seconds (None: as long as it takes; 0: try once). Raises
        RateLimited with ``retry_after`` when it cannot be admitted within
        ``wait`` (at once when the budget's own arithmetic says so),
        ConfigError when ``cost`` can never fit, BackendError when the store
        fails."""
        costs = self.costs(cost)
        wait_s = _check_wait(wait)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        lease = self.slot(wait_s)
        if self.concurrency is not None and lease is None:
            raise RateLimited(
                f"rate limit {self.name!r}: all {self.concurrency} concurrency slots are held",
                retry_after=None,
            )
        try:
            return Permit(self, costs, self._wait_for_budget(costs, deadline), lease)
        except BaseException:
            _release(lease)
            raise

    async def try_acquire_async(self, cost: Cost = 1) -> Permit | None:
        """:meth:`try_acquire` off the event loop."""
        return await asyncio.to_thread(self.try_acquire, cost)

    async def acquire_async(self, cost: Cost = 1, wait: float | None = None) -> Permit:
        """:meth:`acquire` for asyncio code: store calls run off the event loop,
        budget waits are ``asyncio.sleep`` and the concurrency slot is waited
        for on a thread of its own. Cancellable at any point: a cancelled call
        holds no slot and no place in the slot queue once its thread stops
        (within about half a second), and never occupies the loop's default
        executor; a decision already sent may have spent budget."""
        costs = self.costs(cost)
        wait_s = _check_wait(wait)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        lease = await _slot_async(self, wait_s)
        if self.concurrency is not None and lease is None:
            raise RateLimited(
                f"rate limit {self.name!r}: all {self.concurrency} concurrency slots are held",
                retry_after=None,
            )
        try:
            while True:
                verdict = await asyncio.to_thread(self._attempt, costs)
                if not isinstance(verdict, _Denied):
                    return Permit(self, costs, verdict, lease)
                self._check_deadline(verdict, deadline)
                await asyncio.sleep(max(0.0, verdict.due - time.monotonic()))
        except BaseException:
            _release_soon(lease)
            raise

    def available(self) -> dict[str, float]:
        """The cost each limit would admit right now (read only, one snapshot)."""
        limits = list(self.limits.values())
        found = self.space.store.kv.get_many([lim.key for lim in limits])
        now = self.space.store.clock.now()
        return {
            lim.name: max(0.0, lim.burst - max(0.0, _seen(f).tat - now) / lim.rate.interval)
            for lim, f in zip(limits, found, strict=True)
        }

    def costs(self, cost: Cost) -> dict[str, float]:
        """``cost`` per limit (zero costs left out); ConfigError for a bad or
        unknown one, or one above its limit's burst (it could never fit)."""
        if isinstance(cost, Mapping):
            unknown = sorted(set(cost) - set(self.limits))
            if unknown:
                raise ConfigError(
                    f"cost names unknown limit(s) {', '.join(map(repr, unknown))} of rate"
                    f" limit {self.name!r}; limits: {', '.join(self.limits) or 'none'}"
                )
            each = {k: _check_number(f"cost of {k!r}", v, positive=False) for k, v in cost.items()}
        else:
            value = _check_number("cost", cost, positive=False)
            each = dict.fromkeys(self.limits, value)
        for limit, value in each.items():
            if value > self.limits[limit].burst:
                lim = self.limits[limit]
                raise ConfigError(
                    f"cost {value:g} of limit {limit!r} ({lim.rate.text}) can never fit its burst"
                    f" of {lim.burst:g}; raise burst or split the cost"
                )
        return {k: v for k, v in each.items() if v > 0}

    # -- the decision ----------------------------------------------------------

    def _attempt(self, costs: Mapping[str, float]) -> float | _Denied:
        """One admission decision: the lease-clock time it was admitted at, or
        why not. Starts from what this process last saw (right if nothing
        changed since: the txn's compares check it), re-reads on a conflict."""
        clock = self.space.store.clock
        if not costs:
            return clock.now()
        limits = [self.limits[k] for k in costs]
        amounts = list(costs.values())
        seen = self._cached(limits)
        for _ in range(CONFLICTS_MAX):
            if seen is None:
                seen = self._read(limits)
            sent = time.monotonic()
            now = clock.now()
            read_at = (sent + time.monotonic()) / 2
            p = plan(limits, amounts, seen, now)
            if p.worst:
                revision = max(s.revision for s in seen)
                return _Denied(p.at - now, revision, now, p.worst, read_at)
            if self._commit(limits, seen, p.tats, now):
                return now
            seen = None
        return _Denied(CONFLICT_RETRY_S, 0, clock.now(), "", time.monotonic())

    def _read(self, limits: list[Limit]) -> list[_Seen]:
        found = self.space.store.kv.get_many([lim.key for lim in limits])
        seen = [_seen(f) for f in found]
        self._remember(limits, seen)
        return seen

    def _commit(
        self,
        limits: list[Limit],
        seen: list[_Seen],
        tats: list[float],
        now: float,
        compares: Sequence[Compare] = (),
        writes: Sequence[Write] = (),
    ) -> bool:
        """Write the new TATs if every limit is still as ``seen`` (and the extra
        compares hold); True if written."""
        pairs = list(zip(limits, seen, tats, strict=True))
        result = self.space.store.kv.txn(
            [VersionIs(lim.key, s.version) for lim, s, _ in pairs] + list(compares),
            [
                Put(lim.key, lim.to_json(tat), ttl=max(tat - now, 0.0) + KEY_SLACK_S)
                for lim, _, tat in pairs
            ]
            + list(writes),
        )
        if result.ok:
            self._remember(
                limits,
                [
                    _Seen(v, result.revision, tat)
                    for (_l, _, tat), v in zip(pairs, result.versions, strict=False)
                ],
            )
        return result.ok

    def reserve(
        self,
        holder: str,
        cost: Cost = 1,
        *,
        hold_after: float = 0.0,
        horizon: float = RESERVE_HORIZON_S,
    ) -> Reservation:
        """Admit ``cost`` now, or reserve it at the earliest moment the budget
        allows (charged now, stamped at that moment: the guarantee holds) and
        return the delay until then (the caller starts at that moment, not
        before). A reservation more than ``hold_after`` seconds away is recorded
        under ``holder`` (a task id, any non-empty string: it is escaped into
        the key) and returned ``held``; the holder's reserve() consumes it
        instead of charging again: from ``hold_after`` before its moment
        (returned not held, with the delay left to wait) until its grace after
        it (delay 0). The grace is the time one ``cost`` takes on the tightest
        limit, at most RESERVATION_GRACE_S, so starts lag their stamps by at
        most one cost's worth of budget: in start times each window holds at
        most ``rate * W + burst + cost``. A holder later than that (its worker
        was busy or down) finds its reservation void, its charge spent, and is
        decided afresh: overdue work never starts in a bunch. A moment more
        than ``horizon`` away is not reserved (``charged=False``). This is how
        the worker gates a task with ``rate_limit=``."""
        costs = self.costs(cost)
        check_seconds(hold_after, "hold_after")
        if not isinstance(holder, str) or not holder:
            raise ConfigError(f"holder must be a non-empty string, got {holder!r}")
        hold_key = f"{self.prefix}{HELD}{escape(holder)}"
        limits = [self.limits[k] for k in costs]
        amounts = list(costs.values())
        grace = min(
            [
                RESERVATION_GRACE_S,
                *(lim.rate.interval * c for lim, c in zip(limits, amounts, strict=True)),
            ]
        )
        for _ in range(CONFLICTS_MAX):
            found = self.space.store.kv.get_many([hold_key, *(lim.key for lim in limits)])
            hold, seen = found[0], [_seen(f) for f in found[1:]]
            now = self.space.store.clock.now()
            held_at = _tat_of(hold.value) if hold is not None else -math.inf
            same_hold = VersionIs(hold_key, None if hold is None else hold.version)
            if hold is not None and now < held_at - hold_after - EPSILON_S:
                return Reservation(held_at - now, held=True, at=held_at)  # early: still reserved
            if hold is not None and now <= held_at + grace:
                if self.space.store.kv.txn([same_hold], [Delete(hold_key)]).ok:
                    return Reservation(max(0.0, held_at - now), at=held_at)
                continue
            p = plan(limits, amounts, seen, now)
            delay = p.at - now if p.worst else 0.0
            if delay > horizon:
                return Reservation(delay, charged=False)
            held = delay > hold_after
            writes: list[Write] = []
            if held:
                writes.append(
                    Put(hold_key, _at_json(p.at), ttl=delay + RESERVATION_GRACE_S + KEY_SLACK_S)
                )
            elif hold is not None:
                writes.append(Delete(hold_key))  # a void one
            if self._commit(limits, seen, p.tats, now, [same_hold], writes):
                return Reservation(delay, held=held, at=p.at)
        return Reservation(CONFLICT_RETRY_S, charged=False)

    def _cached(self, limits: list[Limit]) -> list[_Seen] | None:
        with self._lock:
            seen = [self._seen.get(lim.key) for lim in limits]
        return None if any(s is None for s in seen) else seen  # type: ignore[return-value]

    def _remember(self, limits: list[Limit], seen: list[_Seen]) -> None:
        with self._lock:
            for lim, s in zip(limits, seen, strict=True):
                old = self._seen.get(lim.key)
                if old is None or s.revision >= old.revision:
                    self._seen[lim.key] = s

    def _forget(self, costs: Mapping[str, float]) -> None:
        with self._lock:
            for limit in costs:
                self._seen.pop(self.limits[limit].key, None)

    def _check_deadline(self, denied: _Denied, deadline: float | None) -> None:
        if deadline is not None and denied.due > deadline:
            which = f"limit {denied.limit!r}" if denied.limit else "its txn (contention)"
            raise RateLimited(
                f"rate limit {self.name!r}: budget of {which} spent;"
                f" retry after {denied.retry_after:.3f} s",
                retry_after=denied.retry_after,
            )

    # -- waiting ---------------------------------------------------------------

    def _wait_for_budget(self, costs: Mapping[str, float], deadline: float | None) -> float:
        while True:
            verdict = self._attempt(costs)
            if not isinstance(verdict, _Denied):
                return verdict
            self._check_deadline(verdict, deadline)
            self._sleep(costs, verdict)

    def _sleep(self, costs: Mapping[str, float], denied: _Denied) -> None:
        """Sleep until ``denied`` says the budget allows, on ``kv.wait`` of the
        limiter's keys: a change by another process wakes it; the change is
        read from the feed into what this process knows and the sleep re-planned
        (a TAT only moves forward, so usually later). The last WAIT_OVERSHOOT_S
        are slept locally (a store's blocking wait may end that late: Redis
        times blocked clients out at its ``hz``). Returns when it is time to try
        again."""
        if not denied.limit:  # lost CONFLICTS_MAX races: others were admitted meanwhile
            time.sleep(denied.retry_after)
            return
        kv = self.space.store.kv
        began = denied.read_at
        due = denied.due
        revision = denied.revision
        while (left := due - time.monotonic()) > 0:
            if left <= WAIT_OVERSHOOT_S:
                time.sleep(left)
                return
            until = time.monotonic() + left - WAIT_OVERSHOOT_S
            kv.wait(self.prefix, revision, left - WAIT_OVERSHOOT_S)
            if time.monotonic() >= until:
                continue  # timed out: sleep the rest
            try:
                changes = kv.changes(self.prefix, revision)
            except Compacted:
                self._forget(costs)
                return
            if changes:
                revision = changes[-1].revision
                estimate = denied.now + (time.monotonic() - began)  # the lease clock
                wait = self._replan(costs, changes, estimate)
                if wait is None:
                    return
                due = time.monotonic() + wait

    def _replan(
        self, costs: Mapping[str, float], changes: list[Change], now: float
    ) -> float | None:
        """Fold ``changes`` into what this process knows; the wait until
        ``costs`` fits at ``now``, or None to try at once."""
        self._apply(changes)
        limits = [self.limits[k] for k in costs]
        seen = self._cached(limits)
        if seen is None:
            return None
        p = plan(limits, list(costs.values()), seen, now)
        return p.at - now if p.worst else None

    def _apply(self, changes: list[Change]) -> None:
        keys = {lim.key: lim for lim in self.limits.values()}
        for change in changes:
            limit = keys.get(change.key)
            if limit is None:
                continue
            if change.kind == "put":
                seen = _Seen(change.version, change.revision, _tat_of(change.value))
            else:
                seen = _Seen(None, change.revision, -math.inf)
            self._remember([limit], [seen])

    # -- concurrency -------------------------------------------------------------

    def slot(self, wait: float | None) -> Lease | None:
        """A concurrency slot (an auto-renewed lease of ``ratelimit/<name>``)
        within ``wait`` seconds (None: as long as it takes), or None (also when
        the limiter has no concurrency limit). Release it with ``.release()``."""
        if self.concurrency is None:
            return None
        from taskspace.coordination.lock import acquire_lease

        return acquire_lease(
            self.space,
            f"{LEASE_PREFIX}{self.name}",
            ttl=self.ttl,
            capacity=self.concurrency,
            wait=wait,
        )


async def _slot_async(limiter: RateLimiter, wait: float | None) -> Lease | None:
    """``limiter.slot`` for asyncio code: the wait runs on a daemon thread of
    its own (never the loop's default executor); cancelling the caller ends
    it within the lease module's CANCEL_STEP_S, leaves the wait queue and
    gives back a slot taken after the cancel."""
    if limiter.concurrency is None:
        return None
    from taskspace.coordination.lease import acquire_lease_async

    return await acquire_lease_async(
        limiter.space,
        f"{LEASE_PREFIX}{limiter.name}",
        ttl=limiter.ttl,
        capacity=limiter.concurrency,
        wait=wait,
    )


def _release_soon(lease: Lease | None) -> None:
    """Give a slot back from a thread of its own (a cancelled coroutine must
    not block its event loop on a store call)."""
    if lease is not None:
        threading.Thread(target=lease.release, name="taskspace-ratelimit", daemon=True).start()


def _release(lease: Lease | None) -> None:
    if lease is not None:
        lease.release()
