"""The Payment aggregate: one per transaction, captured or failed once, refunded at most once."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    ChargeReconciled,
    PaymentFailed,
    PaymentProcessed,
    PaymentRefunded,
    StockLine,
)

RECONCILE_ACTIONS = frozenset({"refunded", "recorded"})


class PaymentStatus(StrEnum):
    CAPTURED = "CAPTURED"
    FAILED = "FAILED"
    REFUNDED = "REFUNDED"


class Payment(Aggregate):
    """The payment of one transaction; its id is the transaction id, so a sale is paid once.

    Its domain events are the integration events PaymentProcessed, PaymentFailed and
    PaymentRefunded: consumers need exactly what the aggregate records.
    """

    stream_type = "payment"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.status: PaymentStatus | None = None
        self.payment_id = ""
        self.store_id = ""
        self.amount = 0
        self.currency = ""
        self.bank_reference: str | None = None
        self.refund_reference: str | None = None
        self.reason: str | None = None
        """Why it failed or was refunded."""
        self.reconciled: ChargeReconciled | None = None
        """A charge the bank approved for this failed payment, and how it was settled."""

    @property
    def transaction_id(self) -> str:
        return self.id

    @property
    def refundable(self) -> bool:
        """Money was taken and not given back yet."""
        return self.status is PaymentStatus.CAPTURED

    # -- commands ---------------------------------------------------------------------

    def capture(
        self,
        payment_id: str,
        amount: int,
        currency: str,
        bank_reference: str,
        store_id: str,
        lines: Sequence[StockLine],
    ) -> None:
        """The bank took the money."""
        self._require_unrecorded()
        if amount <= 0:
            raise InvalidInput(f"a captured amount must be positive, got {amount}")
        if not bank_reference:
            raise InvalidInput("a captured payment needs the bank's reference")
        self._record(PaymentProcessed(
            payment_id=payment_id, transaction_id=self.id, amount=amount, currency=currency,
            bank_reference=bank_reference, store_id=store_id, lines=tuple(lines),
        ))

    def fail(
        self, payment_id: str, amount: int, currency: str, reason: str, store_id: str = ""
    ) -> None:
        """The bank declined: nothing was taken."""
        self._require_unrecorded()
        if not reason:
            raise InvalidInput("a failed payment needs a reason")
        self._record(PaymentFailed(
            payment_id=payment_id, transaction_id=self.id, amount=amount, currency=currency,
            reason=reason, store_id=store_id,
        ))

    def refund(self, amount: int, reason: str, refund_reference: str) -> None:
        """The bank gave the whole captured amount back."""
        if self.status is None:
            raise BusinessRuleViolation(f"transaction {self.id} has no payment to refund")
        if self.status is PaymentStatus.FAILED:
            raise BusinessRuleViolation(
                f"payment of transaction {self.id} failed ({self.reason}): "
                "nothing was taken, so nothing can be refunded"
            )
        if self.status is PaymentStatus.REFUNDED:
            raise BusinessRuleViolation(
                f"payment of transaction {self.id} is already refunded ({self.reason})"
            )
        if amount != self.amount:
            raise BusinessRuleViolation(
                f"a refund must give back the {self.amount} cents captured, not {amount}"
            )
        if not reason:
            raise InvalidInput("a refund needs a reason")
        if not refund_reference:
            raise InvalidInput("a refund needs the bank's refund reference")
        self._record(PaymentRefunded(
            payment_id=self.payment_id, transaction_id=self.id, amount=amount,
            currency=self.currency, reason=reason, bank_reference=refund_reference,
        ))

    def reconcile(
        self, bank_reference: str, amount: int, action: str, refund_reference: str
    ) -> None:
        """The bank approved a charge for this payment although it is recorded FAILED (a
        void won, or the process died between the bank's answer and its commit): record
        how it was settled, once."""
        if self.status is not PaymentStatus.FAILED:
            raise BusinessRuleViolation(
                f"payment of transaction {self.id} is {self.status}: only a failed payment "
                "can hold a stray charge"
            )
        if self.reconciled is not None:
            raise BusinessRuleViolation(
                f"the stray charge of transaction {self.id} is settled already "
                f"({self.reconciled.action})"
            )
        if action not in RECONCILE_ACTIONS:
            raise InvalidInput(f"unknown reconciliation action {action!r}")
        if amount <= 0 or not bank_reference or not refund_reference:
            raise InvalidInput("a reconciliation needs the charge, its amount and its refund")
        self._record(ChargeReconciled(
            payment_id=self.payment_id, transaction_id=self.id, bank_reference=bank_reference,
            amount=amount, currency=self.currency, action=action,
            refund_reference=refund_reference,
        ))

    def _require_unrecorded(self) -> None:
        if self.status is not None:
            raise BusinessRuleViolation(
                f"the payment of transaction {self.id} is already recorded ({self.status})"
            )

    # -- state ------------------------------------------------------------------------

    def apply(self, event: object) -> None:
        match event:
            case PaymentProcessed():
                self.status = PaymentStatus.CAPTURED
                self.payment_id = event.payment_id
                self.store_id = event.store_id
                self.amount = event.amount
                self.currency = event.currency
                self.bank_reference = event.bank_reference
            case PaymentFailed():
                self.status = PaymentStatus.FAILED
                self.payment_id = event.payment_id
                self.store_id = event.store_id
                self.amount = event.amount
                self.currency = event.currency
                self.reason = event.reason
            case PaymentRefunded():
                self.status = PaymentStatus.REFUNDED
                self.refund_reference = event.bank_reference
                self.reason = event.reason
            case ChargeReconciled():
                self.reconciled = event
            case _:
                raise TypeError(f"a payment does not record {type(event).__name__}")
