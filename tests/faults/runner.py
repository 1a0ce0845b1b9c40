"""Run one worker of :mod:`tests.faults.app` with fault-test timings.

``python -m tests.faults.runner --url URL [--concurrency N] [--grace S]
[--slow-finish S] [--log-level info]``; exits as ``taskspace worker`` does (4: the
space was wiped or replaced, 3: wedged). The CLI has no flags for the maintenance,
heartbeat and idle intervals, so this runner builds the :class:`~taskspace.WorkerConfig`
itself; everything else (signal handling, shutdown) is the real worker's.
``--slow-finish`` makes every ``store.finish`` call take that much longer, as
on a slow disk or network.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from taskspace import Worker, WorkerConfig
from taskspace.backends.base import Store
from taskspace.worker.config import EXIT_SPACE_LOST, EXIT_WEDGED
from taskspace.worker.logfmt import setup_logging
from tests.faults.app import make_space

MAINTENANCE_S = 0.1
HEARTBEAT_S = 0.25
IDLE_WAIT_S = 0.05
# The shortest maintainer term and retry a worker accepts: a killed or paused
# maintainer is replaced within 2 s, well inside the tests' timeouts.
MAINTAINER_TTL_S = 1.0
MAINTAINER_RETRY_S = 1.0


def slow_down_finish(store: Store, delay: float) -> None:
    """Make every ``finish`` of ``store`` take ``delay`` seconds longer."""
    finish = store.queue.finish

    def slow_finish(items: Sequence[Any]) -> list[bool]:
        time.sleep(delay)
        return finish(items)

    store.queue.finish = slow_finish  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests.faults.runner")
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--slow-finish", type=float, default=0.0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "text")
    config = WorkerConfig.build(
        concurrency=args.concurrency,
        shutdown_grace=args.grace,
        burst=args.burst,
        maintenance_interval=MAINTENANCE_S,
        heartbeat_interval=HEARTBEAT_S,
        idle_wait=IDLE_WAIT_S,
        maintainer_ttl=MAINTAINER_TTL_S,
        maintainer_retry=MAINTAINER_RETRY_S,
    )
    with make_space(args.url) as space:
        if args.slow_finish:
            slow_down_finish(space.store, args.slow_finish)
        report = Worker(space, config).run()
    if report.space_lost:
        return EXIT_SPACE_LOST
    return EXIT_WEDGED if report.wedged else 0


if __name__ == "__main__":
    sys.exit(main())
