"""The Transaction aggregate: the saga's state and when it may complete or cancel."""

from __future__ import annotations

import pytest

from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    CompensationStarted,
    FulfilmentRecorded,
    FulfilmentRefused,
    PaymentRecorded,
    ReservationRecorded,
    SagaAborted,
    SaleLine,
    TransactionCancelled,
    TransactionCompleted,
    TransactionCreated,
)
from magasin.transactions.domain import Status, Transaction


def new_sale(*lines: SaleLine, method: str = "VISA") -> Transaction:
    sale = Transaction.create(
        "tx-1", store_id="s-1", customer_id=" alice ", currency="CAD", payment_method=method,
        lines=lines or (SaleLine("p-1", 2, 1899), SaleLine("p-2", 1, 649)),
    )
    return sale


def types(sale: Transaction) -> list[str]:
    return [type(e).__name__ for e in sale.pending]


def test_a_new_sale_is_pending_and_totals_its_lines_in_cents() -> None:
    sale = new_sale()
    (created,) = sale.pending
    assert isinstance(created, TransactionCreated)
    assert created.total == 2 * 1899 + 649
    assert created.customer_id == "alice"
    assert sale.status is Status.PENDING
    assert sale.passed == [Status.PENDING]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((), "at least one line"),
        ((SaleLine("p", 0, 100),), "between 1 and 1000"),
        ((SaleLine("p", 1001, 100),), "between 1 and 1000"),
    ],
)
def test_a_sale_with_bad_lines_is_refused(lines: tuple[SaleLine, ...], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Transaction.create("t", store_id="s", customer_id="c", currency="CAD",
                           payment_method="VISA", lines=lines)


def test_a_product_without_a_price_cannot_be_sold() -> None:
    with pytest.raises(BusinessRuleViolation, match="no valid price"):
        new_sale(SaleLine("p", 1, 0))


def test_the_happy_path_completes_once_the_order_is_fulfilled() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    assert sale.status is Status.INVENTORY_RESERVED
    sale.order_fulfilled("ord-1")

    assert sale.status is Status.COMPLETED
    assert isinstance(sale.pending[-1], TransactionCompleted)
    assert sale.passed == [
        Status.PENDING, Status.PAYMENT_PROCESSED, Status.INVENTORY_RESERVED,
        Status.FULFILLED, Status.COMPLETED,
    ]


def test_the_order_is_recorded_by_the_completion_itself() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    sale.pending.clear()
    sale.order_fulfilled("ord-1")
    assert types(sale) == ["TransactionCompleted"]
    assert sale.pending[-1] == TransactionCompleted("tx-1", "s-1", "alice", 4447, "CAD", "ord-1")
    assert sale.order_id == "ord-1"
    sale.pending.clear()
    sale.order_fulfilled("ord-1")  # a redelivery
    assert sale.pending == []


def test_an_older_stream_with_a_fulfilment_record_rebuilds_to_the_same_sale() -> None:
    created = new_sale().pending[0]
    old = Transaction.replay("tx-1", [
        created, PaymentRecorded("tx-1", "pay-1", 4447), ReservationRecorded("tx-1", "res-1"),
        FulfilmentRecorded("tx-1", "ord-1"),
        TransactionCompleted("tx-1", "s-1", "alice", 4447, "CAD"),  # no order id then
    ], 5)
    new = new_sale()
    new.payment_captured("pay-1", 4447)
    new.inventory_reserved("res-1")
    new.order_fulfilled("ord-1")
    assert (old.status, old.order_id) == (Status.COMPLETED, "ord-1")
    skip = {"version", "passed"}
    assert {k: v for k, v in old.state().items() if k not in skip} == {
        k: v for k, v in new.state().items() if k not in skip}


def test_steps_reported_out_of_order_still_show_every_status_once() -> None:
    sale = new_sale()
    sale.passed.clear()
    sale.inventory_reserved("res-1")  # arrived before PaymentProcessed
    sale.payment_captured("pay-1", 4447)
    sale.order_fulfilled("ord-1")
    assert sale.passed == [
        Status.PAYMENT_PROCESSED, Status.INVENTORY_RESERVED, Status.FULFILLED, Status.COMPLETED,
    ]


def test_a_declined_payment_cancels_at_once_as_nothing_was_taken() -> None:
    sale = new_sale(method="FAIL_CARD")
    sale.payment_failed("declined")
    assert sale.status is Status.CANCELLED
    assert types(sale)[-2:] == ["CompensationStarted", "TransactionCancelled"]
    cancelled = sale.pending[-1]
    assert isinstance(cancelled, TransactionCancelled) and cancelled.reason == "declined"


def test_inventory_unavailable_waits_for_the_refund_before_cancelling() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_unavailable()
    assert sale.status is Status.CANCELLING

    sale.payment_refunded(4447)
    assert sale.status is Status.CANCELLED
    assert sale.failure == "inventory_unavailable"


def test_a_refund_reported_before_the_shortage_cancels_as_soon_as_the_shortage_arrives() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.payment_refunded(4447)
    assert sale.status is Status.PAYMENT_PROCESSED
    sale.inventory_unavailable()
    assert sale.status is Status.CANCELLED


def test_a_fulfilment_failure_needs_both_the_refund_and_the_release() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    sale.fulfillment_failed("store_closed")
    sale.payment_refunded(4447)
    assert sale.status is Status.CANCELLING, "stock not released yet"
    sale.inventory_released()
    assert sale.status is Status.CANCELLED
    assert sale.failure == "fulfillment_failed:store_closed"


def test_an_expired_reservation_compensates_an_unfulfilled_sale() -> None:
    sale = new_sale()
    sale.reservation_expired()  # the inventory still holds the stock: the sale decides
    assert sale.status is Status.CANCELLING
    aborted = [e for e in sale.pending if isinstance(e, SagaAborted)]
    assert [(a.step, a.reason) for a in aborted] == [("order", "reservation_expired")]
    started = [e for e in sale.pending if isinstance(e, CompensationStarted)]
    assert started[0].needs_refund and started[0].needs_release
    sale.payment_refunded(4447)
    assert sale.status is Status.CANCELLING, "stock not released yet"
    sale.inventory_released()
    assert (sale.status, sale.failure) == (Status.CANCELLED, "reservation_expired")


def test_a_sale_whose_order_was_recorded_before_the_expiry_completes_and_keeps_its_money(
) -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    sale.order_fulfilled("order-1")
    sale.reservation_expired()  # late news: the fulfilment won, the completion commits stock
    assert sale.status is Status.COMPLETED
    assert not [e for e in sale.pending if isinstance(e, SagaAborted | CompensationStarted)]


def test_a_fulfilment_after_the_expiry_gave_the_sale_up_is_refused_once() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    sale.reservation_expired()
    sale.order_fulfilled("order-1")
    sale.order_fulfilled("order-1")  # a redelivery
    refused = [e for e in sale.pending if isinstance(e, FulfilmentRefused)]
    assert refused == [FulfilmentRefused(sale.id, "order-1", "reservation_expired")]
    assert (sale.status, sale.order_id) == (Status.CANCELLING, None)
    sale.inventory_released()
    sale.payment_refunded(4447)
    assert (sale.status, sale.failure) == (Status.CANCELLED, "reservation_expired")
    sale.order_fulfilled("order-1")  # after the end too: refused already, nothing new
    assert len([e for e in sale.pending if isinstance(e, FulfilmentRefused)]) == 1


def test_events_after_the_end_change_nothing() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_reserved("res-1")
    sale.order_fulfilled("ord-1")
    recorded = len(sale.pending)
    sale.payment_captured("pay-1", 4447)
    sale.inventory_unavailable()
    sale.fulfillment_failed("late")
    sale.payment_refunded(4447)
    assert len(sale.pending) == recorded
    assert sale.status is Status.COMPLETED


def test_a_replayed_sale_has_the_state_it_had() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 4447)
    sale.inventory_unavailable()
    replayed = Transaction.replay("tx-1", sale.pending, len(sale.pending))
    assert replayed.status is Status.CANCELLING
    assert (replayed.payment_id, replayed.total) == ("pay-1", 4447)


