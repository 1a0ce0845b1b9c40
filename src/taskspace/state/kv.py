"""The KV blackboard facade (being built; see the coordination issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskspace.space import Space


class KV:
    def __init__(self, space: Space) -> None:
        raise NotImplementedError
