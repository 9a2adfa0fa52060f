"""The payments read model as a projection of the payment streams' events."""

from __future__ import annotations

from magasin.projections import Projection, ProjectionUnit
from magasin.shared.messages import RecordedEvent

PAYMENTS = "payment.payments"
"""One document per transaction id."""
NAME = "payment.payments"


async def _recorded(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    captured = event.type == "PaymentProcessed"
    unit.put_document(PAYMENTS, p["transaction_id"], {
        "payment_id": p["payment_id"], "transaction_id": p["transaction_id"],
        "store_id": p.get("store_id", ""), "status": "CAPTURED" if captured else "FAILED",
        "amount": p["amount"], "currency": p["currency"],
        "bank_reference": p["bank_reference"] if captured else None,
        "refund_reference": None, "reason": None if captured else p["reason"],
        "updated_at": event.occurred_at.isoformat(),
    })


async def _refunded(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    doc = await unit.get_document(PAYMENTS, p["transaction_id"])
    if doc is None:
        return  # a refund is recorded after its capture, in the same stream
    doc.update(
        status="REFUNDED", refund_reference=p["bank_reference"], reason=p["reason"],
        updated_at=event.occurred_at.isoformat(),
    )
    unit.put_document(PAYMENTS, p["transaction_id"], doc)


async def _reconciled(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    doc = await unit.get_document(PAYMENTS, p["transaction_id"])
    if doc is None:
        return  # reconciliation follows the failure, in the same stream
    doc.update(reconciled={
        "action": p["action"], "amount": p["amount"], "bank_reference": p["bank_reference"],
        "refund_reference": p["refund_reference"], "at": event.occurred_at.isoformat(),
    }, updated_at=event.occurred_at.isoformat())
    unit.put_document(PAYMENTS, p["transaction_id"], doc)


def projection() -> Projection:
    return Projection(
        NAME,
        {"PaymentProcessed": _recorded, "PaymentFailed": _recorded, "PaymentRefunded": _refunded,
         "ChargeReconciled": _reconciled},
        (PAYMENTS,),
    )
