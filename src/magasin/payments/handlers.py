"""Payment's consumer: charge on TransactionCreated, refund on the saga's compensations."""

from __future__ import annotations

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.payments.aborts import BANK_UNAVAILABLE, ChargeDeadline, abort_handlers, unsettled
from magasin.payments.domain import Payment, PaymentStatus
from magasin.payments.gateway import BankGateway, Charge
from magasin.payments.projection import PAYMENTS as PAYMENTS  # the read model, for callers
from magasin.shared.commands import ChargePayment, RefundPayment, orchestrated
from magasin.shared.errors import NotFound, Unavailable
from magasin.shared.events import (
    SCHEMAS,
    InventoryUnavailable,
    OrderFulfillmentFailed,
    StockLine,
    TransactionCreated,
)
from magasin.shared.ids import time_ordered_id
from magasin.shared.messages import RecordedEvent

payments = Repository(Payment)


def refund_key(transaction_id: str) -> str:
    """Idempotency key of the one refund a transaction can get."""
    return f"{transaction_id}:refund"


async def charge(
    gateway: BankGateway, event: RecordedEvent, uow: UnitOfWork,
    deadline: ChargeDeadline | None = None,
) -> None:
    """Charge a sale once, on its TransactionCreated (choreography) or its ChargePayment
    command (orchestration): both carry what the charge needs."""
    created: TransactionCreated | ChargePayment = SCHEMAS.validate(event)
    tid = created.transaction_id
    if (known := await payments.find(uow, tid)) is not None:
        if deadline is not None:
            await deadline.settle_overtaken(gateway, known, refund_key(tid))
            if known.status is PaymentStatus.FAILED and known.reconciled is None:
                # A charge met a voided payment: the bank may hold money for it, or have
                # just given it back (above); reconciliation checks, whenever it last did.
                unsettled(uow, known, deadline.clock())
        return  # already charged: a duplicate of TransactionCreated takes nothing twice
    # The transaction id as idempotency key: a retry after a crash between the bank's
    # answer and our commit gets the same answer instead of a second charge.
    try:
        answer = await gateway.charge(
            tid, created.total, created.currency, created.payment_method
        )
    except Unavailable as exc:
        # Retried by the bus until the payment step's deadline; then the sale fails.
        if deadline is None or not await deadline.unreachable(uow, event, str(exc)):
            raise
        answer = Charge(approved=False, reference="", decline_reason=BANK_UNAVAILABLE)
    if deadline is not None:
        deadline.approved(uow, tid, answer)
    payment = Payment(tid)
    if answer.approved:
        payment.capture(
            payment_id=time_ordered_id(), amount=created.total, currency=created.currency,
            bank_reference=answer.reference, store_id=created.store_id,
            lines=[StockLine(line.product_id, line.quantity) for line in created.lines],
        )
    else:
        payment.fail(
            payment_id=time_ordered_id(), amount=created.total, currency=created.currency,
            reason=answer.decline_reason or "declined", store_id=created.store_id,
        )
        if not answer.reference and deadline is not None:
            # Failed for want of an answer: an earlier attempt may have reached the bank.
            unsettled(uow, payment, deadline.clock())
    payments.save(uow, payment)


async def refund(
    gateway: BankGateway, uow: UnitOfWork, transaction_id: str, reason: str
) -> None:
    """Give the captured money back, once; nothing to do if nothing was taken."""
    payment = await payments.find(uow, transaction_id)
    if payment is None:
        # The compensation overtook the charge: fail so the bus delivers it again later.
        raise NotFound(f"no payment recorded yet for transaction {transaction_id}")
    if not payment.refundable:
        return  # failed (nothing was taken) or refunded already
    assert payment.bank_reference is not None
    reference = await gateway.refund(
        refund_key(transaction_id), payment.bank_reference, payment.amount
    )
    payment.refund(payment.amount, reason, reference)
    payments.save(uow, payment)


def handlers(
    gateway: BankGateway, deadline: ChargeDeadline | None = None
) -> dict[str, Handler]:
    """The payment consumer's registry: every event type it handles, and by what."""

    async def on_transaction_created(event: RecordedEvent, uow: UnitOfWork) -> None:
        if event.payload.get("saga_mode", "choreography") != "choreography":
            return  # the orchestrator sends ChargePayment for this sale
        await charge(gateway, event, uow, deadline)

    async def on_charge_payment(event: RecordedEvent, uow: UnitOfWork) -> None:
        await charge(gateway, event, uow, deadline)

    async def on_refund_payment(event: RecordedEvent, uow: UnitOfWork) -> None:
        command: RefundPayment = SCHEMAS.validate(event)
        await refund(gateway, uow, command.transaction_id, command.reason)

    async def on_inventory_unavailable(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends RefundPayment
        unavailable: InventoryUnavailable = SCHEMAS.validate(event)
        await refund(gateway, uow, unavailable.transaction_id, "inventory_unavailable")

    async def on_order_fulfillment_failed(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends RefundPayment
        failed: OrderFulfillmentFailed = SCHEMAS.validate(event)
        await refund(gateway, uow, failed.transaction_id, "fulfillment_failed")

    return {
        "TransactionCreated": on_transaction_created,
        "ChargePayment": on_charge_payment,
        "RefundPayment": on_refund_payment,
        "InventoryUnavailable": on_inventory_unavailable,
        "OrderFulfillmentFailed": on_order_fulfillment_failed,
        **(abort_handlers(gateway, deadline, refund_key) if deadline is not None else {}),
    }
