"""``taskspace logs`` (filters, JSON lines, --since, --follow in a real process)
and ``taskspace worker --metrics-port`` (a worker's own /metrics fed by its events)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from taskspace import Space, Worker, WorkerConfig
from taskspace.cli import main
from taskspace.cli.logs import parse_since
from taskspace.errors import ConfigError
from taskspace.logs import Handler
from taskspace.tasks.context import TaskContext, bind, unbind
from tests.services import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("obs.cli")


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[tuple[str, Handler]]:
    """A SQLite space with a handler on ``obs.cli`` (records of two fake tasks)."""
    url = f"sqlite:///{tmp_path}/space.db"
    space = Space(url)
    handler = Handler(space, worker="w-cli", interval=0.01)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for task_id in ("task-a", "task-b"):
        token = bind(TaskContext(task_id, "obs.cli_task", 2, 3, 1, "w-cli", lambda d, t: None))
        try:
            log.info("info of %s", task_id)
            log.error("error of %s", task_id)
        finally:
            unbind(token)
    handler.flush()
    yield url, handler
    log.removeHandler(handler)
    log.propagate = True
    handler.close()
    space.close()


def test_logs_json_lines_for_one_task(shipped: tuple[str, Handler]) -> None:
    url, _ = shipped
    result = CliRunner().invoke(main, ["logs", "--task", "task-a", "--json", "--url", url])
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in result.output.splitlines()]
    assert [(d["task_id"], d["level"], d["message"]) for d in lines] == [
        ("task-a", "INFO", "info of task-a"),
        ("task-a", "ERROR", "error of task-a"),
    ]
    first = lines[0]
    assert first["task"] == "obs.cli_task" and first["attempt"] == 2 and first["worker"] == "w-cli"
    assert first["timestamp"].endswith("Z") and isinstance(first["time"], float)


def test_logs_filters_and_text(shipped: tuple[str, Handler]) -> None:
    url, _ = shipped
    runner = CliRunner()
    result = runner.invoke(main, ["logs", "--level", "error", "--since", "10m", "--url", url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and all("ERROR" in line and "w-cli" in line for line in lines)
    assert "obs.cli_task[task-b]#2 obs.cli: error of task-b" in lines[1]
    newest = runner.invoke(main, ["logs", "--limit", "1", "--url", url])
    assert newest.output.strip().endswith("error of task-b")
    none = runner.invoke(main, ["logs", "--worker", "other", "--url", url])
    assert none.exit_code == 0 and none.output == ""
    bad = runner.invoke(main, ["logs", "--since", "last tuesday", "--url", url])
    assert bad.exit_code == 2 and "--since" in bad.output


def test_parse_since() -> None:
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("30", now=100.0) == 70.0
    assert parse_since("2026-01-01T00:00:00") == parse_since("2026-01-01T00:00:00+00:00")
    with pytest.raises(ConfigError):
        parse_since("soon")


def test_logs_follow_prints_a_new_record(shipped: tuple[str, Handler]) -> None:
    url, handler = shipped
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskspace", "logs", "--follow", "--json", "--limit", "1",
         "--level", "warning", "--url", url],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = orjson.loads(proc.stdout.readline())  # the newest matching record so far
        assert first["message"] == "error of task-b"
        log.info("not at the level")
        log.warning("a new one")
        handler.flush()
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(15)
        assert line and orjson.loads(line[0])["message"] == "a new one"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_worker_metrics_port(tmp_path: Path) -> None:
    space = Space(f"sqlite:///{tmp_path}/space.db")

    @space.task(name="obs.metered")
    def metered() -> int:
        from taskspace import current_task

        current_task().record(tokens_in=7, model="m")
        return 1

    port = free_port()
    config = WorkerConfig(idle_wait=0.05, install_signal_handlers=False, metrics_port=port)
    worker = Worker(space, config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        assert metered.submit().result(timeout=10) == 1
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            if "taskspace_tasks_succeeded_total{" in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert 'name="obs.metered"' in text or 'task="obs.metered"' in text, text[:2000]
        assert "taskspace_tokens" in text
    finally:
        worker.stop(grace=0)
        thread.join(10)
        space.close()


def test_worker_metrics_port_bad_input() -> None:
    for port in (-1, 70000, "80", True):
        with pytest.raises(ConfigError, match="metrics_port"):
            WorkerConfig(metrics_port=port)  # type: ignore[arg-type]
    result = CliRunner().invoke(
        main, ["worker", "x:space", "--processes", "2", "--metrics-port", "9999"]
    )
    assert result.exit_code == 2 and "--metrics-port" in result.output
