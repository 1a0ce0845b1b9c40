"""Periodic tasks: a function fired on a cron or fixed-interval schedule, each tick once.

``@space.periodic(cron="*/5 * * * *", tz="Europe/Berlin")`` or ``@space.periodic(every=60)``
registers the function as a task and a :class:`Schedule`. :func:`fire_due` pushes one task
per due tick, with the id ``periodic:<schedule name>:<tick as Unix seconds>``. It is called
by the elected maintainer on every maintenance pass *and* by every other worker whose
Space has schedules, when one of its ticks is due (:mod:`taskspace.worker.maintainer`):
schedules live in code, so a maintainer elected from another app, or from a worker that
did not import the module defining a schedule, does not know it. Any number of callers
is safe (below), and a worker that is not the maintainer makes one pass per due tick,
not one per second. The maintainer also warns, once per missed tick, about a record
whose next tick is overdue with no schedule of that name in its process (a schedule
no running worker defines any more, or defined only by workers that are down).

**Ticks.** Cron ticks are computed by croniter in the schedule's time zone on the
store's wall clock (``store.clock.wall()``), so every process agrees on them whatever
its own clock or zone. Across DST changes (Vixie cron's rule): a local time skipped
by a spring-forward fires once, at the first instant after the gap; a local time
repeated by a fall-back fires once (its first occurrence) unless the hour field is
``*``, in which case every real hour fires. ``every=N`` ticks at the Unix times that
are multiples of N seconds (the zone plays no part).

**State.** One KV record per schedule, ``taskspace/periodic/<name>``: JSON with
``last_tick`` (every tick up to it was fired or skipped), ``pending`` (ticks claimed
but not yet confirmed pushed), ``last_fired``, ``last_task_id``, ``fired_at`` (wall),
``fired`` (a count) and ``next_tick`` (the first tick after ``last_tick``). The first
pass that sees a new schedule starts it from now: ticks before that never fire.

**Missed ticks** (``catch_up``). A tick is *on time* while it is at most ``on_time``
seconds old (ON_TIME_S by default; a worker passes at least its failover bound,
``maintainer_ttl + maintainer_retry`` plus two maintenance intervals, so a failover
within that bound never makes a tick "missed"); on-time ticks always fire. Older ones
were missed (nobody fired for a while): ``"latest"`` fires the most recent missed tick
(one run standing for all of them) besides the on-time ones, ``"all"`` fires every
missed tick, oldest first, at most MAX_TICKS_PER_PASS per pass (the rest on the next
passes), ``"none"`` fires none.

**Exactly once, how.** A pass reads the record, decides which ticks fire and which
are skipped, and *claims* them with a compare-and-set on the record's version
(``pending``); only then does it push them, and a second compare-and-set clears
``pending``. So:

- A stale maintainer (paused, or a deposed leader) that read an older record loses
  its claim and pushes nothing: the ticks that fire, and those skipped, follow one
  linear history of the record, whatever the number of maintainers.
- A maintainer that dies after its claim leaves the ticks pending; the next pass
  pushes them again. The task id is the tick, and a push is idempotent by id, so
  a tick whose push did land is not written twice.
- A push that succeeds followed by a compare-and-set that fails: another pass found
  the ticks pending and pushed the same ids (no second task) and cleared them.
- A record that says a tick fired is never undone: a tick at or before
  ``last_tick`` is never pushed again, even after its task was reaped, purged or
  the wall clock stepped back.

The one hole: a task's id dedups its tick only while the task exists (until
``result_ttl`` after it finished). A pending tick is therefore pushed only while it
is younger than ``result_ttl - STALE_S`` on this process's estimate of the wall
clock, taken right before the push (older pending ticks are dropped and logged,
never pushed late), and a periodic task must keep results at least
MIN_RESULT_TTL_S. A tick could fire twice only if a process stalled more than
STALE_S between that check and its push landing, while the same tick, pushed by
another pass meanwhile, ran and was reaped; or if its task is deleted by hand
(purge) while the tick is still pending (a few milliseconds). ``result_ttl=None``
closes the hole.

**At least once.** A claimed tick is pushed by its claimer or by a later pass,
provided a maintainer runs within its horizon (``result_ttl - STALE_S``; forever
with ``result_ttl=None``).

**Faults.** :func:`fire_due` is bounded in time: it starts no schedule and makes no push
once PASS_BUDGET_S has passed, so it overruns the budget by at most two store round
trips (a schedule's read and claim, or a push begun just in time and its confirmation;
one more per extra push chunk of a large catch-up). Claimed ticks not pushed are pushed
by the next pass, and schedules not reached go first on it. The pass's first schedule
always completes (four round trips), so a store slower than the budget still makes
progress. It raises
BackendError when the store fails: nothing is lost, the record says where to
resume. Any other error of one schedule is logged and the others carry on.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import CroniterBadDateError, CroniterError, croniter

from taskspace.backends.base import TaskSpec, push_chunks
from taskspace.errors import BackendError, ConfigError, TaskspaceError
from taskspace.tasks.options import SPACE_DEFAULT, TaskOptions

if TYPE_CHECKING:
    from taskspace.backends.base import Store
    from taskspace.space import Space
    from taskspace.tasks.task import Task

CatchUp = Literal["latest", "all", "none"]
CATCH_UP: tuple[str, ...] = ("latest", "all", "none")

KEY_PREFIX = "taskspace/periodic/"
TASK_ID_PREFIX = "periodic:"
# A tick at most this old is on time: it fires under every policy. At least the default
# failover bound (maintainer_ttl 10 + retry 2 + two 1 s maintenance intervals); workers
# pass their own bound when it is larger.
ON_TIME_S = 30.0
MAX_TICKS_PER_PASS = 1000  # catch_up="all": a larger backlog is fired over several passes
PASS_BUDGET_S = 1.0  # fire_due starts no new schedule after this long
STALE_S = 10.0  # margin between a tick's horizon and its task's result_ttl
MIN_RESULT_TTL_S = 60.0  # a periodic task keeps results at least this long (None: forever)
MAX_EVERY_S = 10 * 365 * 24 * 3600
AUDIT_EVERY_S = 30.0
SCAN_PAGE = 500  # the maintainer looks for records nobody fires at most this often

log = logging.getLogger("taskspace.periodic")


def _next_second(t: float) -> int:
    """The first whole second after ``t``'s (ticks before it are the ticks at or before ``t``)."""
    return math.floor(t) + 1


