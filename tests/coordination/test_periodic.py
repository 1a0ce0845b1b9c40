"""Periodic tasks in one process, on every backend: registration and bad input, tick
arithmetic (cron in a zone across DST, every N s), the catch-up policies, the claim
protocol's faults (a stale maintainer, a crash after the claim or after the push, a
tick past its horizon) and fire_due's time bound. ``fire_due(at=...)`` moves the
wall clock the schedules see, so hours of ticks take milliseconds on any backend."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from taskspace import ConfigError, ManualClock, Space
from taskspace.coordination import periodic as periodic_mod
from taskspace.coordination.periodic import (
    MAX_TICKS_PER_PASS,
    ON_TIME_S,
    STALE_S,
    Schedule,
    ScheduleState,
    fire_due,
    tick_of,
)

T0 = 1_800_000_000  # a Unix time that is a multiple of 60 and 3600 (2027-01-15 08:00 UTC)


def beat(*args: Any, **kwargs: Any) -> list[Any]:
    return [args, kwargs]


def other(*args: Any) -> None:
    return None


def schedule_of(space: Space, fn: Callable[..., Any] = beat, **options: Any) -> Schedule:
    task = space.periodic(fn, name=options.pop("name", f"p{uuid.uuid4().hex[:8]}"), **options)
    return space.schedules[task.name]


def fired_ticks(space: Space, schedule: Schedule) -> list[int]:
    prefix = f"periodic:{schedule.name}:"
    return sorted(int(r.id[len(prefix) :]) for r in space.iter_tasks() if r.id.startswith(prefix))


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, fold: int = 0) -> int:
    zone = ZoneInfo("Europe/Berlin")
    return int(datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold).timestamp())


# -- registration and bad input --------------------------------------------------------


def test_periodic_registers_a_task_and_a_schedule() -> None:
    space = Space("memory://")

    @space.periodic(cron="*/5 * * * *", tz="Europe/Berlin", max_attempts=5, queue="cron")  # type: ignore[untyped-decorator]
    def report() -> str:
        return "ok"

    assert report() == "ok"
    assert report.name in space.task_names and report.opts.max_attempts == 5
    schedule = space.schedules[report.name]
    assert (schedule.spec, schedule.tz, schedule.catch_up) == ("cron */5 * * * *", "Europe/Berlin",
                                                               "latest")  # fmt: skip
    assert schedule.task is report and schedule.key == f"taskspace/periodic/{report.name}"
    task = space.periodic(beat, every=timedelta(minutes=1), name="b", args=(1,), kwargs={"k": 2})
    assert space.schedules["b"].every == 60 and task.name == "b"
    assert space.periodic(beat, every=60, name="b", args=(1,), kwargs={"k": 2}) is not None
    spec = space.schedules["b"].specs([T0])[0]
    assert spec.id == f"periodic:b:{T0}" and spec.queue == "default" and tick_of(spec.id) == T0
    assert tick_of("periodic:a:b:c") is None and tick_of("0123abcd") is None
    assert space.codec.decode(spec.payload) == [[1], {"k": 2}]


BAD: list[tuple[dict[str, Any], str]] = [
    ({"cron": "61 * * * *"}, "'61 * * * *'"),
    ({"cron": "every minute"}, "'every minute'"),
    ({"cron": "0 0 30 2 *"}, "never fires"),
    ({"cron": 5}, "5"),
    ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "'Mars/Olympus'"),
    ({"cron": "* * * * *", "tz": ""}, "tz"),
    ({"every": 0}, "0"),
    ({"every": -60}, "-60"),
    ({"every": 1.5}, "1.5"),
    ({"every": True}, "True"),
    ({"every": "60"}, "'60'"),
    ({"every": float("nan")}, "nan"),
    ({"every": timedelta(0)}, "timedelta(0)"),
    ({"every": 60, "cron": "* * * * *"}, "one of cron= or every="),
    ({}, "one of cron= or every="),
    ({"every": 60, "catch_up": "some"}, "'some'"),
    ({"every": 60, "max_attempts": 0}, "max_attempts"),
    ({"every": 60, "colour": "red"}, "colour"),
    ({"every": 60, "result_ttl": 5}, "result_ttl=5"),
    ({"every": 60, "args": (object(),)}, "args[0]"),
    ({"every": 60, "args": 5}, "5"),
    ({"every": 60, "kwargs": [1]}, "[1]"),
    ({"every": 60, "name": 7}, "7"),
    ({"every": 60, "name": ""}, "name must be a non-empty string"),
]


@pytest.mark.parametrize(
    ("options", "named"), BAD, ids=[re.sub(r" at 0x\w+", "", str(o)) for o, _ in BAD]
)
def test_bad_input_is_one_config_error_and_registers_nothing(
    options: dict[str, Any], named: str
) -> None:
    space = Space("memory://")
    with pytest.raises(ConfigError) as caught:
        space.periodic(beat, **options)
    assert named in str(caught.value)
    assert space.task_names == [] and space.schedules == {}


def test_decorator_form_checks_before_decorating() -> None:
    space = Space("memory://")
    with pytest.raises(ConfigError, match="Mars"):
        space.periodic(every=60, tz="Mars")
    with pytest.raises(ConfigError, match="one of cron= or every="):
        space.periodic(beat)
    with pytest.raises(ConfigError, match="name"):
        space.periodic(every=60, name="")


def test_a_small_space_result_ttl_is_refused() -> None:
    space = Space("memory://", result_ttl=10)
    with pytest.raises(ConfigError, match="result_ttl=10"):
        space.periodic(beat, every=60)
    space.periodic(beat, every=60, result_ttl=None)


def test_a_name_scheduled_twice_differently_is_refused() -> None:
    space = Space("memory://")
    space.periodic(beat, every=60, name="x")
    for options in ({"every": 30}, {"cron": "* * * * *"}, {"every": 60, "tz": "Europe/Paris"},
                    {"every": 60, "args": (1,)}):  # fmt: skip
        with pytest.raises(ConfigError, match="already scheduled as every 60 s"):
            space.periodic(beat, name="x", **options)
    with pytest.raises(ConfigError, match="different function"):
        space.periodic(other, every=60, name="x")
    assert space.schedules["x"].every == 60


def test_with_url_binds_every_schedule(tmp_path: Any) -> None:
    space = Space("memory://")
    space.periodic(beat, every=60, name="x")
    moved = space.with_url(f"sqlite:///{tmp_path}/s.db")
    schedule = moved.schedules["x"]
    assert schedule.task.space is moved and schedule.task is moved.get_task("x")
    assert space.schedules["x"].task.space is space


# -- ticks -------------------------------------------------------------------------------


def test_every_ticks_on_multiples_of_n() -> None:
    s = schedule_of(Space("memory://"), every=60)
    assert s.next_after(T0) == T0 + 60 and s.next_after(T0 - 0.5) == T0
    assert s.latest_at(T0) == T0 and s.latest_at(T0 + 59.9) == T0
    assert s.ticks(T0, T0 + 180) == [T0 + 60, T0 + 120, T0 + 180]
    assert s.ticks(T0, T0 + 180, limit=2) == [T0 + 60, T0 + 120]


def test_cron_ticks_are_exclusive_after_and_inclusive_until() -> None:
    s = schedule_of(Space("memory://"), cron="*/5 * * * *")
    assert s.next_after(T0) == T0 + 300 and s.next_after(T0 - 0.5) == T0
    assert s.latest_at(T0) == T0 and s.latest_at(T0 - 0.5) == T0 - 300
    assert s.ticks(T0, T0 + 900) == [T0 + 300, T0 + 600, T0 + 900]
    seconds = schedule_of(Space("memory://"), cron="* * * * * */10")
    assert seconds.ticks(T0, T0 + 30) == [T0 + 10, T0 + 20, T0 + 30]


def test_cron_in_berlin_across_dst() -> None:
    space = Space("memory://")
    daily = schedule_of(space, cron="30 2 * * *", tz="Europe/Berlin")
    # spring forward (2026-03-29 02:00 -> 03:00): 02:30 does not exist; it fires once, at 03:00
    assert daily.ticks(berlin(2026, 3, 28, 12), berlin(2026, 3, 30, 12)) == [
        berlin(2026, 3, 29, 3, 0), berlin(2026, 3, 30, 2, 30)]  # fmt: skip
    # fall back (2026-10-25 03:00 -> 02:00): 02:30 happens twice; it fires once, the first
    assert daily.ticks(berlin(2026, 10, 24, 12), berlin(2026, 10, 26, 12)) == [
        berlin(2026, 10, 25, 2, 30), berlin(2026, 10, 26, 2, 30)]  # fmt: skip
    assert daily.latest_at(berlin(2026, 10, 25, 2, 45, fold=1)) == berlin(2026, 10, 25, 2, 30)
    hourly = schedule_of(space, cron="0 * * * *", tz="Europe/Berlin")
    spring = hourly.ticks(berlin(2026, 3, 29, 0) - 1, berlin(2026, 3, 30, 0) - 1)
    fall = hourly.ticks(berlin(2026, 10, 25, 0) - 1, berlin(2026, 10, 26, 0) - 1)
    assert len(spring) == 23 and len(fall) == 25  # every real hour, once
    assert {b - a for a, b in itertools.pairwise(fall)} == {3600}
    assert berlin(2026, 10, 25, 2, fold=1) in fall


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                                  "Asia/Kolkata", "UTC"])  # fmt: skip
@pytest.mark.parametrize("expr", ["0 * * * *", "30 2 * * *", "15 1,2,3 * * *"])
def test_cron_walks_the_same_ticks_forward_and_backward(zone: str, expr: str) -> None:
    s = schedule_of(Space("memory://"), cron=expr, tz=zone)
    start, end = T0 - 366 * 86400, T0
    forward = s.ticks(start, end, limit=100_000)
    backward = []
    t = s.latest_at(end)
    while t is not None and t > start:
        backward.append(t)
        t = s.latest_at(t - 1)
    assert forward == backward[::-1] and forward == sorted(set(forward))
    local = [datetime.fromtimestamp(t, ZoneInfo(zone)).replace(tzinfo=None) for t in forward]
    if zone != "Australia/Lord_Howe" and expr.split()[1] == "*":  # its DST shift is 30 min
        assert {b - a for a, b in itertools.pairwise(forward)} == {3600}
    elif expr.split()[1] != "*":  # fixed hours: one tick per local wall time, never two
        assert len(set(local)) == len(local)


def test_fire_due_in_berlin_across_the_fall_back_night(space: Space) -> None:
    hourly = schedule_of(space, cron="30 * * * *", tz="Europe/Berlin", catch_up="none")
    daily = schedule_of(space, cron="30 2 * * *", tz="Europe/Berlin", catch_up="none")
    night = berlin(2026, 10, 24, 23)
    for t in range(night, night + 6 * 3600, 60):  # a pass a minute, 23:00 CEST to 04:00 CET
        fire_due(space, at=t)
    ticks = fired_ticks(space, hourly)
    assert [b - a for a, b in itertools.pairwise(ticks)] == [3600] * 5
    assert berlin(2026, 10, 25, 2, 30, fold=1) in ticks
    assert fired_ticks(space, daily) == [berlin(2026, 10, 25, 2, 30)]


# -- firing and the catch-up policies ------------------------------------------------------


def test_first_sight_starts_from_now_without_backfill(space: Space) -> None:
    s = schedule_of(space, every=60, catch_up="all")
    assert s.state() is None
    assert fire_due(space, at=T0 + 30) == 0
    assert s.state() == ScheduleState(last_tick=T0 + 30, next_tick=T0 + 60)
    assert fire_due(space, at=T0 + 59) == 0
    assert fire_due(space, at=T0 + 61) == 1
    state = s.state()
    assert state is not None and fired_ticks(space, s) == [T0 + 60]
    assert (state.last_tick, state.last_fired, state.fired, state.pending) == (T0 + 60, T0 + 60,
                                                                               1, ())  # fmt: skip
    assert state.last_task_id == f"periodic:{s.name}:{T0 + 60}"
    assert state.fired_at is not None and state.fired_at >= T0 + 61
    assert state.next_tick == T0 + 120
    assert fire_due(space, at=T0 + 61) == 0


def test_fire_due_follows_the_store_wall_clock() -> None:
    clock = ManualClock()
    space = Space("memory://", clock=clock)
    s = schedule_of(space, every=5, catch_up="all")
    start = clock.wall()
    fire_due(space)
    clock.advance(12)
    expected = s.ticks(int(start), clock.wall())
    assert fire_due(space) == len(expected) >= 2
    assert fired_ticks(space, s) == expected


@pytest.mark.parametrize(
    ("catch_up", "late", "expected"),
    [
        ("all", 2, list(range(1, 11))),
        ("latest", 2, [9, 10]),  # the latest missed tick, and the on-time one
        ("none", 2, [10]),
        ("all", 45, list(range(1, 11))),
        ("latest", 45, [10]),
        ("none", 45, []),
    ],
)
def test_missed_ticks_follow_the_policy(
    space: Space, catch_up: str, late: float, expected: list[int]
) -> None:
    """Ten minutes without a maintainer, back ``late`` s after the tenth tick."""
    s = schedule_of(space, every=60, catch_up=catch_up)
    fire_due(space, at=T0)
    fire_due(space, at=T0 + 600 + late)
    assert fired_ticks(space, s) == [T0 + 60 * k for k in expected]
    state = s.state()
    assert state is not None and state.last_tick == T0 + 600  # skipped ticks never come back
    fire_due(space, at=T0 + 600 + late + 1)
    assert fired_ticks(space, s) == [T0 + 60 * k for k in expected]


@pytest.mark.parametrize("catch_up", ["latest", "none", "all"])
def test_on_time_ticks_all_fire_under_every_policy(space: Space, catch_up: str) -> None:
    """A maintainer a little late (less than ON_TIME_S) misses nothing."""
    s = schedule_of(space, every=1, catch_up=catch_up)
    fire_due(space, at=T0)
    fire_due(space, at=T0 + ON_TIME_S - 1.5)
    fire_due(space, at=T0 + ON_TIME_S + 3.2)
    assert fired_ticks(space, s) == list(range(T0 + 1, T0 + int(ON_TIME_S) + 4))


@pytest.mark.parametrize("catch_up", ["latest", "none", "all"])
def test_a_failover_within_its_bound_loses_no_tick(space: Space, catch_up: str) -> None:
    """Passes every second, then the maintainer is killed: the next pass comes after
    maintainer_ttl + maintainer_retry (10 + 2 s) plus a maintenance interval. An
    every=5 schedule loses no tick under any policy (with ON_TIME_S = 10 the tick
    12 s old was dropped by "latest")."""
    s = schedule_of(space, every=5, catch_up=catch_up)
    w0 = T0 + 0.5
    for k in range(4):
        fire_due(space, at=w0 + k)
    fire_due(space, at=w0 + 3 + 10 + 2 + 1)
    assert fired_ticks(space, s) == [T0 + 5, T0 + 10, T0 + 15]


def test_a_larger_failover_bound_is_passed_as_on_time(space: Space) -> None:
    """A worker with maintainer_ttl=60 passes its own bound: a 70 s gap loses nothing."""
    s = schedule_of(space, every=10, catch_up="none")
    fire_due(space, at=T0 + 1)
    fire_due(space, at=T0 + 71, on_time=75)
    assert fired_ticks(space, s) == [T0 + 10 * k for k in range(1, 8)]


def test_latest_fires_the_latest_missed_tick_besides_the_on_time_ones(space: Space) -> None:
    s = schedule_of(space, every=10, catch_up="latest")
    fire_due(space, at=T0 + 1)
    fire_due(space, at=T0 + 100, on_time=25)  # 10..70 missed, 80..100 on time
    assert fired_ticks(space, s) == [T0 + 70, T0 + 80, T0 + 90, T0 + 100]


def test_catch_up_all_is_bounded_per_pass(space: Space) -> None:
    s = schedule_of(space, every=1, catch_up="all")
    fire_due(space, at=T0)
    counts = [fire_due(space, at=T0 + 2500) for _ in range(4)]
    assert counts == [MAX_TICKS_PER_PASS, MAX_TICKS_PER_PASS, 500, 0]
    assert fired_ticks(space, s) == list(range(T0 + 1, T0 + 2501))


def test_ticks_older_than_the_horizon_are_never_fired(
    space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    s = schedule_of(space, every=10, catch_up="all", result_ttl=60)
    fire_due(space, at=T0)
    with caplog.at_level(logging.WARNING, "taskspace.periodic"):
        fire_due(space, at=T0 + 200)
    horizon = 60 - STALE_S
    assert fired_ticks(space, s) == list(range(T0 + 160, T0 + 201, 10))
    assert all(T0 + 200 - t < horizon for t in fired_ticks(space, s))
    assert "not fired" in caplog.text


# -- the claim protocol's faults -----------------------------------------------------------


def put_state(space: Space, s: Schedule, state: ScheduleState) -> None:
    space.store.kv.put(s.key, state.encode())


@pytest.mark.parametrize("deterministic_ids", [True, False])
def test_a_crash_after_the_push_makes_no_second_task(
    space: Space, monkeypatch: pytest.MonkeyPatch, deterministic_ids: bool
) -> None:
    """A maintainer claimed T and pushed it, then died before confirming: the next pass
    pushes T again, and the id (the tick) makes that no second task. The canary (random
    ids) shows the fault bites."""
    s = schedule_of(space, every=60)
    if not deterministic_ids:
        monkeypatch.setattr(Schedule, "task_id", lambda self, tick: uuid.uuid4().hex)
    put_state(space, s, ScheduleState(last_tick=T0 + 60, pending=(T0 + 60,)))
    space.push(s.specs([T0 + 60]))  # the dead maintainer's push landed
    assert fire_due(space, at=T0 + 61) == 1
    state = s.state()
    assert state is not None and state.pending == () and state.fired == 1
    assert fire_due(space, at=T0 + 62) == 0
    tasks = [r for r in space.iter_tasks() if r.name == s.name]
    assert len(tasks) == (1 if deterministic_ids else 2)


def test_a_crash_after_the_claim_loses_no_tick(space: Space) -> None:
    s = schedule_of(space, every=60)
    put_state(space, s, ScheduleState(last_tick=T0 + 120, pending=(T0 + 60, T0 + 120)))
    assert fire_due(space, at=T0 + 125) == 2
    assert fired_ticks(space, s) == [T0 + 60, T0 + 120]
    state = s.state()
    assert state is not None and (state.last_fired, state.fired) == (T0 + 120, 2)


def test_a_pending_tick_past_its_horizon_is_dropped(
    space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    """The task of a tick claimed long ago may have run and been reaped: pushing it now
    could run it twice, so it is dropped (logged), never pushed late."""
    s = schedule_of(space, every=60, result_ttl=60)
    put_state(space, s, ScheduleState(last_tick=T0 + 60, pending=(T0, T0 + 60)))
    with caplog.at_level(logging.WARNING, "taskspace.periodic"):
        assert fire_due(space, at=T0 + 60 + 60 - STALE_S - 1) == 1
    assert fired_ticks(space, s) == [T0 + 60] and "dropped" in caplog.text


def test_a_stale_maintainer_pushes_nothing(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """A maintainer read the record, then stalled while another one fired later ticks
    (and, under "latest", skipped the one the stale one would fire): its claim fails."""
    s = schedule_of(space, every=60, catch_up="latest")
    fire_due(space, at=T0)
    stale = space.store.kv.get(s.key)
    fire_due(space, at=T0 + 150)  # fires T0+120 only, T0+60 is skipped
    assert fired_ticks(space, s) == [T0 + 120]
    monkeypatch.setattr(space.store.kv, "get", lambda key: stale)
    assert fire_due(space, at=T0 + 65) == 0  # it would fire T0+60 (on time for it)
    monkeypatch.undo()
    assert fired_ticks(space, s) == [T0 + 120]


def test_a_record_that_says_fired_is_never_undone(space: Space) -> None:
    """After a tick fired, its task finishing, being reaped or purged, or the wall clock
    stepping back, never fires it again."""
    s = schedule_of(space, every=60, catch_up="all")
    fire_due(space, at=T0)
    fire_due(space, at=T0 + 61)
    space.store.queue.purge("default", ["queued"])
    assert fired_ticks(space, s) == []
    for t in (T0 + 61, T0 + 30, T0 + 119):  # the wall clock steps back, then on
        assert fire_due(space, at=t) == 0
    assert fire_due(space, at=T0 + 121) == 1 and fired_ticks(space, s) == [T0 + 120]


def test_one_failing_schedule_does_not_stop_the_others(
    space: Space, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bad = schedule_of(space, every=60, name="a-bad")
    good = schedule_of(space, every=60, name="b-good")
    fire_due(space, at=T0)
    space.store.kv.put(bad.key, b"not json")
    with caplog.at_level(logging.ERROR, "taskspace.periodic"):
        assert fire_due(space, at=T0 + 61) == 1
    assert fired_ticks(space, good) == [T0 + 60] and "a-bad" in caplog.text


def test_fire_due_is_bounded_in_time(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """No schedule is started after the pass budget; those not reached go first next time."""
    monkeypatch.setattr(periodic_mod, "PASS_BUDGET_S", 0.0)
    schedules = [schedule_of(space, every=60, name=f"s{i:02d}") for i in range(5)]
    for _ in range(5):
        fire_due(space, at=T0)  # one schedule per pass: each is seen once
    assert all(s.state() is not None for s in schedules)
    started = time.monotonic()
    fired = [fire_due(space, at=T0 + 61) for _ in range(5)]
    assert fired == [1] * 5 and time.monotonic() - started < 5
    assert all(fired_ticks(space, s) == [T0 + 60] for s in schedules)


def test_no_push_once_the_budget_is_spent(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schedule (not the pass's first) read before the budget ran out and claimed
    after it: its ticks stay claimed and the next pass pushes them; the pass
    overran the budget by two store round trips (its read and its claim) at most."""
    monkeypatch.setattr(periodic_mod, "PASS_BUDGET_S", 0.3)
    first, second = (schedule_of(space, every=60, name=n) for n in ("a-first", "b-second"))
    fire_due(space, at=T0)
    fire_due(space, at=T0)  # both seen (the cursor starts from "a-first" again)
    real_get = space.store.kv.get

    def slow_get(key: str) -> Any:
        time.sleep(0.2)
        return real_get(key)

    monkeypatch.setattr(space.store.kv, "get", slow_get)
    began = time.monotonic()
    assert fire_due(space, at=T0 + 61) == 1
    took = time.monotonic() - began
    monkeypatch.undo()
    assert fired_ticks(space, first) == [T0 + 60] and fired_ticks(space, second) == []
    state = second.state()
    assert state is not None and state.pending == (T0 + 60,)
    assert took < 0.3 + 0.2 + 0.15, f"the pass took {took:.2f} s"
    assert fire_due(space, at=T0 + 62) == 1 and fired_ticks(space, second) == [T0 + 60]


