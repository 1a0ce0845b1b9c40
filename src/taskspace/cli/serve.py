"""The ``taskspace serve`` command: the HTTP API, the dashboard and ``/metrics``
in one uvicorn process."""

from __future__ import annotations

import os
import threading
from types import FrameType
from typing import Any

import click

from taskspace.cli.common import URL_HELP, guard, load_space
from taskspace.errors import ConfigError, MissingDependency

DEFAULT_PORT = 8750


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, telling the app's event streams to end as soon as a
        signal asks it to stop (uvicorn runs the app's lifespan shutdown only
        after every connection closed, so an open stream would otherwise hold
        the shutdown for the whole grace period)."""

        def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
            super().__init__(config)
            self.stopping = stopping

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.stopping.set()
            super().handle_exit(sig, frame)

    return Server


def _make_server(config: Any, stopping: threading.Event) -> Any:
    return _server_class()(config, stopping)


def register(main: click.Group) -> None:
    """Add the ``serve`` command to ``main``."""
    main.add_command(serve)


@click.command()
@click.argument("app", required=False)
@click.option("--url", default=None, help=URL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; any non-loopback address needs a token.")  # fmt: skip
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-env", default="TASKSPACE_API_TOKEN", show_default=True,
              help="Environment variable holding the API token (bearer or cookie).")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow this origin (repeatable); CORS is off by default.")  # fmt: skip
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Also serve requests whose Host header names this host (repeatable);"
                   " by default only the bound address and 127.0.0.1, localhost, [::1]"
                   " (DNS rebinding guard of a server without a token).")  # fmt: skip
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(("debug", "info", "warning", "error")))  # fmt: skip
@guard
def serve(app: str | None, url: str | None, host: str, port: int, token_env: str,
          cors_origins: tuple[str, ...], allowed_hosts: tuple[str, ...],
          log_level: str) -> None:  # fmt: skip
    """Serve the HTTP API (/api, OpenAPI at /docs), the dashboard (/) and
    Prometheus metrics (/metrics) for APP (module:attribute naming a Space),
    or for the space at --url alone.

    \b
    Submitting by name needs the task registered: give APP (as to `taskspace
    worker`). With --url alone every other endpoint works, and a submit
    answers 404 unknown_task. A token is read from $TASKSPACE_API_TOKEN (or
    --token-env); without one the server binds only to loopback addresses.
    """
    from taskspace.api.auth import check_bind, check_token

    token = check_token(os.environ.get(token_env) or None)
    check_bind(host, token)
    try:
        import uvicorn

        from taskspace.api.app import create_app
        from taskspace.api.errors import redact_url
    except ImportError as exc:
        raise MissingDependency(
            f"taskspace serve needs the api extra: pip install 'taskspace[api]' ({exc})"
        ) from exc
    if app:
        space = load_space(app, url)
    else:
        from taskspace.space import Space

        space = Space(url)
    application = create_app(
        space, token=token, host=host, cors_origins=cors_origins, allowed_hosts=allowed_hosts
    )
    mode = "token required" if token else "no token: loopback only"
    shown = redact_url(space.url)
    click.echo(f"taskspace serve: {shown} on http://{host}:{port} ({mode})", err=True)
    try:
        config = uvicorn.Config(application, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=5)  # fmt: skip
        _make_server(config, application.state.stopping).run()
    except OSError as exc:
        raise ConfigError(f"cannot serve on {host}:{port}: {exc}") from exc
    finally:
        space.close()