class _Cron:
    """Cron ticks in a zone: whole Unix seconds, repeats of a fall-back dropped (see module)."""

    def __init__(self, expr: str, zone: tzinfo) -> None:
        self.expr = expr
        self.zone = zone
        try:
            first = croniter(expr, datetime.now(zone))
            first.get_next(datetime)
        except CroniterBadDateError:
            raise ConfigError(f"cron expression {expr!r} never fires") from None
        except (CroniterError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"invalid cron expression {expr!r}: {exc}") from None
        self.every_hour = first.expanded[1] == ["*"] or len(first.expanded[1]) == 24

    def _repeat(self, tick: int) -> bool:
        if self.every_hour:
            return False
        local = datetime.fromtimestamp(tick, self.zone)
        return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()

    def walk(self, start: int, forward: bool) -> Iterator[int]:
        """Ticks strictly after (or before) the whole second ``start``, in order."""
        it = croniter(self.expr, datetime.fromtimestamp(start, self.zone))
        step = it.get_next if forward else it.get_prev
        last, stuck = start, 0
        while stuck < 100:
            try:
                tick = int(step(datetime).timestamp())
            except CroniterBadDateError:  # a year field that ran out
                return
            if (tick <= last) if forward else (tick >= last):
                stuck += 1  # never step back (a zone's quirk); croniter moves on regardless
                continue
            last, stuck = tick, 0
            if not self._repeat(tick):
                yield tick


