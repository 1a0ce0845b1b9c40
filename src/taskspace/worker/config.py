"""Worker settings, validated at construction."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from taskspace.backends.checks import check_seconds
from taskspace.errors import ConfigError
from taskspace.events import EVENTS_MAX_AGE_S
from taskspace.logs import LOGS_MAX_AGE_S
from taskspace.tasks.options import check_queue, reject_unknown

DEFAULT_CONCURRENCY = 8
DEFAULT_SHUTDOWN_GRACE_S = 30.0
DEFAULT_MAINTENANCE_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
DEFAULT_IDLE_WAIT_S = 0.25
# The maintainer election (:mod:`taskspace.worker.maintainer`): the term's TTL
# and how often a candidate retries; failover takes at most their sum. Neither
# may be below MAINTAINER_FLOOR_S: a shorter TTL would let a busy machine's
# scheduling delays cost the term (it is renewed every third of it).
DEFAULT_MAINTAINER_TTL_S = 10.0
DEFAULT_MAINTAINER_RETRY_S = 2.0
MAINTAINER_FLOOR_S = 1.0

# Exit codes of ``taskspace worker`` besides 0 (stopped) and 2 (a usage or
# startup error): every slot held a task stuck past its timeout (a supervisor
# restarts the process), or the space was wiped or replaced (never restarted:
# a new process would serve an empty space).
EXIT_WEDGED = 3
EXIT_SPACE_LOST = 4


def default_worker_name() -> str:
    """host:pid:random — unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker runs: which queues, how many tasks at once, when to stop.

    ``maintenance_interval``: seconds between the maintainer's passes.
    ``maintainer_ttl`` / ``maintainer_retry``: the maintainer term's TTL and
    the candidates' retry period (each at least 1 s); a killed or paused
    maintainer is replaced within their sum.
    ``ship_logs``: install a :class:`taskspace.logs.Handler` on the root
    logger while the worker runs (records go to the space's logs stream);
    ``capture_print``: also ship what tasks print (needs ``ship_logs``).
    ``metrics_port``: serve this worker's Prometheus metrics on that port
    (``taskspace.api.metrics.serve_worker_metrics``; 0 picks a free port).
    ``events_max_age`` / ``logs_max_age``: the retention by age the
    elected maintainer applies to the events and logs streams (seconds)."""

    queues: tuple[str, ...] = ("default",)
    concurrency: int = DEFAULT_CONCURRENCY
    burst: bool = False
    name: str = field(default_factory=default_worker_name)
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S
    maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL_S
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S
    idle_wait: float = DEFAULT_IDLE_WAIT_S
    maintainer_ttl: float = DEFAULT_MAINTAINER_TTL_S
    maintainer_retry: float = DEFAULT_MAINTAINER_RETRY_S
    install_signal_handlers: bool = True
    ship_logs: bool = True
    capture_print: bool = True
    metrics_port: int | None = None
    events_max_age: float = EVENTS_MAX_AGE_S
    logs_max_age: float = LOGS_MAX_AGE_S

    def __post_init__(self) -> None:
        if isinstance(self.queues, str) or not self.queues:
            raise ConfigError(f"queues must be a non-empty list of names, got {self.queues!r}")
        for queue in self.queues:
            check_queue(queue)
        if (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise ConfigError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        self._check_durations()
        for name in ("ship_logs", "capture_print"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        port = self.metrics_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise ConfigError(
                f"metrics_port must be a port number (0..65535) or None, got {port!r}"
            )

    def _check_durations(self) -> None:
        """Every duration is finite and not a bool (NaN would make the maintainer
        spin); intervals are positive; the maintainer's from MAINTAINER_FLOOR_S."""
        check_seconds(self.shutdown_grace, "shutdown_grace")
        for name in ("maintenance_interval", "heartbeat_interval", "idle_wait"):
            value = getattr(self, name)
            check_seconds(value, name)
            if value == 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("maintainer_ttl", "maintainer_retry"):
            check_seconds(getattr(self, name), name, minimum=MAINTAINER_FLOOR_S)
        for name in ("events_max_age", "logs_max_age"):
            check_seconds(getattr(self, name), name, minimum=1.0)

    @classmethod
    def build(cls, **options: Any) -> WorkerConfig:
        """From keyword options; ``queues`` may be a comma-separated string."""
        reject_unknown("worker", options, cls)
        queues = options.get("queues")
        if isinstance(queues, str):
            options["queues"] = tuple(q.strip() for q in queues.split(",") if q.strip())
        elif queues is not None:
            options["queues"] = tuple(queues)
        return cls(**options)
