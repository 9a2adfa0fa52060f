"""Builds the store service: its `store` consumer and its routes."""

from __future__ import annotations

from magasin.service import Service, ServiceContext
from magasin.stores import api
from magasin.stores.handlers import handlers
from magasin.stores.projection import orders_projection, products_projection, stores_projection


def build(ctx: ServiceContext) -> Service:
    return Service(
        name="store", consumers={"store": handlers()}, router=api.router(ctx),
        projections=(stores_projection(), products_projection(), orders_projection()),
    )