@dataclass(frozen=True, slots=True)
class Plan:
    """What one pass does to a schedule: fire ``ticks``; every tick up to
    ``last_tick`` is then handled (fired or skipped)."""

    ticks: tuple[int, ...]
    last_tick: int


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """A schedule's record in the store (see the module docstring)."""

    last_tick: int
    pending: tuple[int, ...] = ()
    last_fired: int | None = None
    last_task_id: str | None = None
    fired_at: float | None = None
    fired: int = 0
    next_tick: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps(self)  # a dataclass: a JSON object of its fields

    @classmethod
    def decode(cls, data: bytes) -> ScheduleState:
        doc = orjson.loads(data)
        return cls(
            last_tick=int(doc["last_tick"]), pending=tuple(int(t) for t in doc.get("pending", ())),
            last_fired=doc.get("last_fired"), last_task_id=doc.get("last_task_id"),
            fired_at=doc.get("fired_at"), fired=int(doc.get("fired", 0)),
            next_tick=doc.get("next_tick"),
        )  # fmt: skip


class Schedule:
    """When a periodic task fires: ``cron`` (in zone ``tz``) or ``every`` N seconds,
    and what happens to missed ticks (``catch_up``). Built by :func:`periodic`."""

    __slots__ = ("_cron", "args", "catch_up", "cron", "every", "kwargs", "name", "task", "tz")

    def __init__(
        self,
        task: Task[..., Any],
        *,
        cron: str | None,
        every: int | None,
        tz: str,
        catch_up: CatchUp,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        _cron: _Cron | None,
    ) -> None:
        self.name = task.name
        self.task = task
        self.cron = cron
        self.every = every
        self.tz = tz
        self.catch_up = catch_up
        self.args = args
        self.kwargs = kwargs
        self._cron = _cron

    def __repr__(self) -> str:
        return f"<Schedule {self.name} {self.spec} tz={self.tz} catch_up={self.catch_up}>"

    @property
    def spec(self) -> str:
        """``cron <expression>`` or ``every <N> s``."""
        return f"cron {self.cron}" if self.cron is not None else f"every {self.every} s"

    @property
    def key(self) -> str:
        """The KV key of this schedule's record."""
        return KEY_PREFIX + self.name

    def same_as(self, other: Schedule) -> bool:
        """The same function on the same schedule with the same arguments."""
        return (
            self.task.fn is other.task.fn and self.task.opts == other.task.opts
            and (self.spec, self.tz, self.catch_up, self.args, self.kwargs)
            == (other.spec, other.tz, other.catch_up, other.args, other.kwargs)
        )  # fmt: skip

    def bound_to(self, space: Space) -> Schedule:
        """This schedule, firing on ``space`` (its task as registered there, if it is)."""
        task = space._tasks.get(self.name) or self.task.bound_to(space)
        return Schedule(task, cron=self.cron, every=self.every, tz=self.tz,
                        catch_up=self.catch_up, args=self.args, kwargs=self.kwargs,
                        _cron=self._cron)  # fmt: skip

    # -- ticks (Unix seconds on the store's wall clock) ------------------------

    def next_after(self, t: float) -> int | None:
        """The first tick strictly after ``t`` (None: the expression ran out)."""
        if self.every is not None:
            return (math.floor(t) // self.every + 1) * self.every
        assert self._cron is not None
        return next(self._cron.walk(math.floor(t), forward=True), None)

    def latest_at(self, t: float) -> int | None:
        """The last tick at or before ``t`` (None: there is none)."""
        if self.every is not None:
            return math.floor(t) // self.every * self.every
        assert self._cron is not None
        return next(self._cron.walk(_next_second(t), forward=False), None)

    def ticks(self, after: float, until: float, limit: int = MAX_TICKS_PER_PASS) -> list[int]:
        """Ticks ``t`` with ``after < t <= until``, oldest first, at most ``limit``."""
        out: list[int] = []
        if self.every is not None:
            tick = self.next_after(after)
            while tick is not None and tick <= until and len(out) < limit:
                out.append(tick)
                tick += self.every
            return out
        assert self._cron is not None
        for tick in self._cron.walk(math.floor(after), forward=True):
            if tick > until or len(out) >= limit:
                break
            out.append(tick)
        return out

    def task_id(self, tick: int) -> str:
        """The id of the task of ``tick``: the dedup key of the tick."""
        return f"{TASK_ID_PREFIX}{self.name}:{tick}"

    def horizon(self) -> float | None:
        """How old a tick may be and still be pushed (None: any age); see the module."""
        ttl = self.task.opts.result_ttl
        ttl = self.task.space.result_ttl if ttl == SPACE_DEFAULT else ttl
        return None if ttl is None else float(ttl) - STALE_S

    def plan(self, last_tick: int, now: float, on_time: float = ON_TIME_S) -> Plan:
        """Which ticks after ``last_tick`` fire at ``now`` under ``catch_up``, ticks
        at most ``on_time`` seconds old being on time."""
        horizon = self.horizon()
        lo = last_tick if horizon is None else max(last_tick, math.floor(now - horizon))
        latest = self.latest_at(now)
        if latest is None or latest <= last_tick:
            return Plan((), last_tick)
        if self.catch_up == "all":
            ticks = self.ticks(lo, now)
            if len(ticks) == MAX_TICKS_PER_PASS:
                latest = ticks[-1]
        else:
            on_time_after = max(lo, math.floor(now - on_time))
            ticks = self.ticks(on_time_after, now)
            missed = self.latest_at(on_time_after)  # the most recent missed tick, if any
            if self.catch_up == "latest" and missed is not None and missed > lo:
                ticks = [missed, *ticks]
        if self.catch_up == "all" and lo > last_tick and (self.latest_at(lo) or 0) > last_tick:
            log.warning("periodic %s: ticks older than %.0f s (result_ttl - %.0f s) were"
                        " not fired", self.name, horizon, STALE_S)  # fmt: skip
        return Plan(tuple(ticks), latest)

    # -- the store ---------------------------------------------------------------

    def state(self) -> ScheduleState | None:
        """This schedule's record in its space's store (None: never seen by a maintainer)."""
        found = self.task.space.store.kv.get(self.key)
        return None if found is None else ScheduleState.decode(found.value)

    def specs(self, ticks: Sequence[int]) -> list[TaskSpec]:
        """One task per tick, its id derived from the tick."""
        spec = self.task.spec(self.args, self.kwargs)
        return [replace(spec, id=self.task_id(tick)) for tick in ticks]


def tick_of(task_id: str) -> int | None:
    """The tick (Unix seconds) a periodic task was fired for, from its id; None for a
    task that was not fired by a schedule. In a task: ``tick_of(current_task().id)``."""
    if not task_id.startswith(TASK_ID_PREFIX):
        return None
    _, _, tick = task_id.rpartition(":")
    return int(tick) if tick.isdigit() else None


# -- registration ------------------------------------------------------------------


def _check_every(every: Any) -> int:
    seconds = every.total_seconds() if isinstance(every, timedelta) else every
    ok = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    if not ok or not math.isfinite(seconds) or seconds != int(seconds):
        raise ConfigError(
            f"every must be a whole number of seconds (or a timedelta), got {every!r}"
        )
    if not 1 <= seconds <= MAX_EVERY_S:
        raise ConfigError(f"every must be from 1 s to ten years, got {every!r}")
    return int(seconds)


def _check_zone(tz: Any) -> ZoneInfo:
    if isinstance(tz, ZoneInfo):
        return tz
    if not isinstance(tz, str) or not tz:
        raise ConfigError(f"tz must be an IANA time zone name such as 'Europe/Berlin', got {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone tz={tz!r} (an IANA name such as 'UTC',"
                          " 'Europe/Berlin')") from None  # fmt: skip


def _check_result_ttl(space: Space, task_options: dict[str, Any]) -> None:
    ttl = task_options.get("result_ttl", SPACE_DEFAULT)
    ttl = space.result_ttl if ttl == SPACE_DEFAULT else ttl
    if ttl is not None and ttl < MIN_RESULT_TTL_S:
        raise ConfigError(
            f"a periodic task keeps its result at least {MIN_RESULT_TTL_S:.0f} s (its id"
            f" dedups its tick while it exists), got result_ttl={ttl!r}; pass result_ttl=None"
            " or more"
        )


@dataclass(frozen=True, slots=True)
class _When:
    cron: str | None
    every: int | None
    tz: str
    catch_up: CatchUp
    parsed: _Cron | None


def _check_when(cron: Any, every: Any, tz: Any, catch_up: Any) -> _When:
    if (cron is None) == (every is None):
        raise ConfigError(
            f"give exactly one of cron= or every=, got cron={cron!r}, every={every!r}"
        )
    if catch_up not in CATCH_UP:
        raise ConfigError(f"catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}")
    zone = _check_zone(tz)
    if cron is None:
        return _When(None, _check_every(every), zone.key, catch_up, None)
    if not isinstance(cron, str):
        raise ConfigError(f"cron must be a cron expression string, got {cron!r}")
    return _When(cron, None, zone.key, catch_up, _Cron(cron, zone))


def _check_arguments(space: Space, name: str, args: Any, kwargs: Any) -> tuple[Any, ...]:
    if not isinstance(args, tuple | list):
        raise ConfigError(f"args of periodic task {name!r} must be a tuple, got {args!r}")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"kwargs of periodic task {name!r} must be a dict, got {kwargs!r}")
    try:
        space.codec.encode_call(args, kwargs)
    except TaskspaceError as exc:
        raise ConfigError(f"arguments of periodic task {name!r} cannot be sent: {exc}") from None
    return tuple(args)


