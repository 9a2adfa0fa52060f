"""Composition root: the only place that picks adapters for a runtime mode and wires them."""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magasin.config import Settings
from magasin.eventstore.repository import configure_snapshots
from magasin.eventstore.sqlite import SqliteEventStore, Synchronous
from magasin.eventstore.store import EventStore
from magasin.eventstore.window import LogWindow
from magasin.messaging.bus import EventBus, RetryPolicy
from magasin.messaging.inprocess import InProcessBus
from magasin.observability.sampler import sample_forever
from magasin.service import Service, ServiceContext
from magasin.shared.events import CONSUMED, SCHEMAS

if TYPE_CHECKING:
    from magasin.messaging.outbox import OutboxRelay

log = logging.getLogger("magasin.bootstrap")

SERVICES = ("transaction", "payment", "inventory", "store", "audit", "eventstore")


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.retry_attempts,
        initial_delay=settings.retry_initial_delay,
        multiplier=settings.retry_multiplier,
    )


def embedded_store(settings: Settings) -> EventStore:
    """Embedded mode: one SQLite file; its log is also the bus, so no outbox."""
    sync: Synchronous = settings.sqlite_synchronous  # type: ignore[assignment]
    return SqliteEventStore(settings.sqlite_path, synchronous=sync)


WITHOUT_OUTBOX = frozenset({"eventstore", "audit"})
"""The event store service archives the events of the others and the audit keeps its chain
in documents: they publish nothing, so no outbox (and no relay reading one)."""


def distributed_store(settings: Settings, service: str | None = None) -> EventStore:
    """Distributed mode: PostgreSQL, one schema per service (each owns its tables), with an
    outbox that the service's relay publishes to RabbitMQ."""
    from magasin.eventstore.postgres import PostgresEventStore

    schema = settings.database_schema or (f"magasin_{service}" if service else "public")
    return PostgresEventStore(settings.database_url, schema=schema,
                              outbox=service not in WITHOUT_OUTBOX,
                              pool_max=settings.pg_pool_max,
                              cluster_processes=settings.pg_cluster_processes)


_BUILDERS = {
    "transaction": "magasin.transactions.service",
    "payment": "magasin.payments.service",
    "inventory": "magasin.inventory.service",
    "store": "magasin.stores.service",
    "audit": "magasin.audit.service",
    "eventstore": "magasin.eventstore_service.service",
}
"""Where each service's `build(ctx) -> Service` lives; imported only when that service runs."""


def build_service(name: str, ctx: ServiceContext) -> Service:
    if name not in _BUILDERS:
        raise ValueError(f"unknown service {name!r}; choose among {', '.join(SERVICES)}")
    build: Callable[[ServiceContext], Service] = importlib.import_module(_BUILDERS[name]).build
    return build(ctx)


