"""`magasin dead-letters list|show|requeue|archive`: operate the dead letters of the
embedded store, or (`--distributed --service S`) of one service's PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from magasin.api.deadletters import StatusFilter, status_filter
from magasin.bootstrap import SERVICES, distributed_store, embedded_store
from magasin.cli_run import run_command
from magasin.config import Settings
from magasin.messaging.bus import DeadLetter, EventBus
from magasin.messaging.deadletters import reason_kind
from magasin.shared.events import SCHEMAS

app = typer.Typer(
    help="List, read, requeue (after a fix) and archive dead letters.", no_args_is_help=True
)
console = Console()

Distributed = Annotated[
    bool,
    typer.Option("--distributed", help="One service's PostgreSQL and RabbitMQ (MAGASIN_*)."),
]
ServiceName = Annotated[
    str | None,
    typer.Option(
        "--service", help=f"With --distributed: whose dead letters ({', '.join(SERVICES)})."
    ),
]


@asynccontextmanager
async def _bus(distributed: bool, service: str | None) -> AsyncIterator[EventBus]:
    """A bus that is not started: enough to read and write dead letters, and to requeue
    (the running consumers pick requeued messages up)."""
    settings = Settings()
    bus: EventBus
    if distributed:
        from magasin.messaging.rabbitmq import RabbitMQBus

        store = distributed_store(settings, service)
        bus = RabbitMQBus(
            settings.amqp_url, store=store, schemas=SCHEMAS, namespace=settings.amqp_namespace
        )
    else:
        from magasin.messaging.inprocess import InProcessBus

        store = embedded_store(settings)
        bus = InProcessBus(store, SCHEMAS)
    async with store:
        yield bus


def _run(distributed: bool, service: str | None,
         work: Callable[[EventBus], Awaitable[None]]) -> None:
    if distributed and service not in SERVICES:
        raise typer.BadParameter(f"--distributed needs --service, one of {', '.join(SERVICES)}")

    async def main() -> None:
        async with _bus(distributed, service) as bus:
            await work(bus)

    run_command(main())


def _table(letters: list[DeadLetter]) -> Table:
    table = Table("id", "consumer", "type", "attempts", "dead-lettered at", "status", "reason",
                  title=f"{len(letters)} dead letter(s)")
    for letter in letters:
        table.add_row(
            letter.id, letter.consumer, letter.type or "<undecodable>", str(letter.attempts),
            letter.dead_lettered_at.isoformat(timespec="seconds"), str(letter.status),
            letter.reason[:100],
        )
    return table


@app.command("list")
def list_letters(
    consumer: Annotated[str | None, typer.Option(help="Only this consumer's.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only this event type.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only reasons containing this.")] = None,
    archived: Annotated[bool, typer.Option("--archived", help="The archived ones.")] = False,
    status: Annotated[
        str | None, typer.Option(help="pending, requeued, archived or all; wins over --archived.")
    ] = None,
    distributed: Distributed = False,
    service: ServiceName = None,
) -> None:
    """Dead letters, oldest first; by default those waiting for a decision."""
    if status not in (None, "pending", "requeued", "archived", "all"):
        raise typer.BadParameter("status is one of pending, requeued, archived, all")
    chosen: StatusFilter | None = status  # type: ignore[assignment]

    async def work(bus: EventBus) -> None:
        letters = await bus.dead_letters(
            consumer, type=type_, reason=reason, status=status_filter(archived, chosen)
        )
        console.print(_table(letters))

    _run(distributed, service, work)


@app.command()
def show(
    letter_id: Annotated[str, typer.Argument(metavar="ID", help="Id of the dead letter.")],
    distributed: Distributed = False,
    service: ServiceName = None,
) -> None:
    """One dead letter: why, who, how often, and the message."""

    async def work(bus: EventBus) -> None:
        letter = await bus.dead_letter(letter_id)
        table = Table(show_header=False, title=f"dead letter {letter.id}")
        event = letter.event
        for name, value in (
            ("consumer", letter.consumer), ("status", str(letter.status)),
            ("type", letter.type or "<undecodable>"),
            ("event id", event.event_id if event else "-"),
            ("correlation id", (event.correlation_id if event else None) or "-"),
            ("routing key", letter.routing_key), ("attempts", str(letter.attempts)),
            ("dead-lettered at", letter.dead_lettered_at.isoformat()),
            ("updated at", letter.updated_at.isoformat() if letter.updated_at else "-"),
            ("reason kind", reason_kind(letter.reason)), ("reason", letter.reason),
        ):
            table.add_row(name, value)
        console.print(table)
        if event is not None:
            console.print_json(json.dumps(dict(event.payload)))
        else:
            console.print(letter.body)

    _run(distributed, service, work)


@app.command()
def requeue(
    letter_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="Id of the dead letter.")
    ] = None,
    consumer: Annotated[
        str | None, typer.Option(help="Instead of one id: every pending letter of a consumer.")
    ] = None,
    distributed: Distributed = False,
    service: ServiceName = None,
) -> None:
    """Send a dead letter (or a consumer's all) back to its consumer, after a fix."""
    if (letter_id is None) == (consumer is None):
        raise typer.BadParameter("give either a dead letter ID or --consumer")

    async def work(bus: EventBus) -> None:
        if letter_id is not None:
            letter = await bus.requeue_dead_letter(letter_id)
            console.print(f"requeued {letter.id} to consumer {letter.consumer}")
            return
        assert consumer is not None
        done = await bus.requeue_dead_letters(consumer)
        console.print(f"requeued {len(done)} dead letter(s) to consumer {consumer}")
        for letter in done:
            console.print(f"  {letter.id}")

    _run(distributed, service, work)


@app.command()
def archive(
    letter_id: Annotated[str, typer.Argument(metavar="ID", help="Id of the dead letter.")],
    distributed: Distributed = False,
    service: ServiceName = None,
) -> None:
    """Keep a dead letter as a permanent failure, out of the default listing."""

    async def work(bus: EventBus) -> None:
        letter = await bus.archive_dead_letter(letter_id)
        console.print(f"archived {letter.id}")

    _run(distributed, service, work)
