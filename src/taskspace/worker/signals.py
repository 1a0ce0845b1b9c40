"""The worker's signal handlers: SIGTERM/SIGINT shut it down, a second one at once."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskspace.worker.worker import Worker

log = logging.getLogger("taskspace.worker")


def install_signal_handlers(worker: Worker) -> Callable[[], None]:
    """SIGTERM and SIGINT stop ``worker`` gracefully (a second one cuts the grace);
    returns a function restoring the previous handlers. Only in the main thread,
    and only if the worker's config asks for it."""
    if not worker.config.install_signal_handlers or (
        threading.current_thread() is not threading.main_thread()
    ):
        return lambda: None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if worker._stopping.is_set():
            log.warning(
                "worker %s got signal %d again: cutting the shutdown grace, stopping now",
                worker.name, signum, extra={"worker": worker.name},
            )  # fmt: skip
            worker.stop(0.0)
            return
        log.warning(
            "worker %s got signal %d: shutting down (grace %.1f s; "
            "send it again to stop at once)",
            worker.name, signum, worker._grace, extra={"worker": worker.name},
        )  # fmt: skip
        worker.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
