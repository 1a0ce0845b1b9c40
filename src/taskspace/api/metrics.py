"""Prometheus metrics: counters and histograms fed from task events, gauges
collected from the space on scrape.

Metric names (every counter also has the ``_created`` sample of
prometheus-client):

==========================================  =========  ==============================
``taskspace_tasks_submitted_total``         counter    task, queue (``submitted`` events)
``taskspace_tasks_started_total``           counter    task, queue
``taskspace_tasks_succeeded_total``         counter    task, queue
``taskspace_tasks_failed_total``            counter    task, queue
``taskspace_tasks_retried_total``           counter    task, queue
``taskspace_tasks_lost_total``              counter    task, queue (lease expiries)
``taskspace_tasks_dead_total``              counter    task, queue
``taskspace_tasks_cancelled_total``         counter    task, queue
``taskspace_tasks_requeued_total``          counter    task, queue (retried by hand)
``taskspace_task_claim_latency_seconds``    histogram  task, queue (started - submitted)
``taskspace_task_run_seconds``              histogram  task, queue, outcome (``duration``)
``taskspace_tokens_total``                  counter    task, model, direction (in|out)
``taskspace_cost_usd_total``                counter    task, model
``taskspace_queue_depth``                   gauge      queue, state          (server only)
``taskspace_queue_oldest_age_seconds``      gauge      queue (oldest queued)  (server only)
``taskspace_workers_alive``                 gauge      (registry)             (server only)
``taskspace_stale_finishes_refused_total``  counter    (store counter)        (server only)
``taskspace_backend_up``                    gauge      1 if the last scrape read the space
==========================================  =========  ==============================

Approximations, stated: claim latency is measured for first attempts whose
``submitted`` and ``started`` events this process both saw, in either order
(submitters and workers ship events independently; it remembers the times of
the EventMetrics.PENDING_MAX newest unmatched ones of each kind); lease
expiries are the ``lost`` events. The server's counters start from the
retained events stream when it starts (so they are the stream's totals, not
the process's), and a worker's
(``serve_worker_metrics``) count only the events that worker emitted.

Label cardinality is bounded (queue and task names are free-form: any API
client may submit to a new queue): each of the labels ``task``, ``queue``
and ``model`` takes at most LABEL_VALUES_MAX (1,000; models: MODELS_MAX)
distinct values per process, the first ones seen; later values are counted
under ``(other)``. Values are cut to LABEL_VALUE_CHARS characters. The
``taskspace_queue_depth`` and oldest-age gauges show the LABEL_VALUES_MAX
queues holding the most tasks and sum the rest under ``queue="(other)"``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskspace.errors import ConfigError

if TYPE_CHECKING:
    from taskspace.events import TaskEvent
    from taskspace.space import Space

log = logging.getLogger("taskspace.api")

COUNTED_KINDS = (
    "submitted",
    "started",
    "succeeded",
    "failed",
    "retried",
    "lost",
    "dead",
    "cancelled",
    "requeued",
)
FINISHED_KINDS = frozenset({"succeeded", "failed", "retried", "lost", "dead", "cancelled"})
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
RUN_BUCKETS = (
    0.001,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
)
SCRAPE_CACHE_S = 1.0
OLDEST_SCAN_QUEUES = 100  # oldest-task age is read for at most this many queues per scrape
MODELS_MAX = 100  # distinct ``model`` label values; further models count as "(other)"
LABEL_VALUES_MAX = 1000  # distinct ``task`` / ``queue`` label values; the rest: "(other)"
LABEL_VALUE_CHARS = 100
OTHER = "(other)"


class LabelCap:
    """The label values one label may take: the first ``limit`` distinct ones
    seen (cut to LABEL_VALUE_CHARS), every later one mapped to ``(other)``;
    thread-safe, its memory bounded by ``limit``."""

    def __init__(self, limit: int = LABEL_VALUES_MAX) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive integer, got {limit!r}")
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """``value`` as it may be used as a label value."""
        value = str(value)[:LABEL_VALUE_CHARS]
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
            return value


class EventMetrics:
    """Counters and histograms of task events on their own CollectorRegistry
    (``self.registry``). ``observe`` never raises on a malformed event (it is
    logged and skipped); it is thread-safe."""

    PENDING_MAX = 100_000

    def __init__(
        self, registry: CollectorRegistry | None = None, labels_max: int = LABEL_VALUES_MAX
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._task_label = LabelCap(labels_max)
        self._queue_label = LabelCap(labels_max)
        self._model_label = LabelCap(min(labels_max, MODELS_MAX))
        self.counters = {
            kind: Counter(
                f"taskspace_tasks_{kind}",
                f"Tasks {kind} (from task events).",
                ("task", "queue"),
                registry=self.registry,
            )
            for kind in COUNTED_KINDS
        }
        self.claim_latency = Histogram(
            "taskspace_task_claim_latency_seconds",
            "Seconds from submit to the start of the first attempt.",
            ("task", "queue"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "taskspace_task_run_seconds",
            "Seconds an attempt ran, by how it ended.",
            ("task", "queue", "outcome"),
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "taskspace_tokens",
            "LLM tokens recorded by tasks.",
            ("task", "model", "direction"),
            registry=self.registry,
        )
        self.cost = Counter(
            "taskspace_cost_usd",
            "Cost in USD recorded by tasks.",
            ("task", "model"),
            registry=self.registry,
        )
        self._submitted: OrderedDict[str, float] = OrderedDict()
        self._started: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._server: Any = None

    def observe(self, event: TaskEvent) -> None:
        """Count one event (see the module docstring for what each kind feeds)."""
        try:
            self._observe(event)
        except Exception:  # a bad event must not stop the tailer or the worker
            log.exception("metrics: skipped an event that could not be counted: %r", event)

    def _observe(self, event: TaskEvent) -> None:
        kind = event.kind
        if kind == "usage" or kind in self.counters:
            task, queue = self._task_label(str(event.name)), self._queue_label(str(event.queue))
        if kind == "usage":
            self._usage(task, event.usage or {})
            return
        counter = self.counters.get(kind)
        if counter is None:
            return  # a kind of a newer release
        counter.labels(task, queue).inc()
        if kind == "submitted":
            with self._lock:
                started = self._started.pop(event.task_id, None)
                if started is None:
                    _remember(self._submitted, event.task_id, event.time, self.PENDING_MAX)
            if started is not None:  # the start was shipped first (two producers)
                self.claim_latency.labels(task, queue).observe(max(0.0, started - event.time))
        elif kind == "started" and event.attempt <= 1:
            with self._lock:
                submitted = self._submitted.pop(event.task_id, None)
                if submitted is None:
                    _remember(self._started, event.task_id, event.time, self.PENDING_MAX)
            if submitted is not None:
                self.claim_latency.labels(task, queue).observe(max(0.0, event.time - submitted))
        if kind in FINISHED_KINDS and event.duration is not None:
            self.run_time.labels(task, queue, kind).observe(max(0.0, float(event.duration)))

    def _usage(self, task: str, usage: dict[str, Any]) -> None:
        model = self._model_label(str(usage.get("model") or ""))  # bounded label values
        for key, direction in (("tokens_in", "in"), ("tokens_out", "out")):
            n = usage.get(key)
            if isinstance(n, int | float) and not isinstance(n, bool) and n > 0:
                self.tokens.labels(task, model, direction).inc(n)
        cost = usage.get("cost_usd")
        if isinstance(cost, int | float) and not isinstance(cost, bool) and cost > 0:
            self.cost.labels(task, model).inc(cost)

    def close(self) -> None:
        """Stop the HTTP server of :func:`serve_worker_metrics`, if any."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _remember(table: OrderedDict[str, float], key: str, value: float, bound: int) -> None:
    table[key] = value
    if len(table) > bound:
        table.popitem(last=False)


