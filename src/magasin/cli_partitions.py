"""`magasin partitions`: who consumes each partition of each consumer, and what waits in it
(embedded: the lanes of the local store; `--distributed --service S`: that service's
leases in PostgreSQL and queue depths in RabbitMQ)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from magasin.bootstrap import SERVICES, Runtime
from magasin.cli_run import run_command
from magasin.config import Settings
from magasin.messaging.bus import PartitionState

console = Console()


def partitions(
    distributed: Annotated[
        bool, typer.Option("--distributed", help="One service's PostgreSQL and RabbitMQ.")
    ] = False,
    service: Annotated[
        str | None, typer.Option("--service", help=f"With --distributed: {', '.join(SERVICES)}.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, one per partition.")] = False,
) -> None:
    """Each consumer's partitions: owner (the process consuming it) and depth (events
    waiting). The partition of a key is stable_hash(key) % MAGASIN_PARTITIONS. A consumer
    of the whole log (audit, eventstore) also has `log`: the batches the relays shipped it."""
    if distributed and service not in SERVICES:
        raise typer.BadParameter(f"--distributed needs --service, one of {', '.join(SERVICES)}")
    settings = Settings()
    runtime = (Runtime.distributed(settings, service or "") if distributed
               else Runtime.embedded(settings))

    async def main() -> list[PartitionState]:
        async with runtime.store:  # the bus is not started: it only reads
            return await runtime.bus.partition_states()

    states = run_command(main())
    if as_json:
        for s in states:
            typer.echo(json.dumps({"consumer": s.consumer, "partition": s.name,
                                   "owner": s.owner, "depth": s.depth}))
        return
    table = Table("consumer", "partition", "owner", "depth",
                  title=f"{len({s.consumer for s in states})} consumer(s)")
    for s in states:
        table.add_row(s.consumer, str(s.name), s.owner or "[yellow]none[/yellow]",
                      "?" if s.depth is None else str(s.depth))
    console.print(table)
