"""The payment consumer, driven through the harness exactly as the bus drives it."""

from __future__ import annotations

import asyncio

from magasin.messaging.bus import Handler
from magasin.messaging.dispatch import Outcome
from magasin.payments.aborts import ChargeDeadline
from magasin.payments.gateway import BankSimulator, Charge
from magasin.payments.handlers import PAYMENTS, handlers
from magasin.shared.commands import ChargePayment, RefundPayment, VoidPayment
from magasin.shared.events import (
    InventoryUnavailable,
    MissingLine,
    OrderFulfillmentFailed,
    PaymentFailed,
    PaymentProcessed,
    PaymentRefunded,
    SagaAborted,
    SaleLine,
    StockLine,
    TransactionCreated,
)
from magasin.shared.messages import RecordedEvent
from tests.unit.conftest import Harness

TX = "tx-0001"
CONSUMER = "payment"


class CountingBank(BankSimulator):
    """The simulator, counting every charge call that reaches it."""

    def __init__(self) -> None:
        super().__init__(latency_s=0)
        self.charge_calls = 0

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        self.charge_calls += 1
        return await super().charge(idempotency_key, amount, currency, method)


def created(total: int = 2500, method: str = "VISA", tx: str = TX) -> TransactionCreated:
    return TransactionCreated(
        transaction_id=tx, store_id="store-1", customer_id="c-1",
        lines=(SaleLine("p-1", 2, 1000), SaleLine("p-2", 1, total - 2000)),
        total=total, currency="CAD", payment_method=method,
    )


async def publish(harness: Harness, *payloads: object, tx: str = TX) -> list[RecordedEvent]:
    aggregate = "transaction" if isinstance(payloads[0], TransactionCreated) else "other"
    return await harness.given(aggregate, tx, *payloads, correlation_id=tx)


async def deliver(harness: Harness, bank: BankSimulator, *payloads: object) -> Outcome:
    outcome = Outcome.HANDLED
    for event in await publish(harness, *payloads):
        outcome = (await harness.deliver(CONSUMER, consumer(bank), event)).outcome
    return outcome


def consumer(bank: BankSimulator) -> dict[str, Handler]:
    return handlers(bank, ChargeDeadline(60))


async def paid(harness: Harness, bank: BankSimulator) -> None:
    assert await deliver(harness, bank, created()) is Outcome.HANDLED


def unavailable() -> InventoryUnavailable:
    return InventoryUnavailable(TX, "store-1", (MissingLine("p-1", 2, 1),))


def expired() -> SagaAborted:
    """The transaction gives the sale up because its reservation expired."""
    return SagaAborted(TX, "fulfilment", "reservation_expired", "store-1", 2500, "CAD")


# -- charging -----------------------------------------------------------------------------


async def test_transaction_created_charges_and_records_payment_processed(
    harness: Harness,
) -> None:
    bank = CountingBank()
    await paid(harness, bank)

    [processed] = await harness.emitted(PaymentProcessed)
    assert (processed.transaction_id, processed.amount, processed.currency) == (TX, 2500, "CAD")
    assert processed.store_id == "store-1"
    assert processed.lines == (StockLine("p-1", 2), StockLine("p-2", 1))
    assert processed.bank_reference == bank.charges[0].reference
    assert bank.captured_total == 2500
    doc = await harness.read_model(PAYMENTS, TX)
    assert doc is not None
    assert doc["status"] == "CAPTURED"
    assert (doc["payment_id"], doc["bank_reference"]) == (
        processed.payment_id, processed.bank_reference
    )


async def test_payment_events_keep_the_saga_correlation(harness: Harness) -> None:
    await paid(harness, CountingBank())
    stored = await harness.store.read_stream(f"payment-{TX}")
    assert [e.type for e in stored] == ["PaymentProcessed"]
    assert stored[0].correlation_id == TX


async def test_fail_card_is_declined_and_records_payment_failed(harness: Harness) -> None:
    bank = CountingBank()
    await deliver(harness, bank, created(method="FAIL_CARD"))

    [failed] = await harness.emitted(PaymentFailed)
    assert (failed.transaction_id, failed.reason, failed.amount) == (TX, "declined", 2500)
    assert await harness.emitted(PaymentProcessed) == []
    doc = await harness.read_model(PAYMENTS, TX)
    assert doc is not None
    assert (doc["status"], doc["reason"], doc["store_id"]) == ("FAILED", "declined", "store-1")