def periodic(
    space: Space,
    fn: Callable[..., Any] | None = None,
    /,
    *,
    cron: str | None = None,
    every: float | timedelta | None = None,
    tz: str = "UTC",
    catch_up: CatchUp = "latest",
    name: str | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    **task_options: Any,
) -> Any:
    """Register ``fn`` as a task (``space.task`` with ``task_options``) fired on a
    schedule: ``cron`` (croniter syntax, evaluated in zone ``tz``) or ``every`` N
    seconds; each tick calls it with ``args``/``kwargs``. Returns the Task (or, without
    ``fn``, a decorator). Bad input raises one ConfigError naming the value, before
    anything is registered."""
    when = _check_when(cron, every, tz, catch_up)
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"name must be a non-empty string, got {name!r}")
    TaskOptions.build(**task_options)
    _check_result_ttl(space, task_options)
    call_kwargs = {} if kwargs is None else kwargs

    def register(func: Callable[..., Any]) -> Task[..., Any]:
        from taskspace.space import module_of

        if not callable(func):
            raise ConfigError(f"@space.periodic needs a function, got {func!r}")
        task_name = f"{module_of(func)}.{func.__qualname__}" if name is None else name
        if not isinstance(task_name, str) or not task_name:
            raise ConfigError(f"name must be a non-empty string, got {task_name!r}")
        call_args = _check_arguments(space, str(task_name), args, call_kwargs)
        existing_task = space._tasks.get(task_name)
        if existing_task is not None and existing_task.fn is not func:
            raise ConfigError(f"a different function is already registered as {task_name!r}")
        from taskspace.tasks.task import Task

        candidate = Schedule(Task(space, func, task_name, TaskOptions.build(**task_options)),
                             cron=when.cron, every=when.every, tz=when.tz,
                             catch_up=when.catch_up, args=call_args, kwargs=call_kwargs,
                             _cron=when.parsed)  # fmt: skip
        existing = space._schedules.get(task_name)
        if existing is not None and not existing.same_as(candidate):
            raise ConfigError(f"{task_name!r} is already scheduled as {existing.spec}"
                              f" (tz={existing.tz}); give this one another name=")  # fmt: skip
        task: Task[..., Any] = space.task(name=task_name, **task_options)(func)
        space._schedules[task_name] = candidate.bound_to(space)
        return task

    return register(fn) if fn is not None else register


