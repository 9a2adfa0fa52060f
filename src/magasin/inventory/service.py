"""The inventory service as the composition root runs it: consumer, routes, expiry sweeper."""

from __future__ import annotations

from magasin.inventory.api import router
from magasin.inventory.commands import expiry_loop
from magasin.inventory.handlers import handlers
from magasin.inventory.projection import reservations_projection, stock_projection
from magasin.service import Service, ServiceContext


def build(ctx: ServiceContext) -> Service:
    settings = ctx.settings
    return Service(
        name="inventory",
        consumers={"inventory": handlers(settings.reservation_ttl_s)},
        router=router(ctx),
        loops=(expiry_loop(ctx.store, settings.reservation_sweep_s),),
        projections=(stock_projection(), reservations_projection()),
    )
