"""`magasin cluster up` (the whole distributed deployment, one command) and `magasin gateway
render` (the gateway's configuration, e.g. deploy/gateway/ for compose)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from magasin import cluster
from magasin.config import Settings
from magasin.gateway import nginx, render
from magasin.shared.errors import MagasinError

cluster_app = typer.Typer(help="Run the distributed deployment on this machine.",
                          no_args_is_help=True)
gateway_app = typer.Typer(help="The API gateway (nginx) of distributed mode.",
                          no_args_is_help=True)
console = Console()


@cluster_app.command("up")
def up(
    scale: Annotated[str, typer.Option(
        help="Processes per service, e.g. transaction=2,inventory=2 (default: one each).")] = "",
    port: Annotated[int, typer.Option(help="Port of the gateway: the one URL.")] = 8080,
    host: Annotated[str, typer.Option(help="Address everything listens on.")] = "127.0.0.1",
    service_ports: Annotated[int | None, typer.Option(
        help="First port of the service processes (default: the gateway's + 1; 0 = any).")
    ] = None,
    demo_data: Annotated[bool, typer.Option(
        help="Seed demo stores, catalog and stock when the store service has none.")] = True,
) -> None:
    """Start PostgreSQL and RabbitMQ if needed, every service and the gateway; Ctrl-C stops
    them all."""
    settings = Settings()
    try:
        scales = cluster.parse_scale(scale)
        nginx.binary()
        cluster.ensure_servers(settings, lambda text: console.print(f"cluster: {text}"))
        created, limits = asyncio.run(cluster.ensure_database(settings.database_url))
        if created:
            console.print(f"cluster: created the database of {settings.database_url}")
        the_plan = cluster.plan(settings, host, port, scales, service_ports)
        warning = cluster.check_connections(the_plan, settings.pg_pool_max, limits)
        if warning is not None:
            console.print(f"[yellow]cluster: {warning}[/yellow]")
        code = cluster.up(settings, the_plan, demo_data, os.environ)
    except MagasinError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


@gateway_app.command("render")
def render_config(
    out: Annotated[Path, typer.Option(help="Directory to write the files into.")] = Path(
        "deploy/gateway"),
    target: Annotated[str, typer.Option(help="compose (deploy/gateway/) or local.")] = "compose",
    port: Annotated[int, typer.Option(help="local: the gateway's port.")] = 8080,
    upstream: Annotated[list[str] | None, typer.Option(
        help="local: SERVICE=HOST:PORT, once per process.")] = None,
) -> None:
    """Render the gateway's nginx configuration, its njs script and the docs pages."""
    settings = Settings()
    if target == "compose":
        config = render.compose(settings)
    elif target == "local":
        upstreams: dict[str, list[str]] = {}
        for item in upstream or []:
            service, _, address = item.partition("=")
            upstreams.setdefault(service, []).append(address)
        config = render.local(out, port, upstreams, settings)
    else:
        raise typer.BadParameter("--target is compose or local")
    path = render.write(config, out)
    console.print(f"wrote {path} and its files")
