"""Leader election (being built; see the coordination issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskspace.space import Space


class Election:
    def __init__(self, space: Space, name: str, **options: Any) -> None:
        raise NotImplementedError