async def test_more_than_ten_thousand_is_declined_as_limit_exceeded(harness: Harness) -> None:
    await deliver(harness, CountingBank(), created(total=1_000_001))
    [failed] = await harness.emitted(PaymentFailed)
    assert failed.reason == "limit_exceeded"


async def test_a_duplicate_transaction_created_charges_once(harness: Harness) -> None:
    bank = CountingBank()
    [first] = await publish(harness, created())
    [copy] = await publish(harness, created())  # the same fact published twice

    for event in (first, copy, first):
        await harness.deliver(CONSUMER, handlers(bank), event)

    assert bank.charge_calls == 1
    assert len(bank.charges) == 1
    assert len(await harness.emitted(PaymentProcessed)) == 1


async def test_an_unreachable_bank_fails_the_delivery_so_it_is_retried(
    harness: Harness,
) -> None:
    bank = CountingBank()
    bank.reachable = False
    [event] = await publish(harness, created())

    assert (await harness.deliver(CONSUMER, handlers(bank), event)).outcome is Outcome.FAILED
    assert await harness.emitted(PaymentProcessed, PaymentFailed) == []

    bank.reachable = True
    assert (await harness.deliver(CONSUMER, handlers(bank), event)).outcome is Outcome.HANDLED
    assert len(await harness.emitted(PaymentProcessed)) == 1


# -- compensations ------------------------------------------------------------------------


async def test_inventory_unavailable_refunds_the_payment(harness: Harness) -> None:
    bank = CountingBank()
    await paid(harness, bank)
    await deliver(harness, bank, unavailable())

    [refunded] = await harness.emitted(PaymentRefunded)
    [processed] = await harness.emitted(PaymentProcessed)
    assert (refunded.transaction_id, refunded.amount, refunded.reason) == (
        TX, 2500, "inventory_unavailable"
    )
    assert refunded.payment_id == processed.payment_id
    assert refunded.bank_reference == bank.refunds[0]
    assert bank.captured_total == 0
    doc = await harness.read_model(PAYMENTS, TX)
    assert doc is not None
    assert (doc["status"], doc["refund_reference"], doc["reason"]) == (
        "REFUNDED", refunded.bank_reference, "inventory_unavailable"
    )


async def test_order_fulfillment_failed_refunds_the_payment(harness: Harness) -> None:
    bank = CountingBank()
    await paid(harness, bank)
    await deliver(harness, bank, OrderFulfillmentFailed(TX, "store-1", "store_closed"))

    [refunded] = await harness.emitted(PaymentRefunded)
    assert refunded.reason == "fulfillment_failed"
    assert bank.captured_total == 0


async def test_an_expired_reservation_refunds_the_payment_once_the_transaction_gave_up(
    harness: Harness,
) -> None:
    bank = CountingBank()
    await paid(harness, bank)
    await deliver(harness, bank, expired())

    [refunded] = await harness.emitted(PaymentRefunded)
    assert refunded.reason == "reservation_expired"


def test_a_release_alone_never_refunds() -> None:
    # The transaction decides whether an expired reservation's sale is given up (its order
    # may have been recorded first): payment refunds on that decision, not on the release.
    assert "InventoryReleased" not in consumer(CountingBank())


async def test_a_compensation_before_the_payment_fails_until_the_payment_is_recorded(
    harness: Harness,
) -> None:
    bank = CountingBank()
    [early] = await publish(harness, unavailable())

    result = await harness.deliver(CONSUMER, handlers(bank), early)
    assert result.outcome is Outcome.FAILED
    assert "no payment recorded yet" in result.reason
    assert await harness.emitted(PaymentRefunded) == []

    await paid(harness, bank)
    assert (await harness.deliver(CONSUMER, handlers(bank), early)).outcome is Outcome.HANDLED
    assert len(await harness.emitted(PaymentRefunded)) == 1


