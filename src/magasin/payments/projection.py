"""The payments read model as a projection of the payment streams' events."""

from __future__ import annotations

from typing import Any

from magasin.projections import Projection, ProjectionUnit
from magasin.shared.messages import RecordedEvent

PAYMENTS = "payment.payments"
"""One document per transaction id."""
NAME = "payment.payments"

Doc = dict[str, Any]


def _recorded(doc: Doc | None, event: RecordedEvent) -> Doc | None:
    p = event.payload
    captured = event.type == "PaymentProcessed"
    return {
        "payment_id": p["payment_id"], "transaction_id": p["transaction_id"],
        "store_id": p.get("store_id", ""), "status": "CAPTURED" if captured else "FAILED",
        "amount": p["amount"], "currency": p["currency"],
        "bank_reference": p["bank_reference"] if captured else None,
        "refund_reference": None, "reason": None if captured else p["reason"],
        "updated_at": event.occurred_at.isoformat(),
    }


def _refunded(doc: Doc | None, event: RecordedEvent) -> Doc | None:
    if doc is None:
        return None  # a refund is recorded after its capture, in the same stream
    p = event.payload
    return {**doc, "status": "REFUNDED", "refund_reference": p["bank_reference"],
            "reason": p["reason"], "updated_at": event.occurred_at.isoformat()}


def _reconciled(doc: Doc | None, event: RecordedEvent) -> Doc | None:
    if doc is None:
        return None  # reconciliation follows the failure, in the same stream
    p = event.payload
    return {**doc, "reconciled": {
        "action": p["action"], "amount": p["amount"], "bank_reference": p["bank_reference"],
        "refund_reference": p["refund_reference"], "at": event.occurred_at.isoformat(),
    }, "updated_at": event.occurred_at.isoformat()}


APPLIES = {"PaymentProcessed": _recorded, "PaymentFailed": _recorded,
          "PaymentRefunded": _refunded, "ChargeReconciled": _reconciled}


def applied(doc: Doc | None, event: RecordedEvent) -> Doc | None:
    """The payment's document once `event` is applied (None: no payment yet). `version` is
    the stream version it reflects, so a reader can tell a lagging document."""
    after = APPLIES[event.type](doc, event)
    return None if after is None else {**after, "version": event.stream_version}


async def _project(event: RecordedEvent, unit: ProjectionUnit) -> None:
    key = event.payload["transaction_id"]
    before = await unit.get_document(PAYMENTS, key)
    if before is not None and before.get("version", 0) >= event.stream_version:
        return  # applied already (inline, by the unit of work that appended it)
    doc = applied(before, event)
    if doc is not None:
        unit.put_document(PAYMENTS, key, doc)


def projection() -> Projection:
    """Inline: one document per payment stream (the transaction id), with its version."""
    return Projection(NAME, dict.fromkeys(APPLIES, _project), (PAYMENTS,), inline=True)
