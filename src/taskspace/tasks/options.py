"""Typed, validated options for task definitions and single submissions."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from taskspace.backends.base import PRIORITY_MAX, PRIORITY_MIN
from taskspace.backends.checks import check_seconds
from taskspace.errors import ConfigError

if TYPE_CHECKING:
    from taskspace.coordination.ratelimit import RateLimiter

Isolation = Literal["thread", "async", "process"]
ISOLATIONS: tuple[str, ...] = ("thread", "async", "process")

DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 30.0
DEFAULT_RETRY_BACKOFF_S = 1.0
DEFAULT_RETRY_BACKOFF_MAX_S = 300.0
DEFAULT_MAX_RATE_LIMITED = 100


MIN_SECONDS = 0.001  # the floor of the positive durations (lease, timeout, result_ttl)


def _check_int(name: str, value: Any, minimum: int) -> None:
    """An integer (never a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def reject_unknown(kind: str, options: dict[str, Any], config: Any) -> None:
    """Raise ConfigError naming every option that the dataclass ``config`` lacks."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown {kind} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )


def check_queue(queue: Any) -> None:
    """A queue name is a non-empty string without commas or whitespace."""
    if not isinstance(queue, str) or not queue or any(c in queue for c in ", \t\n"):
        raise ConfigError(f"queue must be a non-empty name without commas or spaces, got {queue!r}")


def check_priority(priority: Any) -> None:
    """Priorities are integers from PRIORITY_MIN to PRIORITY_MAX (every backend
    orders that range exactly); higher runs first."""
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not PRIORITY_MIN <= priority <= PRIORITY_MAX
    ):
        raise ConfigError(
            f"priority must be an integer from {PRIORITY_MIN:,} to {PRIORITY_MAX:,},"
            f" got {priority!r}"
        )


class RateLimits(Mapping[str, str]):
    """A task's ``rate_limit`` dict, frozen: read-only and hashable, so
    TaskOptions stays immutable (a change would bypass its checks)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def check_rate_limit(value: Any) -> Any:
    """A task's ``rate_limit``: None, a rate (``"10/s"``), a dict of limits
    (``{"requests": "500/m"}``) or a RateLimiter; ConfigError naming the value
    otherwise. Returns it with a dict frozen (:class:`RateLimits`)."""
    from taskspace.coordination.ratelimit import RateLimiter, build_limits

    if value is None or isinstance(value, RateLimiter):
        return value
    if isinstance(value, str):
        build_limits("task", value, None, None)
        return value
    if isinstance(value, Mapping):
        build_limits("task", None, None, value)
        return RateLimits(value)
    raise ConfigError(
        "rate_limit must be a rate like '10/s', a dict of limits like {'requests': '500/m'}"
        f" or a RateLimiter (space.rate_limit(...)), got {value!r}"
    )


SPACE_DEFAULT: Final = "space"
"""``result_ttl`` value meaning: the Space's ``result_ttl``."""


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task runs: its queue, priority, attempts, lease, timeout and isolation.

    ``rate_limit``: a budget every attempt must fit before it runs, shared by
    every worker (``"10/s"``, ``{"requests": "500/m"}`` for a limiter of the
    task's own named ``task:<task name>``, or a RateLimiter shared with other
    code); an attempt that does not fit goes back to the queue until the
    budget allows, without spending an attempt. A task that raises
    RateLimited is likewise rescheduled after its ``retry_after`` without
    spending an attempt, ``max_rate_limited`` times in a row at most; past
    that each one counts as an attempt, like any error.
    """

    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease: float = DEFAULT_LEASE_S
    timeout: float | None = None
    isolation: Isolation | None = None
    retry_backoff: float = DEFAULT_RETRY_BACKOFF_S
    retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX_S
    retry_jitter: bool = True
    result_ttl: float | Literal["space"] | None = SPACE_DEFAULT
    rate_limit: str | Mapping[str, str] | RateLimiter | None = None  # a dict: RateLimits
    max_rate_limited: int = DEFAULT_MAX_RATE_LIMITED

    def __post_init__(self) -> None:
        check_queue(self.queue)
        object.__setattr__(self, "rate_limit", check_rate_limit(self.rate_limit))
        _check_int("max_rate_limited", self.max_rate_limited, 0)
        if self.result_ttl != SPACE_DEFAULT:
            check_seconds(self.result_ttl, "result_ttl", minimum=MIN_SECONDS, optional=True)
        check_priority(self.priority)
        _check_int("max_attempts", self.max_attempts, 1)
        check_seconds(self.lease, "lease", minimum=MIN_SECONDS)
        check_seconds(self.timeout, "timeout", minimum=MIN_SECONDS, optional=True)
        check_seconds(self.retry_backoff, "retry_backoff")
        check_seconds(self.retry_backoff_max, "retry_backoff_max")
        if not isinstance(self.retry_jitter, bool):
            raise ConfigError(f"retry_jitter must be True or False, got {self.retry_jitter!r}")
        if self.isolation is not None and self.isolation not in ISOLATIONS:
            raise ConfigError(
                f"isolation must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}"
            )

    @classmethod
    def build(cls, **options: Any) -> TaskOptions:
        """Construct from keyword options, refusing unknown ones by name."""
        return cls().updated(**options)

    def updated(self, **options: Any) -> TaskOptions:
        """A copy with ``options`` changed, refusing unknown ones by name."""
        reject_unknown("task", options, self)
        return replace(self, **options)


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """Per-submission overrides: when to run (countdown or eta), where, and dedup."""

    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    eta: datetime | float | None = None
    dedup_key: str | None = None

    def __post_init__(self) -> None:
        if self.queue is not None:
            check_queue(self.queue)
        if self.priority is not None:
            check_priority(self.priority)
        check_seconds(self.countdown, "countdown", optional=True)
        if self.countdown is not None and self.eta is not None:
            raise ConfigError("give countdown or eta, not both")
        if self.eta is not None and (
            isinstance(self.eta, bool) or not isinstance(self.eta, datetime | int | float)
        ):
            raise ConfigError(f"eta must be a datetime or a Unix timestamp, got {self.eta!r}")
        if self.dedup_key is not None and (
            not isinstance(self.dedup_key, str) or not self.dedup_key
        ):
            raise ConfigError(f"dedup_key must be a non-empty string, got {self.dedup_key!r}")

    @classmethod
    def build(cls, **options: Any) -> SubmitOptions:
        """Construct from keyword options, refusing unknown ones by name."""
        reject_unknown("submit", options, cls)
        return cls(**options)

    def delay(self) -> float:
        """Seconds from now until the task may run. An ETA is wall-clock time by nature,
        so it is converted here with the caller's clock; everything after is store time."""
        if self.countdown is not None:
            return float(self.countdown)
        if self.eta is None:
            return 0.0
        stamp = self.eta.timestamp() if isinstance(self.eta, datetime) else float(self.eta)
        return max(0.0, stamp - time.time())
