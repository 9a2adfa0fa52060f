"""Payment service assembly: its consumer, routes and default bank."""

from __future__ import annotations

from magasin.payments.api import router
from magasin.payments.breaker import CircuitBreaker
from magasin.payments.gateway import BankGateway, BankSimulator
from magasin.payments.handlers import handlers
from magasin.service import Service, ServiceContext

CONSUMER = "payment"


def default_gateway(ctx: ServiceContext) -> BankGateway:
    """The simulated bank from the settings, behind a circuit breaker (DESIGN.md §2, 6.6.2)."""
    s = ctx.settings
    bank = BankSimulator(
        latency_s=s.bank_latency_ms / 1000, decline_rate=s.bank_decline_rate, seed=s.bank_seed,
        ledger=ctx.store,
    )
    return CircuitBreaker(bank)


def build(ctx: ServiceContext, gateway: BankGateway | None = None) -> Service:
    bank = gateway if gateway is not None else default_gateway(ctx)
    return Service(name="payment", consumers={CONSUMER: handlers(bank)}, router=router(ctx))
