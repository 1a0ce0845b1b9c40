"""Service registry (being built; see the coordination issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskspace.space import Space


class Registry:
    def __init__(self, space: Space) -> None:
        raise NotImplementedError


def maintain_registry(space: Space) -> None:
    """The maintainer's registry step: health checks, expiry, deregistration."""