# -- the choreographed sale waits for its order (seed 6.1.1) -------------------------------


def test_a_choreographed_sale_waits_for_its_order_and_an_orchestrated_one_for_each_step() -> None:
    assert new_sale().step == "order"
    orchestrated = Transaction.create(
        "tx-2", store_id="s-1", customer_id="a", currency="CAD", payment_method="VISA",
        lines=(SaleLine("p-1", 1, 100),), saga_mode="orchestration",
    )
    assert orchestrated.step == "payment"
    orchestrated.payment_captured("pay-1", 100)
    assert orchestrated.step == "reservation"


def test_the_order_completes_the_sale_with_the_payment_and_reservation_it_names() -> None:
    sale = new_sale()
    sale.order_fulfilled("ord-1", "pay-1", "res-1")
    assert types(sale)[1:] == ["TransactionCompleted"]
    assert (sale.status, sale.payment_id, sale.reservation_id, sale.order_id) == (
        Status.COMPLETED, "pay-1", "res-1", "ord-1")
    assert sale.passed == [Status.PENDING, Status.PAYMENT_PROCESSED, Status.INVENTORY_RESERVED,
                           Status.FULFILLED, Status.COMPLETED]


def test_a_sale_given_up_at_its_order_waits_for_the_refund_and_the_release() -> None:
    sale = new_sale()
    assert sale.abort("deadline:order", "order")
    (started,) = [e for e in sale.pending if isinstance(e, CompensationStarted)]
    assert started.needs_refund and started.needs_release, "it cannot know what happened"
    sale.payment_refunded(4447)
    assert sale.status is Status.CANCELLING, "the stock may still be held"
    sale.inventory_released()
    assert (sale.status, sale.failure) == (Status.CANCELLED, "deadline:order")


def test_an_inventory_holding_nothing_confirms_the_release_of_a_sale_given_up() -> None:
    voided = new_sale()
    voided.abort("deadline:order", "order")
    voided.payment_failed("deadline:order")  # never charged: the payment voided it
    assert voided.status is Status.CANCELLING
    voided.nothing_reserved()  # never reserved: the inventory voided the reservation
    assert voided.status is Status.CANCELLED

    refused = new_sale()
    refused.abort("deadline:order", "order")
    refused.payment_refunded(4447)
    refused.inventory_unavailable()  # refused before the abort reached the inventory
    assert (refused.status, refused.failure) == (Status.CANCELLED, "deadline:order")


def test_a_void_of_nothing_reserved_changes_nothing_for_a_sale_not_given_up() -> None:
    sale = new_sale()
    sale.nothing_reserved()
    assert (sale.status, types(sale)) == (Status.PENDING, ["TransactionCreated"])
