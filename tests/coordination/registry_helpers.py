"""Helpers of the registry tests: a loopback HTTP server with chosen replies, a
watch running on a thread, and waiting for a condition without fixed sleeps."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from taskspace import Space
from taskspace.coordination.registry import ServiceChange


class _Handler(BaseHTTPRequestHandler):
    # /200, /429, /500 ... answer with that status; /slow never answers in time
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3.0)
        code = int(self.path.strip("/") or 200) if self.path != "/slow" else 200
        body = f"status {code}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_server() -> Iterator[str]:
    """A loopback HTTP server; yields its base URL (``http://127.0.0.1:PORT``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def listening_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel's backlog of 1024
    completes them; nothing reads): a TCP check of it passes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        yield int(sock.getsockname()[1])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


class Watcher:
    """``space.registry.watch(...)`` on a thread, its changes in a queue."""

    def __init__(self, space: Space, service: str | None = None, **options: Any) -> None:
        self.stop = threading.Event()
        self.changes: queue.Queue[ServiceChange] = queue.Queue()
        self.seen: list[ServiceChange] = []
        self.error: BaseException | None = None
        self._gen = space.registry.watch(service, stop=self.stop, **options)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for change in self._gen:
                self.changes.put(change)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def expect(self, kind: str, instance_id: str, timeout: float = 10.0) -> ServiceChange:
        """The next change of ``instance_id`` of kind ``kind`` (others are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                change = self.changes.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(change)
            if change.kind == kind and change.id == instance_id:
                return change
        raise AssertionError(f"no {kind} of {instance_id} within {timeout} s; saw {self.seen}")

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
        assert self.error is None, self.error


class _Slow:
    def __init__(self, inner: Any, delay: float, calls: list[str]) -> None:
        self._inner, self._delay, self._calls = inner, delay, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(name)
            time.sleep(self._delay)
            return attr(*args, **kwargs)

        return call


class SlowStore:
    """A store whose KV and clock calls each take ``delay`` longer (a slow
    backend); ``calls`` lists them by method name."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self.calls: list[str] = []
        self.kv = _Slow(inner.kv, delay, self.calls)
        self.clock = _Slow(inner.clock, delay, self.calls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
