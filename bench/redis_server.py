"""A private ``redis-server`` for benchmarks: loopback only, no persistence, a temporary dir.

Also a minimal RESP client (PING, FLUSHDB, INFO) on a plain socket, so the benchmark
needs no Redis client library in the project's environment.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from urllib.parse import urlsplit

from bench.workers import BenchError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick on the loopback address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _encode(*args: str | bytes) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def command(url: str, *args: str) -> str:
    """Send one command to the Redis at ``url``; return a simple or bulk string reply."""
    parts = urlsplit(url)
    db = parts.path.strip("/") or "0"
    with socket.create_connection((parts.hostname or HOST, parts.port or 6379), 5.0) as sock:
        sock.sendall(_encode("SELECT", db) + _encode(*args))
        reader = sock.makefile("rb")
        replies = [_read_reply(reader) for _ in range(2)]
    return replies[1]


def _read_reply(reader: BinaryIO) -> str:
    line = reader.readline()
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind in (b"+", b":"):
        return rest.decode()
    if kind == b"-":
        raise BenchError(f"redis error: {rest.decode()}")
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return ""
        data = reader.read(size + 2)
        return data[:-2].decode(errors="replace")
    raise BenchError(f"unexpected redis reply {line!r}")


def flushdb(url: str) -> None:
    command(url, "FLUSHDB")


class RedisServer:
    """``redis-server`` on a free loopback port in a temporary directory, for ``with``."""

    def __init__(self, binary: str = "redis-server") -> None:
        found = shutil.which(binary)
        if found is None:
            raise BenchError(f"{binary} not found on PATH (apt-get install redis-server)")
        self.binary = found
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="taskspace-bench-redis-", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def version(self) -> str:
        info = command(self.url, "INFO", "server")
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1]
        return "?"

    def start(self) -> RedisServer:
        self.port = free_port()
        args = [
            self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "yes",
            "--logfile", str(self.dir / "redis.log"), "--databases", "4",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if command(self.url, "PING") == "PONG":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise BenchError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
