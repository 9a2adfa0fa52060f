"""The `magasin` command line: run the embedded runtime, inspect and write the event log."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from magasin import __version__
from magasin.bootstrap import distributed_store, embedded_store
from magasin.config import Settings
from magasin.eventstore.store import ANY, EventStore
from magasin.shared.errors import MagasinError
from magasin.shared.messages import NewEvent, RecordedEvent

app = typer.Typer(help="magasin: event-driven backend for a chain of retail stores.",
                  no_args_is_help=True)
events_app = typer.Typer(help="Read and write the event log.", no_args_is_help=True)
app.add_typer(events_app, name="events")
console = Console()

Distributed = Annotated[
    bool, typer.Option("--distributed", help="Use PostgreSQL (MAGASIN_DATABASE_URL).")
]


def _store(distributed: bool) -> EventStore:
    settings = Settings()
    return distributed_store(settings) if distributed else embedded_store(settings)


def _run(coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except MagasinError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        console.print("stopped")


def _row(event: RecordedEvent) -> tuple[str, ...]:
    return (
        str(event.global_position),
        event.occurred_at.isoformat(timespec="milliseconds"),
        f"{event.stream_id}@{event.stream_version}",
        event.type,
        json.dumps(dict(event.payload))[:80],
    )


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


@app.command()
def up(
    follow: Annotated[bool, typer.Option(help="Keep printing new events.")] = True,
) -> None:
    """Run embedded mode: open the SQLite event store and show its log as it grows."""

    async def main() -> None:
        settings = Settings()
        async with embedded_store(settings) as store:
            console.print(
                f"[bold]magasin {__version__}[/bold] embedded mode, event store "
                f"[cyan]{settings.sqlite_path.resolve()}[/cyan] "
                f"({await store.last_position()} events). Ctrl-C stops."
            )
            await _tail(store, after=0, follow=follow)

    _run(main())


async def _tail(store: EventStore, after: int, follow: bool) -> None:
    while True:
        page = await store.read_all(after=after, limit=500)
        for event in page:
            console.print("  ".join(_row(event)))
        if page:
            after = page[-1].global_position
        elif not follow:
            return
        else:
            await store.wait_for_events(after, timeout=1.0)


@events_app.command("append")
def append(
    stream: Annotated[str, typer.Argument(help="Stream id, `<aggregate>-<id>`.")],
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="Event type.")],
    payload: Annotated[str, typer.Argument(help="Payload as a JSON object.")] = "{}",
    expected_version: Annotated[
        int | None, typer.Option(help="Fail unless the stream is at this version.")
    ] = None,
    distributed: Distributed = False,
) -> None:
    """Append one event to a stream."""
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"payload is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise typer.BadParameter("payload must be a JSON object")

    async def main() -> None:
        async with _store(distributed) as store:
            expected = ANY if expected_version is None else expected_version
            (event,) = await store.append(stream, [NewEvent(type_, body)], expected)
            console.print(f"appended {event.event_id} at position {event.global_position}")

    _run(main())


@events_app.command("read")
def read(
    stream: Annotated[str | None, typer.Option(help="Only this stream.")] = None,
    after: Annotated[int, typer.Option(help="Start after this global position.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="At most this many events.")] = 100,
    follow: Annotated[bool, typer.Option(help="Keep printing new events.")] = False,
    distributed: Distributed = False,
) -> None:
    """Print events of the log, or of one stream."""

    async def main() -> None:
        async with _store(distributed) as store:
            if stream is not None:
                events = await store.read_stream(stream)
            elif follow:
                await _tail(store, after, follow=True)
                return
            else:
                events = await store.read_all(after=after, limit=limit)
            table = Table("position", "occurred at", "stream@version", "type", "payload")
            for event in events[:limit]:
                table.add_row(*_row(event))
            console.print(table)

    _run(main())