# -- firing --------------------------------------------------------------------------


class _PassClock:
    """The store's wall clock read once per pass, advanced by this process's monotonic
    clock (which counts time spent stopped, so a stall shows)."""

    def __init__(self, wall: float) -> None:
        self.wall0 = wall
        self.start = time.monotonic()

    def now(self) -> float:
        return self.wall0 + (time.monotonic() - self.start)

    def spent(self) -> bool:
        """True once the pass has used its PASS_BUDGET_S."""
        return time.monotonic() - self.start >= PASS_BUDGET_S

    def monotonic_at(self, wall: float) -> float:
        """This process's monotonic time when the wall clock reaches ``wall``."""
        return self.start + (wall - self.wall0)


# Per Space of this process: where the next pass starts (schedules a spent budget did
# not reach go first), when its next tick is due (monotonic, from the last pass), when
# the maintainer last looked for unscheduled records, and which missed ticks it warned of.
_cursors: weakref.WeakKeyDictionary[Space, int] = weakref.WeakKeyDictionary()
_due: weakref.WeakKeyDictionary[Space, float] = weakref.WeakKeyDictionary()
_audited: weakref.WeakKeyDictionary[Space, float] = weakref.WeakKeyDictionary()
_warned: weakref.WeakKeyDictionary[Space, set[tuple[str, int]]] = weakref.WeakKeyDictionary()

