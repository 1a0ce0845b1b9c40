"""What the dashboard's pages show, computed from a Space: queue rows with
throughput and a latency sparkline, worker rows with their last heartbeat, a
task's decoded detail, and usage sums.

Throughput and latency come from the task events stream (``space.events``,
when that module is installed). One :class:`EventDigest` per app reads it
incrementally (only what is new since its last read) and keeps in memory at
most RECENT_MAX events of the last WINDOW_S seconds, so its memory is
bounded whatever the traffic. Usage sums are the API's (``app.state.usage``,
as ``/api/usage`` serves them).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from taskspace.api.errors import redact_url as redact_url  # the one redaction, re-exported
from taskspace.backends.base import (
    FINAL_STATES,
    RETRYABLE_STATES,
    TASK_STATES,
    QueueStats,
    TaskRecord,
)
from taskspace.codec import decoder_for
from taskspace.errors import SerializationError, TaskspaceError

if TYPE_CHECKING:
    from taskspace.space import Space

log = logging.getLogger("taskspace.dashboard")

# The window the queue page's latency covers (its sparkline: the run times of
# the last SPARK_POINTS attempts in it), and the one of its throughput.
WINDOW_S = 600.0
SPARK_POINTS = 60
THROUGHPUT_S = 300.0
# Bounds of the in-memory digest (per app).
RECENT_MAX = 20_000
READ_PAGE = 1000
# At most this many events are read per refresh (a first read of a long stream
# catches up over several page loads rather than blocking one).
READ_MAX = 50_000
REFRESH_LOCK_S = 5.0
RECENT_CHUNK = 500
QUEUES_SHOWN_MAX = 200
FINISH_KINDS = frozenset({"succeeded", "failed", "dead", "cancelled"})
DURATION_KINDS = frozenset({"succeeded", "failed", "retried"})
SPARK_W = 120.0
SPARK_H = 24.0


def pretty(value: Any) -> str:
    """``value`` as indented JSON (anything JSON cannot hold shown by its ``str``)."""
    return orjson.dumps(
        value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str
    ).decode()


def decoded(record: TaskRecord, data: bytes | None) -> Any:
    """A stored payload or result decoded for display; never pickle (a value it
    cannot decode is described, not raised)."""
    if data is None:
        return None
    try:
        return decoder_for(record.codec, allow_pickle=False).decode(data)
    except SerializationError as exc:
        return f"<{record.codec} value not shown: {exc}>"


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def sparkline(values: Sequence[float | None]) -> list[str]:
    """SVG polyline ``points`` strings (one per run of known values) drawing
    ``values`` left to right in a SPARK_W x SPARK_H box, scaled to their max."""
    known = [v for v in values if v is not None]
    if not known:
        return []
    top = max(known) or 1.0
    step = SPARK_W / max(1, len(values) - 1)
    segments: list[str] = []
    current: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            if current:
                segments.append(" ".join(current))
            current = []
            continue
        y = SPARK_H - 2 - (SPARK_H - 4) * (value / top)
        current.append(f"{i * step:.1f},{y:.1f}")
    if current:
        segments.append(" ".join(current))
    # A lone point is drawn as a short flat line so it stays visible.
    return [s if " " in s else f"{s} {_nudge(s)}" for s in segments]


def _nudge(point: str) -> str:
    x, y = point.split(",")
    return f"{float(x) + 2:.1f},{y}"


@dataclass
class EventDigest:
    """The task events of the last WINDOW_S seconds of one space, read incrementally.

    The first :meth:`refresh` finds where the window starts by bisecting the
    stream's ids (O(log ids) reads of one event, whatever the stream's
    length); later ones read only what was appended since (at most READ_MAX
    events per call). Memory: at most RECENT_MAX events, none older than
    WINDOW_S. ``caught_up``: the last refresh read up to the stream's end.
    ``available`` is False when the space has no events module;
    ``error`` says why the stream could not be read (the pages then show
    counts only).
    """

    space: Space
    last_id: int | None = None
    caught_up: bool = False
    available: bool = True
    error: str | None = None
    recent: deque[Any] = field(default_factory=lambda: deque(maxlen=RECENT_MAX))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> bool:
        """Read new events; True if the events stream could be read. Never
        raises: a backend error is kept in ``error`` and logged."""
        if not self._lock.acquire(timeout=REFRESH_LOCK_S):
            return self.available  # another request is reading: show what we have
        try:
            return self._read()
        finally:
            self._lock.release()

    def _read(self) -> bool:
        try:
            events = self.space.events
        except (ImportError, AttributeError) as exc:
            self.available, self.error = False, f"the events module is not installed ({exc})"
            return False
        try:
            wall = self.space.store.clock.wall()
            if self.last_id is None:
                self.last_id = _window_start(events, wall - WINDOW_S)
            read = 0
            self.caught_up = False
            while read < READ_MAX:
                page = events.read(after=self.last_id, limit=READ_PAGE)
                for event in page:
                    self.last_id = max(self.last_id, int(event.id))
                    if event.kind != "usage":
                        self.recent.append(event)
                read += len(page)
                if len(page) < READ_PAGE:
                    self.caught_up = True
                    break
        except TaskspaceError as exc:
            log.warning("dashboard: reading task events failed: %s", exc)
            self.error = f"events could not be read: {exc}"
            return False
        while self.recent and self.recent[0].time < wall - WINDOW_S:
            self.recent.popleft()
        self.available, self.error = True, None
        return True

    def events_of(self, task_id: str) -> list[Any]:
        """The recent events of one task, oldest first (by time: producers ship
        in batches, so stream order may interleave them slightly)."""
        mine = [e for e in list(self.recent) if e.task_id == task_id]
        return sorted(mine, key=lambda e: (e.time, e.id))

    def names(self) -> list[str]:
        """Task names seen in recent events, sorted."""
        return sorted({str(e.name) for e in list(self.recent)})


def recently_active(
    space: Space,
    digest: EventDigest,
    *,
    limit: int,
    state: str | None = None,
    queue: str | None = None,
    name: str | None = None,
) -> list[TaskRecord]:
    """Up to ``limit`` tasks with an event in the digest's window, the latest
    first, matching every filter given (tasks since deleted are left out)."""
    ids: dict[str, None] = {}
    for event in reversed(list(digest.recent)):
        if (queue is None or event.queue == queue) and (name is None or event.name == name):
            ids.setdefault(str(event.task_id), None)
    wanted = list(ids)
    rows: list[TaskRecord] = []
    for start in range(0, len(wanted), RECENT_CHUNK):
        for record in space.store.queue.get_many(wanted[start : start + RECENT_CHUNK]):
            if record is not None and (state is None or record.state == state):
                rows.append(record)
        if len(rows) >= limit:
            break
    return rows[:limit]


def _window_start(events: Any, cutoff: float) -> int:
    """An ``after`` id from which reading yields the events appended at or
    after ``cutoff`` (wall clock), by bisection on ids: the smallest ``x``
    whose next event is that recent (or has none)."""
    lo, hi = 0, int(events.last_id())
    while lo < hi:
        mid = (lo + hi) // 2
        nxt = events.read(after=mid, limit=1)
        if not nxt or nxt[0].time >= cutoff:
            hi = mid
        else:
            lo = max(mid + 1, int(nxt[0].id))  # nothing between mid and that id
    return lo


def queue_rows(space: Space, stats: QueueStats, digest: EventDigest) -> list[dict[str, Any]]:
    """One row per queue: counts by state, the oldest queued task's age,
    finished tasks per minute over THROUGHPUT_S, run-time p50/p95 over
    WINDOW_S and a sparkline of the last SPARK_POINTS run times (from events)."""
    now = space.store.clock.wall()
    by_queue: dict[str, list[Any]] = {}
    for event in list(digest.recent):
        by_queue.setdefault(str(event.queue), []).append(event)
    names = sorted(set(stats.counts) | set(by_queue))[:QUEUES_SHOWN_MAX]
    rows = []
    for queue in names:
        counts = stats.counts.get(queue, {})
        mine = by_queue.get(queue, [])
        rows.append(
            {
                "name": queue,
                "counts": {s: int(counts.get(s, 0)) for s in TASK_STATES},
                "oldest_queued_age": _oldest_age(space, queue, now)
                if counts.get("queued")
                else None,
                **_latency(mine, now),
            }
        )
    return rows


def _oldest_age(space: Space, queue: str, now: float) -> float | None:
    first = space.tasks(state="queued", queue=queue, limit=1)
    return max(0.0, now - first[0].created) if first else None


def _latency(events: Sequence[Any], now: float) -> dict[str, Any]:
    finished = [e for e in events if e.kind in FINISH_KINDS and e.time >= now - THROUGHPUT_S]
    durations = [float(e.duration) for e in events
                 if e.kind in DURATION_KINDS and e.duration is not None]  # fmt: skip
    shown = durations[-SPARK_POINTS:]
    return {
        "per_minute": len(finished) * 60.0 / THROUGHPUT_S,
        "p50": quantile(durations, 0.5),
        "p95": quantile(durations, 0.95),
        "spark": sparkline(shown),
        "spark_n": len(shown),
        "spark_max": max(shown, default=None),
    }


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _worker_row(meta: dict[str, Any], wall: float, **extra: Any) -> dict[str, Any]:
    """A worker's row from the info it registered (anything malformed shown as unknown)."""
    started = _number(meta.get("started"))
    concurrency = int(_number(meta.get("concurrency")) or 0)
    running = int(_number(meta.get("running")) or 0)
    queues, tasks = meta.get("queues"), meta.get("tasks")
    return {
        "name": str(meta.get("name") or extra.get("name") or "?"),
        "host": meta.get("host"),
        "pid": meta.get("pid"),
        "queues": [str(q) for q in queues] if isinstance(queues, list) else [],
        "tasks": [str(t) for t in tasks] if isinstance(tasks, list) else [],
        "concurrency": concurrency,
        "running": running,
        "load": min(1.0, running / concurrency) if concurrency else 0.0,
        "succeeded": _number(meta.get("succeeded")),
        "failed": _number(meta.get("failed")),
        "up_s": None if started is None else wall - started,
        "health": "passing",
        "output": "",
        "heartbeat_s": None,
        **extra,
    }


