"""Builds the transaction service: saga, catalog replica and notifier consumers, and routes."""

from __future__ import annotations

import httpx

from magasin.service import Service, ServiceContext
from magasin.transactions import api
from magasin.transactions.feed import StatusFeed
from magasin.transactions.handlers import catalog_handlers, notifier_handlers, saga_handlers


def build(ctx: ServiceContext, client: httpx.AsyncClient | None = None) -> Service:
    http = client or httpx.AsyncClient(timeout=5.0)
    feed = StatusFeed()
    return Service(
        name="transaction",
        consumers={
            "transaction": saga_handlers(feed),
            "transaction.catalog": catalog_handlers(),
            "transaction.notifier": notifier_handlers(http),
        },
        router=api.router(ctx, feed),
        on_stop=(http.aclose,),
    )
