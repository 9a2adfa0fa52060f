"""The payment service as the composition root receives it."""

from __future__ import annotations

from magasin.config import Settings
from magasin.payments.breaker import CircuitBreaker
from magasin.payments.gateway import BankSimulator
from magasin.payments.service import build, default_gateway
from magasin.service import ServiceContext
from magasin.shared.events import SCHEMAS
from tests.unit.conftest import Harness


def test_the_payment_consumer_handles_the_saga_events(harness: Harness) -> None:
    service = build(ServiceContext(harness.store, Settings()), BankSimulator(latency_s=0))
    assert service.name == "payment"
    assert set(service.consumers) == {"payment"}
    handled = set(service.consumers["payment"])
    assert handled == {
        "TransactionCreated", "InventoryUnavailable", "OrderFulfillmentFailed",
        "InventoryReleased",
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
