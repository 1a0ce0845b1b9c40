"""``taskspace demo --serve`` as a newcomer runs it: it prints the dashboard's
URL, the dashboard shows the sweep's work while it runs (finished trials,
the workers' shipped log lines), and Ctrl-C stops the server and every
worker and removes the temporary space."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.services import free_port

STARTUP_S = 30.0
WORK_S = 90.0
STOP_S = 30.0


def _lines(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return out, thread


def _wait_line(lines: queue.Queue[str], pattern: str, seen: list[str]) -> re.Match[str]:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if found := re.search(pattern, line):
            return found
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def _worker_pids(workdir: str) -> list[int]:
    """Processes whose command line names the demo's space directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if workdir in cmdline and "worker" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.fault
def test_demo_serve_shows_live_work_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskspace", "demo", "--serve", "--trials", "48",
         "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        lines, pump = _lines(proc)
        workdir = _wait_line(lines, r"on sqlite:///(/\S+)/space\.db", seen).group(1)
        url = _wait_line(lines, r"dashboard: (http://\S+/)", seen).group(1)
        assert url == f"http://127.0.0.1:{port}/"
        with httpx.Client(base_url=url, timeout=10) as client:
            page = client.get("/")
            assert page.status_code == 200 and "<h1>Queues</h1>" in page.text
            deadline = time.monotonic() + WORK_S
            while True:  # trials finish and their workers' log lines reach the dashboard
                queues = client.get("/api/queues").json()
                done = sum(q["counts"]["succeeded"] for q in queues)
                logs = client.get("/logs").text
                if done and re.search(r"fold 1/3: accuracy 0\.\d+", logs):
                    break
                assert time.monotonic() < deadline, f"no finished trial shown: {queues}"
                time.sleep(0.5)
            assert "demo.train" in client.get("/tasks?state=succeeded").text
            assert _worker_pids(workdir), "the demo's workers are not running"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.join(timeout=5)
        assert proc.stdout is not None
        proc.stdout.close()
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert proc.returncode in (0, 130), output  # 130: interrupted before the sweep ended
    assert "interrupted: stopping the workers and the server" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)
    assert not _worker_pids(workdir)
    assert not Path(workdir).exists()


def test_the_demo_server_refuses_a_bad_port_and_moves_off_a_busy_one(tmp_path: Path) -> None:
    import socket

    from taskspace import Space
    from taskspace.demo.serve import DashboardServer
    from taskspace.errors import ConfigError

    space = Space(f"sqlite:///{tmp_path}/space.db")
    for bad in (-1, 65536, "8000", True):
        with pytest.raises(ConfigError, match="port must be an integer"):
            DashboardServer(space, port=bad)  # type: ignore[arg-type]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        server = DashboardServer(space, port=taken)
        try:
            url = server.start()
            assert server.moved and server.port != taken
            assert httpx.get(url + "api/health", timeout=5).status_code == 200
        finally:
            server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "api/health", timeout=2)
    space.close()