async def test_a_compensation_of_a_failed_payment_takes_nothing_back(harness: Harness) -> None:
    bank = CountingBank()
    await deliver(harness, bank, created(method="FAIL_CARD"))
    assert await deliver(harness, bank, unavailable()) is Outcome.HANDLED

    assert await harness.emitted(PaymentRefunded) == []
    assert bank.refunds == []
    doc = await harness.read_model(PAYMENTS, TX)
    assert doc is not None
    assert doc["status"] == "FAILED"


async def test_a_double_compensation_refunds_once(harness: Harness) -> None:
    bank = CountingBank()
    await paid(harness, bank)
    await deliver(harness, bank, OrderFulfillmentFailed(TX, "store-1", "store_closed"))
    await deliver(harness, bank, expired())
    await deliver(harness, bank, OrderFulfillmentFailed(TX, "store-1", "store_closed"))

    [refunded] = await harness.emitted(PaymentRefunded)
    assert refunded.reason == "fulfillment_failed"
    assert len(bank.refunds) == 1


async def test_concurrent_compensations_refund_once(harness: Harness) -> None:
    bank = BankSimulator(latency_s=0.01)
    await paid(harness, bank)
    events = await publish(
        harness, unavailable(), OrderFulfillmentFailed(TX, "store-1", "store_closed"), expired()
    )

    results = await asyncio.gather(
        *(harness.deliver(CONSUMER, consumer(bank), e) for e in events)
    )
    assert {r.outcome for r in results} == {Outcome.HANDLED}
    assert len(await harness.emitted(PaymentRefunded)) == 1
    assert len(bank.refunds) == 1
    assert bank.captured_total == 0


# -- orchestrated sales: the same charge and refund, on the orchestrator's commands --------


def orchestrated() -> TransactionCreated:
    c = created()
    return TransactionCreated(c.transaction_id, c.store_id, c.customer_id, c.lines, c.total,
                              c.currency, c.payment_method, saga_mode="orchestration")


async def test_orchestrated_sale_is_charged_on_its_command_not_on_its_creation(
    harness: Harness,
) -> None:
    bank = CountingBank()
    await deliver(harness, bank, orchestrated())
    assert bank.charge_calls == 0 and await harness.emitted(PaymentProcessed) == []
    c = created()
    command = ChargePayment(f"{TX}:1", "transaction", TX, c.store_id, c.lines, c.total,
                            c.currency, c.payment_method)
    await deliver(harness, bank, command, command)  # redelivered: charged once
    [processed] = await harness.emitted(PaymentProcessed)
    assert (processed.transaction_id, processed.amount, bank.charge_calls) == (TX, 2500, 1)

    await deliver(harness, bank, RefundPayment(f"{TX}:3", "transaction", TX, "no_stock"))
    [refunded] = await harness.emitted(PaymentRefunded)
    assert (refunded.amount, refunded.reason) == (2500, "no_stock")


async def test_void_payment_fails_a_sale_never_charged_so_a_late_charge_takes_nothing(
    harness: Harness,
) -> None:
    bank = CountingBank()
    await deliver(harness, bank, VoidPayment(f"{TX}:2", "transaction", TX, "deadline:payment",
                                             "store-1", 2500, "CAD"))
    [failed] = await harness.emitted(PaymentFailed)
    assert (failed.transaction_id, failed.reason) == (TX, "deadline:payment")
    c = created()
    late = ChargePayment(f"{TX}:1", "transaction", TX, c.store_id, c.lines, c.total,
                         c.currency, c.payment_method)
    await deliver(harness, bank, late)
    assert bank.charge_calls == 0 and await harness.emitted(PaymentProcessed) == []


async def test_void_payment_refunds_a_sale_charged_meanwhile(harness: Harness) -> None:
    bank = CountingBank()
    c = created()
    await deliver(harness, bank, ChargePayment(f"{TX}:1", "transaction", TX, c.store_id,
                                               c.lines, c.total, c.currency, c.payment_method))
    await deliver(harness, bank, VoidPayment(f"{TX}:2", "transaction", TX, "forced",
                                             "store-1", 2500, "CAD"))
    [refunded] = await harness.emitted(PaymentRefunded)
    assert (refunded.amount, refunded.reason) == (2500, "forced")
