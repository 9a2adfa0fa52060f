"""The `magasin` command line: run embedded or one distributed service, drive a demo,
inspect and write the event log."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from magasin import __version__
from magasin.bootstrap import SERVICES, Runtime, api_keys, distributed_store, embedded_store
from magasin.cli_cluster import cluster_app, gateway_app
from magasin.cli_deadletters import app as dead_letters_app
from magasin.cli_partitions import partitions as partitions_command
from magasin.cli_payments import app as payments_app
from magasin.config import Settings
from magasin.console import routes as console_routes
from magasin.demo import drive, seed_if_empty
from magasin.eventstore.store import ANY, EventStore
from magasin.observability import logging as logs
from magasin.observability import metrics, tracing
from magasin.projections.cli import app as projections_app
from magasin.shared.errors import MagasinError
from magasin.shared.messages import NewEvent, RecordedEvent

app = typer.Typer(help="magasin: event-driven backend for a chain of retail stores.",
                  no_args_is_help=True)
events_app = typer.Typer(help="Read and write the event log.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(projections_app, name="projections")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(cluster_app, name="cluster")
app.add_typer(gateway_app, name="gateway")
app.add_typer(payments_app, name="payments")
app.command("partitions")(partitions_command)
console = Console()
STARTUP_SETTLE_S = 30.0
"""How long `magasin up` waits for its read models to include what is stored before it
reports ready."""

Distributed = Annotated[
    bool, typer.Option("--distributed", help="Use PostgreSQL (MAGASIN_DATABASE_URL).")
]


def _store(distributed: bool) -> EventStore:
    settings = Settings()
    return distributed_store(settings) if distributed else embedded_store(settings)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it is with the default dependencies): the event
    loop's own overhead is a large share of a saga's cost in this process."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(coro)
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
    host: Annotated[str | None, typer.Option(help="Listen address (MAGASIN_HTTP_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MAGASIN_HTTP_PORT).")] = None,
    demo_data: Annotated[
        bool, typer.Option(help="Seed demo stores, catalog and stock on first start.")
    ] = True,
) -> None:
    """Run embedded mode: every service in one process, SQLite and the in-process bus."""
    settings = _with_http(Settings(), host, port)
    runtime = Runtime.embedded(settings)
    keys = api_keys(settings, runtime.mode)

    async def ready() -> None:
        if demo_data and await seed_if_empty(runtime.store, settings.currency):
            console.print("seeded demo stores, catalog and stock")
        # Ready once what is stored (the demo data, or the tail a restart has to project)
        # can be read: a client that saw /health answer 200 lists the demo stores.
        if not await runtime.settle(STARTUP_SETTLE_S):
            console.print(f"[yellow]read models still catching up after {STARTUP_SETTLE_S:g} s"
                          "; serving anyway[/yellow]")
        base = f"http://{settings.http_host}:{settings.http_port}"
        console.print(
            f"[bold]magasin {__version__}[/bold] embedded: [cyan]{base}[/cyan] "
            f"(API docs at /docs), data in {settings.sqlite_path.resolve()}\n"
            f"console: [bold cyan]{base}/console/[/bold cyan]  (sign in with the API key)\n"
            f"API key: [bold]{sorted(keys)[0]}[/bold]  (header X-API-Key)"
        )
        if missing := console_routes.missing_modules():
            console.print(f"[yellow]the console's libraries are missing ({', '.join(missing)})"
                          ": run `make install`[/yellow]")

    _serve(runtime, keys, settings, ready)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    host: Annotated[str | None, typer.Option(help="Listen address (MAGASIN_HTTP_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (MAGASIN_HTTP_PORT).")] = None,
) -> None:
    """Run one service in distributed mode (PostgreSQL + RabbitMQ)."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose among {SERVICES}")
    settings = _with_http(Settings(), host, port)
    runtime = Runtime.distributed(settings, service)
    keys = api_keys(settings, runtime.mode)

    async def ready() -> None:
        console.print(f"magasin {service} service on http://{settings.http_host}:"
                      f"{settings.http_port}")

    _serve(runtime, keys, settings, ready)


