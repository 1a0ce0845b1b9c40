"""The app the benchmark's worker processes load: one no-op task.

Workers are started as ``python -m taskspace worker bench.apps:make_space --url URL``;
``load_space`` calls the factory and points its tasks at ``URL``.
"""

from __future__ import annotations

from taskspace import Space

NOOP = "bench.noop"
DEFAULT_URL = "memory://"


def noop(x: int = 0) -> int:
    """Does nothing; returns its argument so a round trip carries a value both ways."""
    return x


def make_space(url: str | None = None) -> Space:
    """A Space with the no-op task registered; ``memory://`` unless given a URL
    (the CLI's ``--url`` replaces it)."""
    space = Space(url or DEFAULT_URL)
    space.task(name=NOOP)(noop)
    return space
