"""A pool of daemon threads that grows on demand.

Unlike ``ThreadPoolExecutor``, whose threads the interpreter joins at exit,
these threads never keep a worker process alive: a task that ignores its
timeout or cancel flag cannot stop a worker from shutting down once its
grace period is over. A thread stuck in such a task stays stuck; the pool
simply starts another for the next task.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("taskspace.worker")


class DaemonThreadPool:
    """Runs submitted calls on daemon threads, starting a new one when none is idle."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0
        self._threads = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on an idle thread, or a new one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is shut down")
            if self._idle > 0:
                self._idle -= 1
            else:
                self._threads += 1
                threading.Thread(
                    target=self._serve, name=f"{self._name}-{self._threads}", daemon=True
                ).start()
        self._calls.put((fn, args))

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            fn, args = call
            try:
                fn(*args)
            except BaseException:
                log.exception("unexpected error in %s", self._name)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Stop idle threads; busy ones end with their call (or with the process)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._calls.put(None)