@app.command()
def demo(
    url: Annotated[str, typer.Option(help="Base URL of a running magasin.")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None, typer.Option(help="API key; default: the embedded one in MAGASIN_DATA_DIR.")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="How many sales to send.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, help="Sales in flight at once.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the random sales.")] = 1,
    timeout: Annotated[float, typer.Option(
        min=0.01, help="Seconds to wait for each answer before counting the call failed.")
    ] = 30.0,
    follow_timeout: Annotated[float, typer.Option(
        min=0.01, help="Seconds to wait for each sale's final state.")] = 120.0,
) -> None:
    """Drive realistic sales against a running magasin and show sagas end live. A failed
    call is counted in the table and the run goes on; the exit status is 1 if any failed."""
    key = api_key or sorted(api_keys(Settings(), "embedded"))[0]
    started = time.perf_counter()
    stats = asyncio.run(drive(url, key, count, concurrency, seed, console, timeout,
                              follow_timeout))
    elapsed = time.perf_counter() - started
    console.print(f"{sum(stats.outcomes.values())} sagas ended in {elapsed:.1f} s "
                  f"({sum(stats.outcomes.values()) / elapsed:.0f}/s)")
    if stats.failed:
        console.print(f"[red]{sum(stats.failed_calls.values())} calls failed[/red]")
        raise typer.Exit(1)


def _with_http(settings: Settings, host: str | None, port: int | None) -> Settings:
    update: dict[str, object] = {}
    if host is not None:
        update["http_host"] = host
    if port is not None:
        update["http_port"] = port
    return settings.model_copy(update=update)


GC_THRESHOLDS = (1_000, 10, 100)
"""The cyclic collector's thresholds once serving (CPython's default: 700, 10, 10).

A collection walks every object of the generations it collects, and a serving process's
young objects mostly live on a while (the log window's events, the cached aggregates, the
sales in flight), so the size of the young generations sets the length of a pause, during
which every task waits. Embedded, 110 sales/s for 20 s (issue 11, 2026-12-07): with the
young generation at 10,000 (the issue's first tuning), young collections took up to 15 ms
and middle ones up to 59 ms; at 1,000, every young one but one under 2.5 ms and every middle
one under 10 ms, for about the same collector time in all (10,000: 0.29 s; 1,500: 0.31 s;
700: 0.38 s over those 20 s). The oldest generation is the whole heap (the aggregate cache
alone holds up to 20,000 states): it is collected ten times more rarely than by default.
`magasin_gc_pause_seconds` shows the pauses."""


def _tune_collector() -> None:
    """Once the server is up: freeze what start-up made (modules, app, services: the cyclic
    collector never walks it again), set GC_THRESHOLDS and time every collection. Not in
    Runtime.start: a test process starts many runtimes, and frozen objects are never
    collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    metrics.time_collections()


def _serve(runtime: Runtime, keys: frozenset[str], settings: Settings,
           ready: Callable[[], Awaitable[None]]) -> None:
    import uvicorn

    from magasin.api.app import create_app

    # Embedded: one process named magasin, logs for a person; distributed: one service per
    # process, JSON lines for a log collector (MAGASIN_LOG_FORMAT overrides). OTEL_* turn
    # tracing on.
    embedded = runtime.mode == "embedded"
    service = "magasin" if embedded else runtime.services[0].name
    logs.configure(service, "console" if embedded else "json")
    tracing.configure(service)
    app = create_app(runtime, keys)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning",
        access_log=False, log_config=None,
    ))

    async def main() -> None:
        runtime.starting = True  # /health answers 503 until ready() has run
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        lag = None
        if server.started:
            _tune_collector()
            await ready()
            runtime.starting = False
            lag = asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")
        try:
            await serving
        finally:
            if lag is not None:
                lag.cancel()

    try:
        _run(main())
    finally:
        tracing.shutdown()  # flush the spans still buffered


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
