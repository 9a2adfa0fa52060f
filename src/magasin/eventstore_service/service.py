"""Builds the event store service: its routes, and in distributed mode its archive consumer."""

from __future__ import annotations

from magasin.eventstore_service import api, archive
from magasin.service import Service, ServiceContext


def build(ctx: ServiceContext) -> Service:
    """Embedded, every service shares one log and this one reads it directly; distributed,
    it keeps a copy of every event published, in its own store, and reads that."""
    consumers = {archive.CONSUMER: archive.handlers()} if ctx.mode == "distributed" else {}
    # Off the sales' path: it gets the events in the batches the relays ship.
    return Service(name="eventstore", consumers=consumers, router=api.router(ctx.store),
                   whole_log=frozenset({archive.CONSUMER}))
