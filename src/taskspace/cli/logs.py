"""The ``taskspace logs``  command (being written)."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Add the command to ``main`` (none yet)."""
