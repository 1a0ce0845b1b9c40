"""Retry delays: exponential backoff with full jitter, capped."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, jitter: bool) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after attempt ``attempt`` failed.

    ``base * 2**(attempt-1)`` capped at ``cap``; with jitter, a uniform draw
    between half of that and all of it, so retries of many tasks spread out.
    """
    delay = float(min(cap, base * (2 ** max(0, attempt - 1))))
    if jitter:
        delay = random.uniform(delay / 2, delay)
    return delay
