"""The command line: worker, status, submit; clear errors with exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from taskspace.cli import main
from tests.services import RedisServer

APP = textwrap.dedent(
    """
    from taskspace import Space

    space = Space()

    @space.task(name="add")
    def add(a, b):
        return a + b

    @space.task(name="fail", max_attempts=1)
    def fail():
        raise ValueError("no luck")
    """
)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "cliapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKSPACE_URL", f"sqlite:///{tmp_path}/space.db")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("cliapp", None)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskspace", *args],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_commands_and_options() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("worker", "status", "submit", "tasks", "queues", "demo"):
        assert command in result.output
    result = runner.invoke(main, ["worker", "--help"])
    for option in ("--processes", "--concurrency", "--queues", "--burst", "--url", "--log-level",
                   "--log-format"):  # fmt: skip
        assert option in result.output


def test_submit_worker_status_round_trip(app_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "cliapp:space", "add", "--args", "[2, 40]"])
    assert result.exit_code == 0, result.output
    task_id = result.output.strip()
    assert len(task_id) == 32
    status = orjson.loads(runner.invoke(main, ["status", "--json"]).output)
    assert status["queues"]["default"]["queued"] == 1
    worker = run_cli("worker", "cliapp:space", "--burst", "--concurrency", "2", cwd=app_dir)
    assert worker.returncode == 0, worker.stderr
    status = orjson.loads(runner.invoke(main, ["status", "--json"]).output)
    assert status["queues"]["default"] == {"succeeded": 1}
    table = runner.invoke(main, ["status"])
    assert table.exit_code == 0 and "succeeded" in table.output


def test_submit_wait_prints_result_and_failure(app_dir: Path) -> None:
    log = (app_dir / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "taskspace", "worker", "cliapp:space", "--processes", "2"],
        cwd=app_dir,
        stderr=log,
    )
    try:
        ok = run_cli("submit", "cliapp:space", "add", "--args", "[1, 2]", "--wait",
                     "--timeout", "30", cwd=app_dir)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines()[-1] == "3", ok.stdout
        bad = run_cli("submit", "cliapp:space", "fail", "--wait", "--timeout", "30", cwd=app_dir)
        assert bad.returncode == 1, bad.stderr
        assert "failed: ValueError: no luck" in bad.stderr
    finally:
        worker.terminate()
        code = worker.wait(timeout=30)
        log.close()
        assert code == 0, (app_dir / "worker.log").read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["submit", "nosuchmodule:space", "add"], "cannot import app module 'nosuchmodule'"),
        (["submit", "cliapp:nothing", "add"], "has no attribute 'nothing'"),
        (["submit", "cliapp:APP_NAME_X", "add"], "has no attribute"),
        (["submit", "cliapp:space", "nope"], "unknown task 'nope'; registered: add, fail"),
        (["submit", "cliapp:space", "add", "--args", "[1,"], "--args is not valid JSON"),
        (["submit", "cliapp:space", "add", "--args", '{"a": 1}'], "--args must be a JSON array"),
        (["submit", "cliapp:space", "add", "--countdown", "-3"], "countdown=-3.0: must be"),
        (["status", "--url", "mysql://x"], "unsupported backend 'mysql'"),
        (["worker", "cliapp:space", "--queues", ","], "queues must be a non-empty list"),
    ],
)
def test_cli_errors_exit_2_with_message(app_dir: Path, args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (app_dir / "space.db").exists()  # bad input changes nothing, creates nothing


def test_app_that_is_not_a_space(app_dir: Path) -> None:
    (app_dir / "notspace.py").write_text("space = 42\n")
    result = CliRunner().invoke(main, ["submit", "notspace:space", "add"])
    assert result.exit_code == 2
    assert "is a int, not a taskspace.Space" in result.output


def test_supervisor_burst_with_two_processes(app_dir: Path) -> None:
    runner = CliRunner()
    for i in range(20):
        assert (
            runner.invoke(main, ["submit", "cliapp:space", "add", "--args", f"[{i}, 1]"]).exit_code
            == 0
        )
    worker = run_cli("worker", "cliapp:space", "--processes", "2", "--burst", cwd=app_dir)
    assert worker.returncode == 0, worker.stderr
    status = orjson.loads(runner.invoke(main, ["status", "--json"]).output)
    assert status["queues"]["default"] == {"succeeded": 20}


def test_submit_wait_in_a_space_wiped_meanwhile_is_one_line_and_exit_4(app_dir: Path) -> None:
    """FLUSHALL while ``submit --wait`` waits: the task is gone with its space, and
    the command says so in one line and exits 4 (never waits out its timeout)."""
    server = RedisServer().start()
    try:
        url = server.namespaced_url()
        command = [sys.executable, "-m", "taskspace", "submit", "cliapp:space", "add",
                   "--args", "[1, 2]", "--wait", "--timeout", "60", "--url", url]  # fmt: skip
        waiting = subprocess.Popen(
            command, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        task_id = (waiting.stdout.readline() if waiting.stdout else "").strip()
        assert task_id, waiting.communicate(timeout=10)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(64).startswith(b"+OK")
        began = time.monotonic()
        _, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 4, err
        assert time.monotonic() - began < 10
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: space lost: "), err
    finally:
        server.close()
