"""Periodic tasks (being built; see the coordination issue)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskspace.space import Space


class Schedule:
    def bound_to(self, space: Space) -> Schedule:
        raise NotImplementedError


def periodic(space: Space, fn: Callable[..., Any] | None, **options: Any) -> Any:
    raise NotImplementedError


def fire_due(space: Space) -> int:
    """The maintainer's periodic step: push every due tick once; how many were pushed."""
    return 0