class Runtime:
    """The store, bus, relay and services of one process, started and stopped together."""

    def __init__(
        self,
        mode: str,
        settings: Settings,
        store: EventStore,
        bus: EventBus,
        services: list[Service],
        relay: OutboxRelay | None = None,
    ) -> None:
        self.mode = mode
        self.settings = settings
        self.store = store
        self.bus = bus
        self.services = services
        self.relay = relay
        self._loops: list[asyncio.Task[None]] = []
        self.starting = False
        """True while the process is up but not ready (its start-up work, the demo data
        say, not yet readable): /health answers 503 `starting`."""
        self.last_sample: dict[str, Any] = {}
        """What the metrics sampler last read (outbox backlog, pending dead letters by
        consumer, projection lags, when), shown by /health."""
        configure_snapshots(store, settings.snapshot_every)
        for service in services:
            for consumer, handlers in service.consumers.items():
                bus.subscribe(consumer, handlers, service.retry.get(consumer),
                              concurrency=service.concurrency.get(consumer),
                              requires=service.requires.get(consumer),
                              whole_log=consumer in service.whole_log)
        from magasin.projections import ProjectionRunner
        from magasin.projections.inline import install as install_inline

        # Projections tail this process's own log in both modes (in distributed mode each
        # service's PostgreSQL schema holds its own events) through one shared window of
        # the log (embedded, the bus's), so each event is read once, not once per projection.
        window = bus.window if isinstance(bus, InProcessBus) else LogWindow(store, 2000)
        projections = [p for s in services for p in s.projections]
        # A projection that is not inline gathers the events of the sales that come while it
        # lingers after a commit into its next commit: one commit per linger under load,
        # rather than one per event at moderate rates. Distributed, all of them (a commit is
        # a round trip and a magasin_commit call); embedded, only the background ones (the
        # audit chain: a client reads the others right after a sale, in the same process).
        self.projections = ProjectionRunner(
            store, projections, window=window, linger=settings.projection_linger_s,
            foreground_linger=mode == "distributed")
        if relay is not None:  # the relay reads what it publishes through the same window
            relay.read = window.read
        # The inline ones (the sales, the payments, the reservations, the orders) are applied
        # in the units of work that append their events: their documents commit with them,
        # and the runner only passes those events. Embedded at 50 sales/s, they and the
        # audit's linger take a sale from 20-21 units of work to 9.7.
        install_inline(store, projections)

    @classmethod
    def embedded(cls, settings: Settings, services: tuple[str, ...] = SERVICES) -> Runtime:
        store = embedded_store(settings)
        bus = InProcessBus(store, SCHEMAS, retry=retry_policy(settings), poll_interval=0.5)
        ctx = ServiceContext(store, settings)
        return cls("embedded", settings, store, bus, [build_service(n, ctx) for n in services])

    @classmethod
    def distributed(cls, settings: Settings, service: str) -> Runtime:
        from magasin.messaging.outbox import OutboxRelay
        from magasin.messaging.rabbitmq import RabbitMQBus

        store = distributed_store(settings, service)
        bus = RabbitMQBus(
            settings.amqp_url, store=store, schemas=SCHEMAS,
            namespace=settings.amqp_namespace, retry=retry_policy(settings),
        )
        # A store without outbox (the event store service's archive) has nothing to relay:
        # a relay there would only claim an empty outbox after every commit.
        # Only the messages some consumer handles go to the broker; the rest reach the
        # whole log's consumers in the relay's shipped batches (shared.events.CONSUMED).
        relay = (OutboxRelay(store, bus, batch_size=settings.outbox_batch_size,
                             ship_delay=settings.archive_linger_s,
                             publishes=None if settings.publish_all else CONSUMED)
                 if store.outbox else None)
        ctx = ServiceContext(store, settings, mode="distributed")
        return cls("distributed", settings, store, bus, [build_service(service, ctx)], relay)

    async def start(self) -> None:
        await self.store.open()
        await self.projections.start()
        await self.bus.start()
        if self.relay is not None:
            await self.relay.start()
        for service in self.services:
            for loop in service.loops:
                self._loops.append(asyncio.create_task(loop(), name=f"{service.name}-loop"))
        self._loops.append(asyncio.create_task(
            sample_forever(self, self.settings.metrics_sample_s), name="metrics-sampler"
        ))
        log.info("magasin %s runtime started: %s", self.mode,
                 ", ".join(s.name for s in self.services))

    async def settle(self, timeout: float) -> bool:
        """Wait until the read models include every event stored so far (False if they did
        not within `timeout` seconds)."""
        return await self.projections.reach(await self.store.last_position(), timeout)

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        if self.relay is not None:
            await self.relay.stop()
        await self.bus.stop()
        await self.projections.stop()
        for service in self.services:
            for close in service.on_stop:
                await close()
        await self.store.close()


def api_keys(settings: Settings, mode: str) -> frozenset[str]:
    """Configured keys; in embedded mode without any, one generated and kept in data_dir."""
    keys = frozenset(k.strip() for k in settings.api_keys.split(",") if k.strip())
    if keys:
        return keys
    if mode != "embedded":
        raise SystemExit("MAGASIN_API_KEYS must name at least one API key in distributed mode")
    path = Path(settings.data_dir) / "api-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return frozenset({path.read_text().strip()})
