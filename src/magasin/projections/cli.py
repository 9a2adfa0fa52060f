"""`magasin projections list|rebuild`: lags, and a rebuild with a progress bar."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from magasin.config import Settings
from magasin.eventstore.store import EventStore
from magasin.projections.catalog import all_projections, service_of
from magasin.projections.lag import lags
from magasin.projections.rebuild import rebuild
from magasin.shared.errors import MagasinError

app = typer.Typer(help="Read models: list their lag, rebuild one.", no_args_is_help=True)
console = Console()

Distributed = Annotated[
    bool,
    typer.Option("--distributed", help="PostgreSQL (MAGASIN_DATABASE_URL), schema per service."),
]


def _store(distributed: bool, service: str) -> EventStore:
    from magasin.bootstrap import distributed_store, embedded_store

    settings = Settings()
    return distributed_store(settings, service) if distributed else embedded_store(settings)


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        asyncio.run(main())
    except MagasinError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@app.command("list")
def list_(distributed: Distributed = False) -> None:
    """Every projection with its checkpoint and lag."""

    async def main() -> None:
        table = Table("projection", "checkpoint", "head", "lag (events)", "lag (s)")
        by_service: dict[str, list[str]] = {}
        for name in all_projections():
            by_service.setdefault(service_of(name), []).append(name)
        catalog = all_projections()
        for service, names in by_service.items():
            async with _store(distributed, service) as store:
                for lag in await lags(store, [catalog[n] for n in names]):
                    table.add_row(lag.name, str(lag.checkpoint), str(lag.head),
                                  str(lag.lag_events), f"{lag.lag_seconds:.1f}")
        console.print(table)

    _run(main)


@app.command("rebuild")
def rebuild_(
    name: Annotated[str, typer.Argument(help="Projection name, see `projections list`.")],
    distributed: Distributed = False,
) -> None:
    """Rebuild a projection from zero into shadow collections, then swap it in atomically;
    live reads and updates go on meanwhile."""
    catalog = all_projections()
    if name not in catalog:
        console.print(f"[red]unknown projection {name!r}[/red]; one of: {', '.join(catalog)}")
        raise typer.Exit(2)

    async def main() -> None:
        async with _store(distributed, service_of(name)) as store:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
            with Progress(*columns, console=console) as bar:
                task = bar.add_task(f"rebuilding {name}", total=None)

                def moved(position: int, head: int) -> None:
                    bar.update(task, completed=position, total=head)

                report = await rebuild(store, catalog[name], progress=moved)
        console.print(
            f"rebuilt [bold]{name}[/bold]: {report.events} events, swapped in at position "
            f"{report.position} ({report.swap_attempts} swap attempt(s))"
        )

    _run(main)
