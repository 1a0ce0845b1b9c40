"""Supervisor for ``taskspace worker --processes N``: N worker processes, kept alive.

A child that dies (crash, OOM kill, SIGKILL) is restarted with exponential
backoff (reset once a child has lived a while); its in-flight tasks come back
through lease expiry, so nothing is lost. SIGTERM and SIGINT are forwarded to
every child, which then shuts down gracefully. In burst mode a child that
exits cleanly is done and not restarted; the supervisor exits when all are.

A child that exits with EXIT_SPACE_LOST (its space was wiped or replaced) is
not restarted: a new process would serve the new, empty space as if nothing
had happened. The supervisor stops the other children and exits with that
code too.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from taskspace.worker.config import EXIT_SPACE_LOST

log = logging.getLogger("taskspace.supervisor")

RESTART_BACKOFF_START_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0
POLL_S = 0.1


@dataclass
class _Child:
    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    done: bool = False


class Supervisor:
    """Runs ``command`` in ``processes`` children and keeps them running."""

    def __init__(self, command: Sequence[str], processes: int, burst: bool) -> None:
        self.command = list(command)
        self.burst = burst
        self.children = [_Child(slot) for slot in range(processes)]
        self.restarts = 0
        self.space_lost = False
        self._stopping = threading.Event()

    def run(self) -> int:
        """Supervise until stopped (or, in burst mode, until every child is done).
        Returns 0 if every child's last exit was clean, EXIT_SPACE_LOST if a
        child found its space wiped or replaced, 1 otherwise."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            while not all(c.done for c in self.children):
                self._step()
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # A child stopped by our SIGTERM before it installed its handlers (still
        # starting up) exits with -SIGTERM: that is a clean stop too.
        if self.space_lost:
            return EXIT_SPACE_LOST
        clean = (0, -signal.SIGTERM) if self._stopping.is_set() else (0,)
        return 0 if all(c.proc is None or c.proc.returncode in clean for c in self.children) else 1

    def stop(self) -> None:
        """Forward SIGTERM to every child and stop restarting them."""
        self._stopping.set()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.warning("supervisor got signal %d: stopping %d children", signum, len(self.children))
        self.stop()

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(self.command)
        child.started = time.monotonic()
        log.info("started worker process %d (pid %d)", child.slot, child.proc.pid)

    def _step(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.done or child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if self._stopping.is_set() or (self.burst and code == 0):
                child.done = True
                continue
            if code == EXIT_SPACE_LOST:
                log.critical(
                    "worker process %d found its space wiped or replaced; stopping every"
                    " worker process (none is restarted)", child.slot,
                )  # fmt: skip
                child.done = True
                self.space_lost = True
                self.stop()
                continue
            if child.restart_at == 0.0:
                self._schedule_restart(child, code, now)
            elif now >= child.restart_at:
                child.restart_at = 0.0
                self.restarts += 1
                self._start(child)

    def _schedule_restart(self, child: _Child, code: int, now: float) -> None:
        if now - child.started > HEALTHY_AFTER_S:
            child.failures = 0
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_START_S * 2**child.failures)
        child.failures += 1
        child.restart_at = now + delay
        log.warning(
            "worker process %d exited with code %d; restarting in %.1f s", child.slot, code, delay
        )