# What _fire learns of a schedule's next tick: its wall time (math.inf: never), or
# None when a pass should look again soon (a claim lost, ticks left pending).
Due = float | None


def due_at(space: Space) -> float | None:
    """When (``time.monotonic()``) the next tick of ``space``'s schedules is due, as
    this process's last :func:`fire_due` pass found it; None when unknown (no pass
    yet, or the last one did not finish every schedule): pass now."""
    return _due.get(space)


def fire_due(
    space: Space,
    *,
    at: float | None = None,
    store: Store | None = None,
    on_time: float | None = None,
) -> int:
    """Push every due tick of every schedule of ``space`` once (see the module
    docstring); returns how many ticks were pushed. Safe with any number of
    concurrent callers, in any number of processes.

    ``at`` replaces the store's wall clock (tests); ``store`` replaces
    ``space.store`` (a worker's injected store); ``on_time``: how old a tick may
    be and still be on time (default ON_TIME_S). Bounded: no schedule is started
    and no push is made after PASS_BUDGET_S, except by the pass's first
    schedule (so a store slower than the budget still makes progress); those
    not reached go first on the next pass. Raises BackendError (SpaceLost
    included) when the store fails; other errors of one schedule are logged and
    the next one is fired."""
    schedules = sorted(space._schedules.values(), key=lambda s: s.name)
    if not schedules:
        return 0
    store = store or space.store
    window = ON_TIME_S if on_time is None else on_time
    _due.pop(space, None)  # unknown until this pass completes
    clock = _PassClock(store.clock.wall() if at is None else float(at))
    offset = _cursors.get(space, 0) % len(schedules)
    pushed, earliest = 0, math.inf
    for i in range(len(schedules)):
        if i and clock.spent():
            _cursors[space] = offset + i
            log.warning("periodic: pass budget spent after %d of %d schedules", i, len(schedules))
            return pushed
        schedule = schedules[(offset + i) % len(schedules)]
        try:
            count, due = _fire(store, schedule, clock, window, first=i == 0)
        except BackendError:
            raise
        except Exception:
            log.exception("periodic %s: not fired this pass", schedule.name)
            count, due = 0, None
        pushed += count
        earliest = min(earliest, clock.now() if due is None else due)
    _due[space] = clock.monotonic_at(earliest)
    return pushed


