"""Prometheus metrics after real tasks ran through a real worker (SQLite and
Redis): counters by task and queue, claim latency and run time histograms,
tokens and cost, queue depth and oldest age, workers, backend up; a worker's
own endpoint (serve_worker_metrics); a bad event never breaks the counting;
and the Grafana dashboard only uses metric names the server exposes."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskspace import Space
from taskspace.api.app import create_app
from taskspace.api.metrics import EventMetrics, serve_worker_metrics
from taskspace.errors import ConfigError
from taskspace.events import TaskEvent
from tests.observability.test_api import api_space, drain, test_client, wait_until
from tests.services import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
__all__ = ["api_space"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict[Any, float], name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_after_real_tasks(api_space: Space, tmp_path: Path) -> None:
    app = create_app(api_space)
    with test_client(app) as client:
        for i in range(3):
            client.post("/api/tasks", json={"name": "add", "args": [i, i]})
        client.post("/api/tasks", json={"name": "boom"})
        client.post("/api/tasks", json={"name": "flaky", "args": [str(tmp_path / "flag")]})
        client.post("/api/tasks", json={"name": "priced", "args": [10]})
        client.post("/api/tasks", json={"name": "priced", "args": [5]})
        client.post("/api/tasks", json={"name": "add", "args": [1, 1], "queue": "later"})
        drain(api_space)
        flaky = api_space.tasks(name="flaky")[0].id
        wait_until(lambda: drain(api_space) or api_space.handle(flaky).done(), timeout=30,
                   what="the flaky task's retry")  # fmt: skip

        expected = {  # events are shipped in the background, by two shippers: await them all
            ("taskspace_tasks_succeeded_total", "flaky", "default"): 1,
            ("taskspace_tasks_submitted_total", "add", "later"): 1,
            ("taskspace_tasks_succeeded_total", "priced", "default"): 2,
            ("taskspace_tasks_failed_total", "boom", "default"): 1,
        }

        def settled() -> dict[Any, float] | None:
            page = samples(client.get("/metrics").text)
            for (name, task, queue), n in expected.items():
                if value(page, name, task=task, queue=queue) != n:
                    return None
            return page

        page = wait_until(settled, timeout=15, what="the events in the metrics")
        default = {"queue": "default"}
        assert value(page, "taskspace_tasks_submitted_total", task="add", **default) == 3
        assert value(page, "taskspace_tasks_submitted_total", task="add", queue="later") == 1
        assert value(page, "taskspace_tasks_succeeded_total", task="add", **default) == 3
        assert value(page, "taskspace_tasks_failed_total", task="boom", **default) == 1
        assert value(page, "taskspace_tasks_retried_total", task="flaky", **default) == 1
        assert value(page, "taskspace_tasks_started_total", task="flaky", **default) == 2
        assert value(page, "taskspace_task_claim_latency_seconds_count", task="add", **default) == 3
        assert value(page, "taskspace_task_run_seconds_count", task="add", outcome="succeeded",
                     **default) == 3  # fmt: skip
        assert value(page, "taskspace_task_run_seconds_count", task="boom", outcome="failed",
                     **default) == 1  # fmt: skip
        tokens = {"task": "priced", "model": "m1"}
        assert value(page, "taskspace_tokens_total", direction="in", **tokens) == 15
        assert value(page, "taskspace_tokens_total", direction="out", **tokens) == 30
        assert value(page, "taskspace_cost_usd_total", **tokens) == 1.0
        assert value(page, "taskspace_queue_depth", queue="later", state="queued") == 1
        assert value(page, "taskspace_queue_depth", queue="default", state="succeeded") == 6
        assert value(page, "taskspace_queue_oldest_age_seconds", queue="later") >= 0
        assert ("taskspace_queue_oldest_age_seconds", (("queue", "default"),)) not in page
        assert value(page, "taskspace_backend_up") == 1
        assert value(page, "taskspace_workers_alive") == 0  # the burst worker has left
        assert ("taskspace_stale_finishes_refused_total", ()) in page

        usage = client.get("/api/usage").json()
        assert usage["by_task"]["priced"] == {"records": 2, "tokens_in": 15, "tokens_out": 30,
                                              "cost_usd": 1.0}  # fmt: skip
        assert usage["by_model"]["m1"]["records"] == 2


def test_metrics_are_cached_for_a_second(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/cache.db")

    @space.task(name="noop")
    def noop() -> None: ...

    try:
        with test_client(create_app(space, tail_events=False)) as client:
            first = samples(client.get("/metrics").text)
            noop.submit()
            second = samples(client.get("/metrics").text)
            assert value(first, "taskspace_queue_depth", queue="default", state="queued") == 0
            assert value(second, "taskspace_queue_depth", queue="default", state="queued") == 0

            def fresh() -> bool:
                page = samples(client.get("/metrics").text)
                return value(page, "taskspace_queue_depth", queue="default", state="queued") == 1

            wait_until(fresh, timeout=3, what="the cache to expire")
    finally:
        space.close()


def _event(kind: str, task_id: str = "t1", **extra: Any) -> TaskEvent:
    fields: dict[str, Any] = {"id": 0, "time": 100.0, "kind": kind, "task_id": task_id,
                              "name": "job", "queue": "q", "worker": "w", "attempt": 1,
                              "duration": None, "error": None, "usage": None}  # fmt: skip
    fields.update(extra)
    return TaskEvent(**fields)


def test_event_metrics_and_worker_endpoint() -> None:
    port = free_port()
    metrics = serve_worker_metrics(port)
    try:
        metrics.observe(_event("submitted", time=100.0))
        metrics.observe(_event("started", time=100.25))
        metrics.observe(_event("succeeded", duration=0.5))
        metrics.observe(_event("lost", attempt=2, duration=30.0))  # a lease expiry
        metrics.observe(_event("usage", usage={"tokens_in": 3, "tokens_out": "x", "model": "m"}))
        metrics.observe(_event("succeeded", duration="not a number"))  # skipped, logged
        metrics.observe(_event("some-future-kind"))
        metrics.observe(None)  # type: ignore[arg-type]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page = samples(response.read().decode())
        labels = {"task": "job", "queue": "q"}
        assert value(page, "taskspace_tasks_succeeded_total", **labels) == 2
        assert value(page, "taskspace_task_claim_latency_seconds_sum", **labels) == 0.25
        assert value(page, "taskspace_task_run_seconds_count", outcome="succeeded", **labels) == 1
        assert value(page, "taskspace_tasks_lost_total", **labels) == 1
        assert value(page, "taskspace_task_run_seconds_sum", outcome="lost", **labels) == 30
        assert value(page, "taskspace_tokens_total", task="job", model="m", direction="in") == 3
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            serve_worker_metrics(port)
        with pytest.raises(ConfigError, match="port"):
            serve_worker_metrics(70_000)
    finally:
        metrics.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_pending_submits_are_bounded() -> None:
    metrics = EventMetrics()
    metrics.PENDING_MAX = 10  # type: ignore[misc]
    for i in range(25):
        metrics.observe(_event("submitted", task_id=f"t{i}"))
    assert len(metrics._submitted) == 10
    metrics.observe(_event("started", task_id="t24", time=101.0))
    assert len(metrics._submitted) == 9
    for i in range(25):  # starts shipped before their submits: matched later
        metrics.observe(_event("started", task_id=f"s{i}", time=102.0))
    assert len(metrics._started) == 10
    metrics.observe(_event("submitted", task_id="s24", time=101.5))
    assert len(metrics._started) == 9
    count = metrics.registry.get_sample_value(
        "taskspace_task_claim_latency_seconds_sum", {"task": "job", "queue": "q"}
    )
    assert count == 1.0 + 0.5
    for i in range(150):  # model label values are bounded
        metrics.observe(_event("usage", usage={"tokens_in": 1, "model": f"m{i}"}))
    models = {s.labels["model"] for s in metrics.tokens.collect()[0].samples}
    assert len(models) == 101 and "(other)" in models


def test_grafana_dashboard_uses_exposed_metrics(tmp_path: Path) -> None:
    doc = json.loads((REPO_ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs
            for n in re.findall(r"taskspace_[a-z_]+", e)}  # fmt: skip
    assert len(exprs) >= 10 and used
    space = Space(f"sqlite:///{tmp_path}/g.db")
    try:
        with test_client(create_app(space, tail_events=False)) as client:
            page = client.get("/metrics").text
        exposed = {f.name for f in text_string_to_metric_families(page)}
        exposed |= {n + "_total" for n in exposed}
        assert used <= exposed, used - exposed
    finally:
        space.close()


def test_label_values_are_bounded(tmp_path: Path) -> None:
    """F13: free-form queue and task names cannot grow the registry without
    bound: past the cap they count under "(other)", totals kept."""
    from prometheus_client import generate_latest

    from taskspace.api.metrics import SpaceCollector

    metrics = EventMetrics(labels_max=5)
    for i in range(40):
        metrics.observe(_event("submitted", f"t{i}", queue=f"q{i}", name=f"job{i % 20}"))
    page = samples(generate_latest(metrics.registry).decode())
    series = {labels for (name, labels) in page if name == "taskspace_tasks_submitted_total"}
    queues = {dict(labels)["queue"] for labels in series}
    tasks = {dict(labels)["task"] for labels in series}
    assert queues == {"q0", "q1", "q2", "q3", "q4", "(other)"}
    assert tasks == {"job0", "job1", "job2", "job3", "job4", "(other)"}
    total = sum(v for (name, _), v in page.items() if name == "taskspace_tasks_submitted_total")
    assert total == 40

    with Space(f"sqlite:///{tmp_path}/labels.db") as space:

        @space.task(name="noop")
        def noop() -> None: ...

        for i in range(8):
            for _ in range(i + 1):
                noop.options(queue=f"queue{i}").submit()
        collector = SpaceCollector(space, queues_max=3)
        depth = {
            s.labels["queue"]: s.value
            for family in collector.collect()
            if family.name == "taskspace_queue_depth"
            for s in family.samples
            if s.labels["state"] == "queued"
        }
        assert depth == {"queue7": 8, "queue6": 7, "queue5": 6, "(other)": 15}