def serve_worker_metrics(port: int, host: str = "127.0.0.1") -> EventMetrics:
    """Serve a worker's own ``/metrics`` on ``host:port`` (prometheus-client's
    HTTP server, a daemon thread) and return the EventMetrics the worker feeds
    with ``observe(event)``. ConfigError for a bad port or an address in use;
    ``close()`` stops the server."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be an integer from 0 to 65535, got {port!r}")
    from prometheus_client import start_http_server

    metrics = EventMetrics()
    try:
        started = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    if isinstance(started, tuple):
        metrics._server = started[0]
    return metrics


class SpaceCollector(Collector):
    """Gauges read from the space on scrape (queue depth by state, oldest
    queued task age, live workers, stale finishes refused), cached for
    SCRAPE_CACHE_S so many scrapers cost one read. On a backend that is down
    it reports ``taskspace_backend_up 0`` and the last values it read."""

    def __init__(
        self, space: Space, cache_s: float = SCRAPE_CACHE_S, queues_max: int = LABEL_VALUES_MAX
    ) -> None:
        self.space = space
        self.queues_max = queues_max
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._cached: list[Metric] = []
        self._up = 0

    def describe(self) -> Iterable[Metric]:
        return []  # collected on scrape only (the registry must not read the space)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_s:
                try:
                    self._cached = self._read()
                    self._up = 1
                except Exception as exc:  # noqa: BLE001 - a scrape never fails on the backend
                    log.warning("metrics: cannot read the space: %s", exc)
                    self._up = 0
                self._at = time.monotonic()
            up = GaugeMetricFamily(
                "taskspace_backend_up", "1 if the last read of the space succeeded.", value=self._up
            )
            yield from [*self._cached, up]

    def _read(self) -> list[Metric]:
        space = self.space
        stats = space.stats()
        depth = GaugeMetricFamily(
            "taskspace_queue_depth", "Tasks by queue and state.", labels=("queue", "state")
        )
        counts = _top_queues(stats.counts, self.queues_max)
        for queue, by_state in sorted(counts.items()):
            for state, n in sorted(by_state.items()):
                depth.add_metric((queue[:LABEL_VALUE_CHARS], state), n)
        oldest = GaugeMetricFamily(
            "taskspace_queue_oldest_age_seconds",
            "Age of the oldest queued task.",
            labels=("queue",),
        )
        now = space.store.clock.wall()
        queued = [
            q for q, by_state in sorted(counts.items()) if by_state.get("queued") and q != OTHER
        ]
        for queue in queued[:OLDEST_SCAN_QUEUES]:
            first = space.tasks(state="queued", queue=queue, limit=1)
            if first:
                oldest.add_metric((queue[:LABEL_VALUE_CHARS],), max(0.0, now - first[0].created))
        workers = GaugeMetricFamily(
            "taskspace_workers_alive", "Workers registered and alive.", value=len(space.workers())
        )
        stale = CounterMetricFamily(
            "taskspace_stale_finishes_refused",
            "Finishes refused because the lease had passed to another claim (stale fencing token).",
            value=stats.stale_finishes,
        )
        return [depth, oldest, workers, stale]


def _top_queues(counts: Mapping[str, Mapping[str, int]], limit: int) -> dict[str, dict[str, int]]:
    """``counts`` with at most ``limit`` queues (those holding the most tasks),
    the others' counts summed by state under ``(other)``."""
    ranked = sorted(counts, key=lambda q: (-sum(counts[q].values()), q))
    kept = {q: dict(counts[q]) for q in ranked[:limit]}
    if len(ranked) > limit:
        other = kept.setdefault(OTHER, {})
        for queue in ranked[limit:]:
            for state, n in counts[queue].items():
                other[state] = other.get(state, 0) + n
    return kept
