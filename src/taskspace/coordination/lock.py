"""Fenced locks and semaphores (being built; see the coordination issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskspace.space import Space


class Lock:
    def __init__(self, space: Space, name: str, **options: Any) -> None:
        raise NotImplementedError


class Semaphore:
    def __init__(self, space: Space, name: str, limit: int, **options: Any) -> None:
        raise NotImplementedError