def worker_rows(space: Space) -> list[dict[str, Any]]:
    """Live workers: the info each registered (queues, task names,
    concurrency, load, counters), its health, uptime and seconds since its
    last heartbeat (from its registration's remaining TTL; unknown for
    workers of an earlier release, listed under LEGACY_PREFIX)."""
    from taskspace.coordination.registry import WORKER_SERVICE, list_instances, scan_all
    from taskspace.worker.registry import LEGACY_PREFIX

    store = space.store
    lease_now = store.clock.now()
    wall = store.clock.wall()
    rows = []
    for inst in list_instances(store, WORKER_SERVICE):
        beat = None
        if inst.expires is not None and inst.ttl:
            beat = max(0.0, inst.ttl - (inst.expires - lease_now))
        rows.append(_worker_row(dict(inst.meta), wall, name=str(inst.meta.get("name") or inst.id),
                                health=inst.status, output=inst.output,
                                heartbeat_s=beat))  # fmt: skip
    for key, item in scan_all(store, LEGACY_PREFIX):
        try:
            meta = orjson.loads(item.value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(meta, dict):
            rows.append(_worker_row(meta, wall, name=str(meta.get("name") or key)))
    return sorted(rows, key=lambda r: r["name"])


def maintainer(space: Space) -> tuple[str, int] | None:
    """The elected maintainer's identity and term, or None."""
    from taskspace.worker.maintainer import ELECTION

    return space.election(ELECTION).leader()


def task_detail(space: Space, record: TaskRecord, digest: EventDigest) -> dict[str, Any]:
    """A task's page: decoded arguments and result, error with traceback and
    earlier errors, timings, and its recent events (attempts)."""
    error = record.error or {}
    args = decoded(record, record.payload)
    call_args, call_kwargs = [*args, {}][:2] if isinstance(args, list) else (args, {})
    ran = None
    if record.started is not None and record.finished is not None:
        ran = max(0.0, record.finished - record.started)
    waited = None if record.started is None else max(0.0, record.started - record.created)
    return {
        "record": record,
        "final": record.state in FINAL_STATES,
        "args": pretty(call_args),
        "kwargs": pretty(call_kwargs) if call_kwargs else None,
        "result": pretty(decoded(record, record.result)) if record.state == "succeeded" else None,
        "error": error or None,
        "history": list(error.get("history") or []),
        "ran": ran,
        "waited": waited,
        "progress": record.progress,
        "events": digest.events_of(record.id),
        "can_cancel": record.state in ("queued", "running") and not record.cancel_requested,
        "can_retry": record.state in RETRYABLE_STATES,
        "now": space.store.clock.wall(),
    }


def usage_rows(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """``/api/usage``'s sums (``by_task``, ``by_model``) as rows, most costly first."""

    def rows(table: Any) -> list[tuple[str, dict[str, float]]]:
        items = [(str(k), v) for k, v in (table or {}).items() if isinstance(v, dict)]
        return sorted(items, key=lambda kv: (-float(kv[1].get("cost_usd", 0)), kv[0]))

    by_task = rows(snapshot.get("by_task"))
    total = {f: sum(float(v.get(f, 0)) for _, v in by_task) for f in
             ("tokens_in", "tokens_out", "cost_usd", "records")}  # fmt: skip
    return {"by_task": by_task, "by_model": rows(snapshot.get("by_model")), "total": total}
