"""Payment service assembly: its consumer, routes and default bank."""

from __future__ import annotations

from magasin.config import Settings
from magasin.eventstore.store import EventStore
from magasin.messaging.bus import RetryPolicy
from magasin.observability import metrics
from magasin.payments.aborts import ChargeDeadline
from magasin.payments.api import router
from magasin.payments.breaker import BreakerPolicy, CircuitBreaker
from magasin.payments.gateway import BankGateway, BankSimulator
from magasin.payments.handlers import handlers
from magasin.payments.projection import projection
from magasin.payments.reconcile import reconcile_loop
from magasin.payments.traced import TracedBank
from magasin.service import Service, ServiceContext

CONSUMER = "payment"


def default_gateway(ctx: ServiceContext) -> BankGateway:
    """The simulated bank from the settings, behind a circuit breaker (DESIGN.md §2, 6.6.2)."""
    s = ctx.settings
    breaker = CircuitBreaker(bank_simulator(ctx.store, s), breaker_policy(s))
    metrics.watch_breaker("bank", lambda: breaker.state.value)
    return breaker


def bank_simulator(store: EventStore, s: Settings) -> BankSimulator:
    """The simulated bank of these settings, keeping its books in `store` (the payment
    service's: every payment process, and the reconciliation CLI, share one bank)."""
    return BankSimulator(
        latency_s=s.bank_latency_ms / 1000, decline_rate=s.bank_decline_rate, seed=s.bank_seed,
        ledger=store, answer_latency_s=s.bank_answer_latency_ms / 1000,
    )


def breaker_policy(s: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        failure_rate=s.breaker_failure_rate, window=s.breaker_window,
        min_calls=min(s.breaker_min_calls, s.breaker_window), open_s=s.breaker_open_s,
        half_open_calls=s.breaker_half_open_calls,
    )


def retry_policy(s: Settings) -> RetryPolicy:
    """The payment consumer's: while the bank is unreachable (its breaker open) a charge is
    retried, never declined, until past the payment step's deadline, which then ends the
    sale with PaymentFailed(bank_unavailable); delays stay short enough (a third of the
    breaker's open time) to use the bank soon after it is back."""
    return RetryPolicy.covering(
        s.deadline_payment_s + s.breaker_open_s,
        initial_delay=s.retry_initial_delay,
        multiplier=s.retry_multiplier,
        max_delay=max(s.retry_initial_delay, s.breaker_open_s / 3, 0.1),
    )


def build(ctx: ServiceContext, gateway: BankGateway | None = None) -> Service:
    bank = gateway if gateway is not None else default_gateway(ctx)
    breaker = bank if isinstance(bank, CircuitBreaker) else None
    s = ctx.settings
    return Service(
        name="payment",
        consumers={CONSUMER: handlers(
            TracedBank(bank), ChargeDeadline(ctx.settings.deadline_payment_s)
        )},
        router=router(ctx),
        projections=(projection(),),
        loops=(reconcile_loop(ctx.store, TracedBank(bank), s.reconcile_every_s,
                              s.reconcile_grace_s),),
        retry={CONSUMER: retry_policy(ctx.settings)},
        concurrency={CONSUMER: ctx.settings.bank_concurrency},
        health=(lambda: {"bank_circuit_breaker": breaker.health()}) if breaker else None,
    )
