"""``taskspace serve``: refuses a non-loopback address without a token (and a
weak token), serves an app's tasks with a token from the environment, serves
``--url`` alone (submit is a clear 404), and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from taskspace.cli import main
from tests.services import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "serve-token-0123456789abcdef"

APP = textwrap.dedent(
    """
    from taskspace import Space

    space = Space()

    @space.task(name="add", max_attempts=1)
    def add(a, b):
        return a + b
    """
)


def test_refuses_public_address_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKSPACE_API_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--url", "memory://", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to serve on '0.0.0.0' without a token" in result.output
    monkeypatch.setenv("MY_TOKEN", "short")
    result = runner.invoke(main, ["serve", "--url", "memory://", "--host", "0.0.0.0",
                                  "--token-env", "MY_TOKEN"])  # fmt: skip
    assert result.exit_code == 2 and "at least 16" in result.output


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "taskspace", "serve", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def _wait_up(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("serve did not come up")


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, and the server's output once it has exited gracefully (uvicorn
    shuts down, then re-raises the signal: exit status -SIGTERM)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode in (0, -signal.SIGTERM), out
    return out


def test_serve_app_with_token(tmp_path: Path) -> None:
    (tmp_path / "serveapp.py").write_text(APP)
    url = f"sqlite:///{tmp_path}/serve.db"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "TASKSPACE_API_TOKEN": TOKEN}
    proc = _start(["serveapp:space", "--url", url, "--port", str(port)], tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, proc)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{base}/api/tasks", timeout=5).status_code == 401
        r = httpx.post(f"{base}/api/tasks", json={"name": "add", "args": [1, 2]}, headers=auth)
        assert r.status_code == 201 and r.json()["name"] == "add"
        page = httpx.get(f"{base}/api/tasks", headers=auth).json()
        assert [t["id"] for t in page["items"]] == [r.json()["id"]]
        metrics = httpx.get(f"{base}/metrics", headers=auth)
        assert metrics.status_code == 200 and "taskspace_queue_depth" in metrics.text
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "taskspace"
    finally:
        out = _stop(proc)
    assert "Application shutdown complete" in out


def test_serve_url_alone(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TASKSPACE_API_TOKEN"}
    env["PYTHONPATH"] = str(REPO_ROOT / "src")
    proc = _start(["--url", f"sqlite:///{tmp_path}/bare.db", "--port", str(port)], tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, proc)
        r = httpx.post(f"{base}/api/tasks", json={"name": "add"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_task"
        assert httpx.get(f"{base}/api/queues").json() == []
    finally:
        out = _stop(proc)
    assert "Application shutdown complete" in out


def test_sigterm_ends_open_event_streams_promptly_and_hosts_are_checked(tmp_path: Path) -> None:
    """F17: SIGTERM with an SSE client connected exits well within the 5 s
    grace and without tracebacks; F5: --allowed-host adds a served Host name."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TASKSPACE_API_TOKEN"}
    env["PYTHONPATH"] = str(REPO_ROOT / "src")
    args = ["--url", f"sqlite:///{tmp_path}/sse.db", "--port", str(port),
            "--allowed-host", "dash.example.com"]  # fmt: skip
    proc = _start(args, tmp_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, proc)
        for host, status in (("dash.example.com", 200), ("attacker.example", 400)):
            r = httpx.get(f"{base}/api/health", headers={"Host": f"{host}:{port}"})
            assert r.status_code == status, (host, r.text)
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", f"{base}/api/events/stream") as stream,
        ):
            lines = stream.iter_lines()
            assert next(lines) == ": connected"
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
            took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 3.0, (took, out)
    assert "Traceback" not in out and "graceful shutdown exceeded" not in out, out
    assert "Application shutdown complete" in out
