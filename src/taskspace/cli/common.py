"""What every command shares: loading an app's Space, opening a space by URL,
and turning taskspace errors into one line on stderr with exit code 2 (4 for
SpaceLost: the space was wiped or replaced, as ``taskspace worker`` exits)."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from taskspace.errors import ConfigError, SpaceLost, TaskspaceError
from taskspace.space import Space

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2
EXIT_SPACE_LOST = 4  # = taskspace.worker.config.EXIT_SPACE_LOST (not imported: --help stays quick)

URL_HELP = "Backend URL (default: $TASKSPACE_URL, else sqlite:///.taskspace/space.db)."


def load_space(app: str, url: str | None = None) -> Space:
    """Import ``module:attribute`` and return its Space (calling it if it is a
    factory); with ``url``, the same tasks bound to that backend only."""
    module_name, _, attr = app.partition(":")
    attr = attr or "space"
    if not module_name:
        raise ConfigError(f"APP must look like module:attribute, got {app!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from exc
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(target, Space) and callable(target):
        target = target()
    if not isinstance(target, Space):
        raise ConfigError(f"{app!r} is a {type(target).__name__}, not a taskspace.Space")
    return target.with_url(url) if url else target


def existing_space(url: str | None) -> Space:
    """The space at ``url`` for commands that only inspect or manage it: one
    that does not exist is reported (SpaceNotFound), never created."""
    return Space(url, create=False)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def guard(fn: F) -> F:
    """Turn taskspace errors into one clear line on stderr and exit code 2;
    SpaceLost exits with EXIT_SPACE_LOST."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpaceLost as exc:
            click.secho(f"error: space lost: {one_line(exc)}", fg="red", err=True)
            sys.exit(EXIT_SPACE_LOST)
        except TaskspaceError as exc:
            click.secho(f"error: {one_line(exc)}", fg="red", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def echo_json(doc: Any) -> None:
    """Print ``doc`` as indented JSON."""
    import orjson

    click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
