"""The ``taskspace services`` commands: list the service registry's instances
(every service, or one in detail) with their address, tags and health. They
never create a space: a URL naming none is reported with exit code 2."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from taskspace.cli.common import URL_HELP, echo_json, existing_space, guard

if TYPE_CHECKING:
    from taskspace.coordination.registry import Instance

HEALTH_STYLE = {"passing": "green", "warning": "yellow", "critical": "red"}
JSON_HELP = "Print JSON instead of a table."


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_instances(title: str, instances: list[Instance], now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("service", "instance", "address", "tags", "health", "for"):
        table.add_column(column, overflow="fold")
    for inst in instances:
        style = HEALTH_STYLE.get(inst.status, "")
        table.add_row(inst.service, inst.id, inst.address, ",".join(inst.tags),
                      f"[{style}]{inst.status}[/{style}]",
                      _age(max(0.0, now - inst.since)))  # fmt: skip
    Console().print(table)


def _print_detail(instances: list[Instance], now: float) -> None:
    """One block per instance: every field on its own line (no wide table to fold)."""
    for inst in instances:
        health = click.style(inst.status, fg=HEALTH_STYLE.get(inst.status))
        click.echo(f"{inst.id}  {health} for {_age(max(0.0, now - inst.since))}")
        checked = "never" if inst.checked is None else f"{_age(max(0.0, now - inst.checked))} ago"
        check = f"{inst.check} every {inst.interval:g} s" if inst.check else "none (TTL only)"
        lines = [("address", inst.address), ("tags", ", ".join(inst.tags) or "-"),
                 ("check", check), ("output", inst.output or "-"), ("last check", checked),
                 ("ttl", "none" if inst.ttl is None else f"{inst.ttl:g} s"),
                 ("registered", f"{_age(max(0.0, now - inst.registered))} ago")]  # fmt: skip
        lines += [(f"meta.{key}", str(value)) for key, value in sorted(inst.meta.items())]
        for name, value in lines:
            click.echo(f"  {name:<12} {value}")


@click.group(invoke_without_command=True)
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_context
@guard
def services(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """List every registered service instance with its address, tags and health.

    Health is passing, warning or critical: an instance without a check is
    passing while its process heartbeats; one with an HTTP/TCP check is
    probed by the elected maintainer (a running worker). Instances whose
    process stopped heartbeating are gone once their TTL runs out.

    \b
    taskspace services                 every service
    taskspace services show api        one service in detail
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"url": url, "json": as_json}
        return
    space = existing_space(url)
    found = space.registry.services()
    if as_json:
        echo_json({name: [i.to_dict() for i in insts] for name, insts in sorted(found.items())})
        return
    instances = [inst for name in sorted(found) for inst in found[name]]
    if not instances:
        click.echo(f"no services registered on {space.url}")
        return
    _print_instances(f"services on {space.url}", instances, space.store.clock.wall())


@services.command("show")
@click.argument("service")
@click.option("--url", default=None, help=URL_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--healthy", is_flag=True, help="Only passing instances (what discover returns).")
@click.option("--tag", "tags", multiple=True, help="Only instances with this tag (repeatable).")
@click.pass_context
@guard
def show(ctx: click.Context, service: str, url: str | None, as_json: bool, healthy: bool,
         tags: tuple[str, ...]) -> None:  # fmt: skip
    """Show the instances of SERVICE: address, tags, health, check output, meta."""
    parent: dict[str, Any] = ctx.obj or {}
    space = existing_space(url or parent.get("url"))
    instances = space.registry.discover(service, tags=tags, healthy_only=healthy)
    if as_json or parent.get("json"):
        echo_json([i.to_dict() for i in instances])
        return
    if not instances:
        click.echo(f"no {'passing ' if healthy else ''}instances of {service!r} on {space.url}")
        return
    _print_detail(instances, space.store.clock.wall())


def register(main: click.Group) -> None:
    """Add this module's commands to ``main``."""
    main.add_command(services)
