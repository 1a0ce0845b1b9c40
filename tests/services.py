"""Private servers for tests: a redis-server on a free loopback port that a test
may stop, SIGKILL and restart without touching anyone else's server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("TASKSPACE_REQUIRE_SERVICES") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    """Skip, or fail when the environment requires every service."""
    message = f"{what} is not available"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and TASKSPACE_REQUIRE_SERVICES=1")
    pytest.skip(message)


class RedisServer:
    """A redis-server of our own on 127.0.0.1; AOF settings as asked."""

    def __init__(self, appendfsync: str | None = None, workdir: Path | None = None) -> None:
        self.port = free_port()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="taskspace-redis-"))
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def namespaced_url(self) -> str:
        return f"{self.url}?namespace=t{uuid.uuid4().hex[:12]}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server")
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.appendfsync:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: Redis fsyncs its AOF and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def restart(self) -> RedisServer:
        """Start again on the same port and directory after :meth:`stop` or :meth:`kill`.
        With AOF on, Redis replays its log before it answers PING, so once this
        returns the data is back."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is still running")
        return self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: RedisServer | None = None


def shared_redis() -> RedisServer:
    """One private redis-server for the whole test session (started on first use)."""
    global _shared
    if _shared is None:
        _shared = RedisServer().start()
    return _shared


def close_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None
