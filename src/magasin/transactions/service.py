"""Builds the transaction service: saga, catalog replica and notifier consumers, and routes."""

from __future__ import annotations

import httpx
from fastapi import APIRouter

from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.observability import sagas as saga_metrics
from magasin.service import Service, ServiceContext
from magasin.shared.messages import RecordedEvent
from magasin.transactions import api, sagas, sagas_api, stats, tags
from magasin.transactions.deadlines import Deadlines
from magasin.transactions.feed import StatusFeed
from magasin.transactions.handlers import catalog_handlers, notifier_handlers, saga_handlers
from magasin.transactions.orchestrator import handlers as orchestrator
from magasin.transactions.projection import projection


def folded(*registries: dict[str, Handler]) -> dict[str, Handler]:
    """One registry running, for each event type, the handlers of every registry that has
    one, in order, in the delivery's unit of work."""
    types = sorted({t for registry in registries for t in registry})

    def both(chain: tuple[Handler, ...]) -> Handler:
        async def handle(event: RecordedEvent, uow: UnitOfWork) -> None:
            for handler in chain:
                await handler(event, uow)

        return chain[0] if len(chain) == 1 else handle

    return {t: both(tuple(r[t] for r in registries if t in r)) for t in types}


def build(ctx: ServiceContext, client: httpx.AsyncClient | None = None) -> Service:
    deadlines = Deadlines.of(ctx.settings)
    http = client or httpx.AsyncClient(timeout=5.0)
    feed = StatusFeed()
    routes = APIRouter()
    routes.include_router(api.router(ctx, feed))
    routes.include_router(sagas_api.router(ctx))
    return Service(
        name="transaction",
        consumers={
            "transaction": saga_handlers(),
            "transaction.catalog": catalog_handlers(),
            "transaction.notifier": notifier_handlers(http),
            # The saga index and the saga metrics follow the same events: one delivery
            # (one inbox mark, one commit) runs both.
            sagas.CONSUMER: folded(sagas.index_handlers(deadlines), saga_metrics.handlers()),
            orchestrator.CONSUMER: orchestrator.orchestrator_handlers(),
        },
        # Meant for some sales only: the bus never delivers them the others' events.
        requires={orchestrator.CONSUMER: tags.ORCHESTRATED,
                  "transaction.notifier": tags.WEBHOOK},
        router=routes,
        loops=(sagas.deadline_loop(ctx.store, ctx.settings.deadline_sweep_s,
                                  deadlines=deadlines),
               stats.prune_loop(ctx.store)),
        projections=(projection(feed),),
        on_stop=(http.aclose,),
    )
