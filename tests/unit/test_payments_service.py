"""The payment service as the composition root receives it."""

from __future__ import annotations

import pytest

from magasin.config import Settings
from magasin.observability.metrics import BREAKER_STATES, REGISTRY
from magasin.payments.breaker import BreakerPolicy, CircuitBreaker
from magasin.payments.gateway import BankSimulator
from magasin.payments.service import build, default_gateway
from magasin.service import ServiceContext
from magasin.shared.errors import Unavailable
from magasin.shared.events import SCHEMAS
from tests.unit.conftest import Harness


def test_the_payment_consumer_handles_the_saga_events(harness: Harness) -> None:
    service = build(ServiceContext(harness.store, Settings()), BankSimulator(latency_s=0))
    assert service.name == "payment"
    assert set(service.consumers) == {"payment"}
    handled = set(service.consumers["payment"])
    assert handled == {
        "TransactionCreated", "InventoryUnavailable", "OrderFulfillmentFailed", "SagaAborted",
        "ChargePayment", "RefundPayment", "VoidPayment",
    }
    assert handled <= SCHEMAS.types
    assert service.router is not None


def test_the_default_bank_follows_the_settings(harness: Harness) -> None:
    settings = Settings(bank_latency_ms=250, bank_decline_rate=0.25, bank_seed=3)
    gateway = default_gateway(ServiceContext(harness.store, settings))
    assert isinstance(gateway, CircuitBreaker)
    bank = gateway.gateway
    assert isinstance(bank, BankSimulator)
    assert (bank.latency_s, bank.decline_rate) == (0.25, 0.25)


def test_the_bank_breaker_follows_the_settings(harness: Harness) -> None:
    settings = Settings(
        breaker_failure_rate=0.3, breaker_window=20, breaker_min_calls=8, breaker_open_s=5,
        breaker_half_open_calls=2,
    )
    gateway = default_gateway(ServiceContext(harness.store, settings))
    assert isinstance(gateway, CircuitBreaker)
    assert gateway.policy == BreakerPolicy(
        failure_rate=0.3, window=20, min_calls=8, open_s=5, half_open_calls=2
    )


async def test_the_breaker_state_is_exported_as_a_metric(harness: Harness) -> None:
    settings = Settings(bank_latency_ms=0, breaker_min_calls=1, breaker_window=1)
    gateway = default_gateway(ServiceContext(harness.store, settings))
    assert isinstance(gateway, CircuitBreaker) and isinstance(gateway.gateway, BankSimulator)

    def exported() -> float | None:
        return REGISTRY.get_sample_value("magasin_circuit_breaker_state", {"name": "bank"})

    assert exported() == BREAKER_STATES["closed"]
    gateway.gateway.reachable = False
    with pytest.raises(Unavailable):
        await gateway.charge("t-1", 100, "CAD", "VISA")
    assert exported() == BREAKER_STATES["open"]


def test_the_payment_consumer_keeps_retrying_past_the_payment_deadline(
    harness: Harness,
) -> None:
    settings = Settings(deadline_payment_s=60, breaker_open_s=30)
    service = build(ServiceContext(harness.store, settings), BankSimulator(latency_s=0))
    policy = service.retry["payment"]
    waits = [policy.delay(n) / (1 + policy.jitter) for n in range(1, policy.attempts)]
    assert sum(waits) >= 60, "a charge the bank cannot take is dead-lettered too early"
    assert max(policy.delay(n) for n in range(1, policy.attempts)) <= 10 * (1 + policy.jitter)
