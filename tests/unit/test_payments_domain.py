"""Rules of the Payment aggregate, without any I/O."""

from __future__ import annotations

import pytest

from magasin.payments.domain import Payment, PaymentStatus
from magasin.shared.errors import BusinessRuleViolation
from magasin.shared.events import PaymentFailed, PaymentProcessed, PaymentRefunded, StockLine


def captured(amount: int = 2500) -> Payment:
    payment = Payment("tx-1")
    payment.capture("pay-1", amount, "CAD", "CH-1", "store-1", [StockLine("p-1", 2)])
    return payment


def declined() -> Payment:
    payment = Payment("tx-1")
    payment.fail("pay-1", 2500, "CAD", "declined")
    return payment


def test_a_capture_records_payment_processed_with_store_and_lines() -> None:
    payment = captured()
    assert payment.status is PaymentStatus.CAPTURED
    assert payment.pending == [
        PaymentProcessed("pay-1", "tx-1", 2500, "CAD", "CH-1", "store-1", (StockLine("p-1", 2),))
    ]


def test_a_declined_charge_records_payment_failed_with_its_reason() -> None:
    payment = declined()
    assert payment.status is PaymentStatus.FAILED
    assert payment.pending == [PaymentFailed("pay-1", "tx-1", 2500, "CAD", "declined")]


def test_a_transaction_is_paid_only_once() -> None:
    payment = captured()
    with pytest.raises(BusinessRuleViolation, match="already recorded"):
        payment.capture("pay-2", 2500, "CAD", "CH-2", "store-1", [])
    with pytest.raises(BusinessRuleViolation, match="already recorded"):
        payment.fail("pay-2", 2500, "CAD", "declined")


def test_a_captured_payment_is_refunded_for_the_captured_amount() -> None:
    payment = captured()
    payment.refund(2500, "inventory_unavailable", "RF-1")
    assert payment.status is PaymentStatus.REFUNDED
    assert payment.pending[-1] == PaymentRefunded(
        "pay-1", "tx-1", 2500, "CAD", "inventory_unavailable", "RF-1"
    )
    assert not payment.refundable


def test_a_refund_of_another_amount_is_refused() -> None:
    payment = captured()
    with pytest.raises(BusinessRuleViolation, match="2500 cents captured"):
        payment.refund(1000, "inventory_unavailable", "RF-1")
    assert payment.status is PaymentStatus.CAPTURED


def test_a_payment_is_refunded_only_once() -> None:
    payment = captured()
    payment.refund(2500, "inventory_unavailable", "RF-1")
    with pytest.raises(BusinessRuleViolation, match="already refunded"):
        payment.refund(2500, "fulfillment_failed", "RF-2")


def test_a_failed_payment_cannot_be_refunded_since_nothing_was_taken() -> None:
    payment = declined()
    assert not payment.refundable
    with pytest.raises(BusinessRuleViolation, match="nothing was taken"):
        payment.refund(2500, "inventory_unavailable", "RF-1")


def test_a_payment_rebuilt_from_its_events_has_the_same_state() -> None:
    original = captured()
    original.refund(2500, "reservation_expired", "RF-1")
    rebuilt = Payment.replay("tx-1", original.pending, version=2)
    assert (rebuilt.status, rebuilt.payment_id, rebuilt.amount, rebuilt.bank_reference) == (
        PaymentStatus.REFUNDED, "pay-1", 2500, "CH-1"
    )
    assert (rebuilt.refund_reference, rebuilt.reason) == ("RF-1", "reservation_expired")