def _fire(
    store: Store, schedule: Schedule, clock: _PassClock, on_time: float, first: bool
) -> tuple[int, Due]:
    """One schedule's step: (ticks pushed, when its next tick is due)."""
    kv = store.kv
    found = kv.get(schedule.key)
    now = clock.now()
    if found is None:  # first sight: start from now, no backfill
        start = math.floor(now)
        following = schedule.next_after(start)
        kv.cas(schedule.key, None, ScheduleState(last_tick=start, next_tick=following).encode())
        return 0, _wall(following)
    state = ScheduleState.decode(found.value)
    if state.pending:  # a pass claimed these and may have died before confirming
        return _push_claimed(store, schedule, state, found.version, clock, first)
    plan = schedule.plan(state.last_tick, now, on_time)
    if plan.last_tick <= state.last_tick:
        return 0, _wall(schedule.next_after(state.last_tick))
    claim = replace(state, last_tick=plan.last_tick, pending=plan.ticks,
                    next_tick=schedule.next_after(plan.last_tick))  # fmt: skip
    won = kv.cas(schedule.key, found.version, claim.encode())
    if won is None:  # another pass moved first: look again soon
        return 0, None
    if not plan.ticks:  # only skips
        return 0, _wall(claim.next_tick)
    return _push_claimed(store, schedule, claim, won.version, clock, first)


def _wall(tick: int | None) -> float:
    return math.inf if tick is None else float(tick)


def _push_claimed(
    store: Store,
    schedule: Schedule,
    state: ScheduleState,
    version: int,
    clock: _PassClock,
    first: bool,
) -> tuple[int, Due]:
    if not first and clock.spent():  # the budget is spent: the next pass pushes them
        return 0, None
    horizon = schedule.horizon()
    ticks = [t for t in state.pending if horizon is None or clock.now() < t + horizon]
    if len(ticks) < len(state.pending):
        log.warning("periodic %s: %d pending tick(s) older than %.0f s dropped, not pushed late",
                    schedule.name, len(state.pending) - len(ticks), horizon)  # fmt: skip
    for chunk in push_chunks(schedule.specs(ticks)):
        store.queue.push(chunk)
    done = replace(state, pending=(), fired=state.fired + len(ticks))
    if ticks:
        done = replace(done, last_fired=ticks[-1], last_task_id=schedule.task_id(ticks[-1]),
                       fired_at=round(clock.now(), 3))  # fmt: skip
    store.kv.cas(schedule.key, version, done.encode())  # None: another pass confirmed
    return len(ticks), _wall(schedule.next_after(state.last_tick))


# -- schedules nobody fires -------------------------------------------------------------


def warn_unscheduled(
    space: Space, *, store: Store | None = None, on_time: float | None = None
) -> list[str]:
    """The maintainer's check, at most every AUDIT_EVERY_S (else ``[]``): the names of
    schedule records whose next tick is more than ``on_time`` overdue while this
    process has no schedule of that name; each such tick is logged once as a
    WARNING (no running worker defines the schedule: its ticks are not firing).
    Raises BackendError when the store fails."""
    now_mono = time.monotonic()
    if now_mono < _audited.get(space, -math.inf) + AUDIT_EVERY_S:
        return []
    _audited[space] = now_mono
    store = store or space.store
    window = ON_TIME_S if on_time is None else on_time
    now = store.clock.wall()
    warned = _warned.setdefault(space, set())
    overdue: list[str] = []
    for key, value in _scan(store, KEY_PREFIX):
        name = key[len(KEY_PREFIX) :]
        if name in space._schedules:
            continue
        try:
            tick = ScheduleState.decode(value).next_tick
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if tick is None or now - tick <= window:
            continue
        overdue.append(name)
        if (name, tick) not in warned:
            warned.add((name, tick))
            log.warning("periodic %s: its tick %d is %.0f s overdue and this maintainer has no"
                        " schedule of that name: no running worker defines it (start one"
                        " that does, or delete the record %s if the schedule is gone)",
                        name, tick, now - tick, key)  # fmt: skip
    return overdue


def _scan(store: Store, prefix: str) -> Iterator[tuple[str, bytes]]:
    """Every ``(key, value)`` under ``prefix``, page by page."""
    after: str | None = None
    while True:
        page = store.kv.scan(prefix, after, SCAN_PAGE)
        for key, entry in page:
            yield key, entry.value
        if len(page) < SCAN_PAGE:
            return
        after = page[-1][0]