def test_due_at_says_when_the_next_tick_is_due(space: Space) -> None:
    schedule_of(space, every=60)
    assert periodic_mod.due_at(space) is None
    fire_due(space, at=T0 + 30)
    due = periodic_mod.due_at(space)
    assert due is not None and 29 < due - time.monotonic() <= 30


def test_the_maintainer_warns_once_about_records_nobody_fires(
    space: Space, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A schedule record whose next tick is overdue, with no schedule of that name in
    this process (another app's, or a schedule no worker defines any more)."""
    monkeypatch.setattr(periodic_mod, "AUDIT_EVERY_S", 0.0)
    mine = schedule_of(space, every=1, name="mine")
    wall = space.store.clock.wall()
    fire_due(space, at=wall - 100)  # my own record: overdue too, but I fire it
    ghost = ScheduleState(last_tick=int(wall) - 100, next_tick=int(wall) - 40)
    space.store.kv.put(periodic_mod.KEY_PREFIX + "ghost", ghost.encode())
    fresh = ScheduleState(last_tick=int(wall) - 1, next_tick=int(wall) + 5)
    space.store.kv.put(periodic_mod.KEY_PREFIX + "fresh", fresh.encode())
    with caplog.at_level(logging.WARNING, "taskspace.periodic"):
        assert periodic_mod.warn_unscheduled(space) == ["ghost"]
        assert periodic_mod.warn_unscheduled(space) == ["ghost"]
    warnings = [r.getMessage() for r in caplog.records if "overdue" in r.getMessage()]
    assert len(warnings) == 1 and "ghost" in warnings[0] and mine.name not in warnings[0]


def test_fire_due_without_schedules_reads_nothing() -> None:
    space = Space("memory://")
    assert fire_due(space) == 0


# -- many maintainers at once ------------------------------------------------------------------


@pytest.fixture
def pushes(space: Space, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many times each task id was pushed."""
    counts: dict[str, int] = {}
    lock = threading.Lock()
    push = space.store.queue.push

    def counting(specs: Any) -> list[str]:
        with lock:
            for spec in specs:
                counts[spec.id] = counts.get(spec.id, 0) + 1
        return push(specs)

    monkeypatch.setattr(space.store.queue, "push", counting)
    yield counts


@pytest.mark.parametrize("catch_up", ["all", "latest"])
def test_four_threads_fire_each_tick_once(
    space: Space, pushes: dict[str, int], catch_up: str
) -> None:
    """Four maintainers call fire_due at once, each at its own pace over 300 ticks:
    "all" fires every tick once with no gap; "latest" fires the last tick, and each
    claim is confirmed once (the record's count equals the ticks fired)."""
    s = schedule_of(space, every=1, catch_up=catch_up)
    fire_due(space, at=T0)
    end = T0 + 300
    errors: list[BaseException] = []

    def maintainer(step: float) -> None:
        try:
            t = float(T0)
            while t < end:
                t = min(end, t + step)
                fire_due(space, at=t)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=maintainer, args=(step,)) for step in (0.3, 0.7, 1.3, 17)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    ticks = fired_ticks(space, s)
    state = s.state()
    assert state is not None and state.pending == () and state.last_tick == end
    assert state.fired == len(ticks) and ticks[-1] == end and ticks[0] > T0
    if catch_up == "all":
        assert ticks == list(range(T0 + 1, end + 1))
    repushed = sum(n - 1 for n in pushes.values())
    print(f"periodic threads {space.scheme} {catch_up}: ticks={len(ticks)} repushed={repushed}")
