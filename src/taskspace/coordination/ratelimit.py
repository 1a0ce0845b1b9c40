"""Global rate limits (being built; see the coordination issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskspace.space import Space


class RateLimiter:
    def __init__(self, space: Space, name: str, rate: str | None, **options: Any) -> None:
        raise NotImplementedError
