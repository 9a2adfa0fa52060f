"""The orchestrator's consumer on a real SQLite store: commands out, replies in."""

from __future__ import annotations

from magasin.eventstore.store import Causation
from magasin.shared.commands import ChargePayment, RefundPayment, ReserveStock, orchestrated
from magasin.shared.events import (
    InventoryUnavailable,
    MissingLine,
    PaymentProcessed,
    PaymentRefunded,
    SaleLine,
    StockLine,
    TransactionCreated,
)
from magasin.transactions.orchestrator.domain import Orchestration, Outcome
from magasin.transactions.orchestrator.handlers import CONSUMER, orchestrator_handlers, sagas
from tests.unit.conftest import Harness

LINES = (SaleLine("p1", 2, 250),)


def created(tid: str, mode: str) -> TransactionCreated:
    return TransactionCreated(tid, "s1", "alice", LINES, 500, "EUR", "card", saga_mode=mode)


async def saga_of(harness: Harness, tid: str) -> Orchestration | None:
    async with harness.store.transaction() as uow:
        return await sagas.find(uow, tid)


async def test_out_of_stock_sale_is_charged_reserved_refunded_then_cancelled(
    harness: Harness,
) -> None:
    handlers = orchestrator_handlers()
    [sale] = await harness.given("transaction", "t1", created("t1", "orchestration"))
    await harness.deliver(CONSUMER, handlers, sale)
    await harness.deliver(CONSUMER, handlers, sale)  # redelivered: nothing sent twice
    assert await harness.emitted(ChargePayment) == [
        ChargePayment("t1:1", "transaction", "t1", "s1", LINES, 500, "EUR", "card")]

    [paid] = await harness.given("payment", "t1", PaymentProcessed(
        "pay-1", "t1", 500, "EUR", "bank-1", "s1", (StockLine("p1", 2),)))
    await harness.deliver(CONSUMER, handlers, paid)
    assert await harness.emitted(ReserveStock) == [
        ReserveStock("t1:2", "transaction", "t1", "s1", LINES)]

    [missing] = await harness.given("inventory", "t1", InventoryUnavailable(
        "t1", "s1", (MissingLine("p1", 2, 0),)))
    await harness.deliver(CONSUMER, handlers, missing)
    assert await harness.emitted(RefundPayment) == [
        RefundPayment("t1:3", "transaction", "t1", "inventory_unavailable")]

    [refunded] = await harness.given("payment", "t1", PaymentRefunded(
        "pay-1", "t1", 500, "EUR", "inventory_unavailable", "bank-2"))
    await harness.deliver(CONSUMER, handlers, refunded)
    saga = await saga_of(harness, "t1")
    assert saga is not None
    assert (saga.outcome, saga.reason, saga.pending_command) == (
        Outcome.CANCELLED, "inventory_unavailable", None)


async def test_a_choreographed_sale_is_left_to_the_services(harness: Harness) -> None:
    handlers = orchestrator_handlers()
    [sale] = await harness.given("transaction", "t2", created("t2", "choreography"))
    await harness.deliver(CONSUMER, handlers, sale)
    [paid] = await harness.given("payment", "t2", PaymentProcessed(
        "pay-2", "t2", 500, "EUR", "bank-1", "s1", (StockLine("p1", 2),)))
    await harness.deliver(CONSUMER, handlers, paid)
    assert await harness.emitted(ChargePayment, ReserveStock) == []
    assert await saga_of(harness, "t2") is None


async def test_commands_carry_the_mode_and_what_they_cause_inherits_it(
    harness: Harness,
) -> None:
    """The services tell an orchestrated saga's events from a choreographed one's by the
    baggage every event caused by the orchestrator's command carries."""
    handlers = orchestrator_handlers()
    [sale] = await harness.given("transaction", "t3", created("t3", "orchestration"))
    await harness.deliver(CONSUMER, handlers, sale)
    commands = [e for e in await harness.store.read_all(after=0, limit=100)
                if e.type == "ChargePayment"]
    assert [orchestrated(e) for e in commands] == [True]
    assert not orchestrated(sale)
    caused = Causation.of(commands[0], consumer="payment")
    assert caused.metadata == {"baggage": {"saga_mode": "orchestration"},
                               "consumer": "payment"}
