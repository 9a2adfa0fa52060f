"""Builds the transaction service: saga, catalog replica, notifier and orchestrator
consumers, the deadline and pruning loops, and routes."""

from __future__ import annotations

import httpx

from magasin.service import Service, ServiceContext
from magasin.transactions import api, sagas, sagas_api, stats, tags
from magasin.transactions.deadlines import Deadlines
from magasin.transactions.feed import StatusFeed
from magasin.transactions.handlers import (
    catalog_handlers,
    notifier_handlers,
    saga_handlers,
    step_handlers,
)
from magasin.transactions.orchestrator import handlers as orchestrator
from magasin.transactions.projection import projection

STEP_CONSUMER = "transaction.steps"
"""Consumer of an orchestrated sale's intermediate steps (see `step_handlers`)."""


def build(ctx: ServiceContext, client: httpx.AsyncClient | None = None) -> Service:
    deadlines = Deadlines.of(ctx.settings)
    http = client or httpx.AsyncClient(timeout=5.0)
    feed = StatusFeed()
    # The sales' router holds the sagas' rather than both hanging under a third: FastAPI
    # matches each level of included routers on every request, and a sale's two requests
    # are the hottest the process serves.
    routes = api.router(ctx, feed)
    routes.include_router(sagas_api.router(ctx))
    return Service(
        name="transaction",
        consumers={
            # Each saga step saves the sale with its saga index, deadline and metrics (one
            # unit of work): the service hears none of its own events back for them.
            "transaction": saga_handlers(deadlines),
            # An orchestrated sale's intermediate steps (a choreographed one learns them
            # from OrderFulfilled: the service hears one event of its happy path).
            STEP_CONSUMER: step_handlers(deadlines),
            "transaction.catalog": catalog_handlers(),
            "transaction.notifier": notifier_handlers(http),
            orchestrator.CONSUMER: orchestrator.orchestrator_handlers(),
        },
        # Meant for some sales only: the bus never delivers them the others' events.
        requires={orchestrator.CONSUMER: tags.ORCHESTRATED, STEP_CONSUMER: tags.ORCHESTRATED,
                  "transaction.notifier": tags.WEBHOOK},
        router=routes,
        loops=(sagas.deadline_loop(ctx.store, ctx.settings.deadline_sweep_s,
                                  deadlines=deadlines),
               stats.prune_loop(ctx.store)),
        projections=(projection(feed),),
        on_stop=(http.aclose,),
    )
