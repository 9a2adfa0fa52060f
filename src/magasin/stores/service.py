"""Builds the store service: its `store` consumer and its routes."""

from __future__ import annotations

from magasin.service import Service, ServiceContext
from magasin.stores import api
from magasin.stores.handlers import handlers


def build(ctx: ServiceContext) -> Service:
    return Service(name="store", consumers={"store": handlers()}, router=api.router(ctx))
