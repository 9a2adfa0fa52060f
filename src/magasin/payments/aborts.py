"""How payment gives up on a sale: the payment step's deadline while the bank is
unreachable, and the transaction's SagaAborted (void what was not charged, refund what was).

A charge the bank could not take is retried by the bus; each failure is remembered
(`payment.bank_unreachable`) so that when the sale is given up, its payment fails with
reason `bank_unavailable`, whichever side's deadline comes first:

- a retry of the charge after the payment deadline records PaymentFailed(bank_unavailable)
  instead of trying again;
- SagaAborted (VoidPayment, orchestrated) for a sale never charged records PaymentFailed
  (a void): a late TransactionCreated then finds the payment recorded and never charges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.payments.domain import Payment, PaymentStatus
from magasin.payments.gateway import BankGateway, Charge
from magasin.shared.clock import utcnow
from magasin.shared.commands import VoidPayment, orchestrated
from magasin.shared.errors import Conflict
from magasin.shared.events import SCHEMAS, SagaAborted
from magasin.shared.ids import time_ordered_id
from magasin.shared.messages import RecordedEvent

log = logging.getLogger("magasin.payments")

UNREACHED = "payment.bank_unreachable"
"""Sales whose charge found the bank unreachable: transaction id -> last failure."""
BANK_UNAVAILABLE = "bank_unavailable"
UNSETTLED = "payment.unsettled"
"""Payments recorded FAILED without the bank's own decline (a void, a bank never reached):
the bank may still have approved a charge for them. Reconciliation (`reconcile.py`) looks
each one up at the bank and removes it: transaction id -> {at, reason}."""


def unsettled(uow: UnitOfWork, payment: Payment, at: datetime) -> None:
    """Note, with the void, that the bank's books must be checked for this payment."""
    uow.put_document(UNSETTLED, payment.id, {"at": at.isoformat(), "reason": payment.reason})

payments = Repository(Payment)


class ChargeDeadline:
    """The payment step's deadline as the payment service sees it, and the approvals this
    process got from the bank but has not committed yet (a void may overtake them)."""

    def __init__(self, payment_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.limit = timedelta(seconds=payment_s)
        self.clock = clock
        self.uncommitted: dict[str, Charge] = {}

    async def unreachable(self, uow: UnitOfWork, event: RecordedEvent, error: str) -> bool:
        """Remember that the bank could not be reached for this sale (in a unit of work of
        its own: the handler's fails); True once the payment step's deadline has passed,
        when the charge must fail rather than be retried."""
        tid = event.payload["transaction_id"]
        now = self.clock()
        async with uow.store.transaction() as side:
            side.put_document(UNREACHED, tid, {"at": now.isoformat(), "error": error})
        return now >= event.occurred_at + self.limit

    def approved(self, uow: UnitOfWork, transaction_id: str, answer: Charge) -> None:
        """The bank took the money; until the capture commits, a void may win the race."""
        if answer.approved:
            self.uncommitted[transaction_id] = answer
            uow.after_commit(lambda: self._forget(transaction_id))

    def _forget(self, transaction_id: str) -> None:
        self.uncommitted.pop(transaction_id, None)

    async def settle_overtaken(
        self, gateway: BankGateway, payment: Payment, refund_key: str
    ) -> None:
        """A charge whose capture lost to a void (the payment is recorded FAILED while the
        bank approved): give the money back, since no sale will ever use it."""
        answer = self.uncommitted.pop(payment.id, None)
        if answer is None or payment.status is not PaymentStatus.FAILED:
            return
        reference = await gateway.refund(refund_key, answer.reference, payment.amount)
        log.warning("charge %s of transaction %s was voided before its capture committed: "
                    "refunded at the bank (%s)", answer.reference, payment.id, reference)


async def give_up(
    gateway: BankGateway, deadline: ChargeDeadline, refund_key: Callable[[str], str],
    uow: UnitOfWork, given_up: SagaAborted | VoidPayment,
) -> None:
    """The sale was given up: void its payment if it was never charged, refund it if it
    was (choreography: on SagaAborted; orchestration: on VoidPayment)."""
    tid = given_up.transaction_id
    payment = await payments.find(uow, tid)
    if payment is None:
        if tid in deadline.uncommitted:
            # This process holds an approval about to commit: refund it then.
            raise Conflict(f"the charge of transaction {tid} is being recorded")
        unreached = await uow.get_document(UNREACHED, tid)
        payment = Payment(tid)
        payment.fail(
            payment_id=time_ordered_id(), amount=given_up.total, currency=given_up.currency,
            reason=BANK_UNAVAILABLE if unreached is not None else given_up.reason,
            store_id=given_up.store_id,
        )
        payments.save(uow, payment)
        # A charge of this sale may be on its way (or was approved by a process that
        # died before its commit): reconciliation will ask the bank.
        unsettled(uow, payment, deadline.clock())
        return
    if not payment.refundable:
        return  # failed (nothing taken; its PaymentFailed is on its way) or refunded
    assert payment.bank_reference is not None
    reference = await gateway.refund(refund_key(tid), payment.bank_reference, payment.amount)
    payment.refund(payment.amount, given_up.reason, reference)
    payments.save(uow, payment)


def abort_handlers(
    gateway: BankGateway, deadline: ChargeDeadline, refund_key: Callable[[str], str]
) -> dict[str, Handler]:
    """SagaAborted or VoidPayment: void a payment never charged, refund one that was."""

    async def on_saga_aborted(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends VoidPayment or RefundPayment for this sale
        await give_up(gateway, deadline, refund_key, uow, SCHEMAS.validate(event))

    async def on_void_payment(event: RecordedEvent, uow: UnitOfWork) -> None:
        await give_up(gateway, deadline, refund_key, uow, SCHEMAS.validate(event))

    return {"SagaAborted": on_saga_aborted, "VoidPayment": on_void_payment}
