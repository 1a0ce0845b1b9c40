"""``taskspace demo --serve``: the API and dashboard of the demo's space,
served by uvicorn in a background thread of the demo's process."""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

from taskspace.errors import ConfigError, MissingDependency
from taskspace.space import Space

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def port_free(host: str, port: int) -> bool:
    """True if ``host:port`` can be bound right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise ConfigError(f"cannot serve on {host}:{port}: {exc}") from exc
    return True


def free_port(host: str) -> int:
    """A port on ``host`` that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class DashboardServer:
    """The API and dashboard (``taskspace.api.app.create_app``) for ``space``
    on ``host:port`` (a busy port falls back to a free one; ``port`` 0: any
    free port), in a daemon thread. :meth:`start` returns once it accepts
    connections (or raises ConfigError within START_TIMEOUT_S);
    :meth:`stop` returns within about STOP_TIMEOUT_S. Without the ``api``
    extra (FastAPI, uvicorn, Jinja2) :meth:`start` raises MissingDependency."""

    def __init__(self, space: Space, host: str = "127.0.0.1", port: int = 8750) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an integer from 0 to 65535, got {port!r}")
        self.space = space
        self.host = host
        self.port = port
        self.moved = False  # the asked port was busy
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The dashboard's address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        """Serve; return the dashboard's URL."""
        try:
            import uvicorn

            from taskspace.api.app import create_app
        except ImportError as exc:
            raise MissingDependency(
                f"--serve needs the API extra: pip install 'taskspace[api]' ({exc})"
            ) from exc
        if self.port == 0 or not port_free(self.host, self.port):
            self.moved = self.port != 0
            self.port = free_port(self.host)
        app = create_app(self.space, host=self.host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                ws="none", lifespan="on",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name="taskspace-demo-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the dashboard server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        """Stop serving (open live streams are closed); bounded."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=1.0)
