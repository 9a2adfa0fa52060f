"""The transactions read model as a projection of the transaction streams' events.

Every field is derived from the events alone (times are the events' `occurred_at`), so a
rebuild from zero gives exactly the documents the live projection wrote.
"""

from __future__ import annotations

from typing import Any

from magasin.eventstore.store import EventStore
from magasin.projections import Projection, ProjectionUnit
from magasin.shared.messages import RecordedEvent
from magasin.transactions.domain import HAPPY_PATH, Status
from magasin.transactions.feed import StatusFeed

TRANSACTIONS = "transaction.transactions"
NAME = "transaction.transactions"

# Plain strings: a rebuild runs this for every event, and enum lookups add up.
_PENDING, _PAID, _RESERVED, _FULFILLED, _COMPLETED, _CANCELLING, _CANCELLED = (
    s.value for s in (
        Status.PENDING, Status.PAYMENT_PROCESSED, Status.INVENTORY_RESERVED, Status.FULFILLED,
        Status.COMPLETED, Status.CANCELLING, Status.CANCELLED,
    )
)
_TERMINAL = (_COMPLETED, _CANCELLED)
_HAPPY = [s.value for s in HAPPY_PATH]
_HAPPY_STEP = {status: step for step, status in enumerate(_HAPPY)}
_RECORDS = {
    "PaymentRecorded": "payment_id", "ReservationRecorded": "reservation_id",
    "FulfilmentRecorded": "order_id", "CompensationStarted": "reason",
}
"""The document field each of these facts records (under the same name in its payload)."""


def _status(doc: dict[str, Any]) -> str:
    """The status the facts recorded so far give (see Transaction.status)."""
    if doc["status"] in _TERMINAL:
        return str(doc["status"])
    if doc["reason"] is not None:
        return _CANCELLING
    if doc["order_id"] is not None:
        return _FULFILLED
    if doc["reservation_id"] is not None:
        return _RESERVED
    if doc["payment_id"] is not None:
        return _PAID
    return _PENDING


def new_document(event: RecordedEvent) -> dict[str, Any]:
    """The document of a sale as TransactionCreated records it (also the POST response)."""
    p = event.payload
    at = event.occurred_at.isoformat()
    version = event.stream_version
    return {
        "transaction_id": p["transaction_id"], "store_id": p["store_id"],
        "customer_id": p["customer_id"],
        "lines": [
            {"product_id": li["product_id"], "quantity": li["quantity"],
             "unit_price": li["unit_price"]}
            for li in p["lines"]
        ],
        "total": p["total"], "currency": p["currency"], "payment_method": p["payment_method"],
        "callback_url": p.get("callback_url"), "status": _PENDING, "reason": None,
        "payment_id": None, "reservation_id": None, "order_id": None,
        "created_at": at, "updated_at": at, "version": version,
        "history": [{"status": _PENDING, "at": at, "version": version}],
    }


def projection(feed: StatusFeed | None = None) -> Projection:
    """`feed` (the SSE clients of this process) is woken once a change is committed."""

    async def created(event: RecordedEvent, unit: ProjectionUnit) -> None:
        tid = event.payload["transaction_id"]
        if await unit.get_document(TRANSACTIONS, tid) is None:
            doc = new_document(event)
            unit.put_document(TRANSACTIONS, tid, doc)
            if feed is not None:
                _wake(unit, tid, doc)

    async def fact(event: RecordedEvent, unit: ProjectionUnit) -> None:
        p = event.payload
        tid = p["transaction_id"]
        doc = await unit.get_document(TRANSACTIONS, tid)
        version = event.stream_version
        if doc is None or doc["version"] >= version:
            return  # its creation is not projected (cannot happen in one log) or a replay
        before = doc["status"]
        kind = event.type
        recorded = _RECORDS.get(kind)
        if recorded is not None:
            doc[recorded] = p[recorded]
        elif kind == "TransactionCompleted":
            # Empty in older logs (FulfilmentRecorded said the order) and when recorded
            # before (an orchestrated sale's PaymentRecorded, ReservationRecorded).
            for field in ("order_id", "payment_id", "reservation_id"):
                if p.get(field):
                    doc[field] = p[field]
            doc["status"] = _COMPLETED
        elif kind == "TransactionCancelled":
            doc["status"] = _CANCELLED
        after = _status(doc)
        at = event.occurred_at.isoformat()
        if after != before:
            history: list[dict[str, Any]] = doc["history"]
            # Facts can arrive out of order (a reservation reported before the payment):
            # each step of the happy path needs the one before it.
            first, last = _HAPPY_STEP.get(before), _HAPPY_STEP.get(after)
            passed = _HAPPY[first + 1:last] if first is not None and last is not None else []
            for status in (*passed, after):
                if history[-1]["status"] != status:
                    history.append({"status": status, "at": at, "version": version})
        doc["status"], doc["version"], doc["updated_at"] = after, version, at
        unit.put_document(TRANSACTIONS, tid, doc)
        if feed is not None:
            _wake(unit, tid, doc)

    def _wake(unit: ProjectionUnit, tid: str, doc: dict[str, Any]) -> None:
        if feed is None:
            return
        # The clients get this change as it is now (a later event of the same batch changes
        # the document in place), and need not read it back; a client that starts following
        # the sale later (its stream, right after the sale's creation) starts from it too.
        state = {**doc, "history": list(doc["history"])}
        unit.after_commit(lambda: feed.changed(tid, state))

    facts = (
        "PaymentRecorded", "ReservationRecorded", "FulfilmentRecorded", "CompensationStarted",
        "RefundRecorded", "ReleaseRecorded", "TransactionCompleted", "TransactionCancelled",
    )
    handlers = {"TransactionCreated": created, **dict.fromkeys(facts, fact)}

    async def elsewhere(store: EventStore, events: list[RecordedEvent]) -> None:
        """Another process of this service projected these: wake this process's clients of
        those sales too (with several transaction processes behind the gateway, a client's
        stream is on any of them)."""
        if feed is None:
            return
        reached: dict[str, int] = {}
        for e in events:
            if e.type in handlers:
                tid = e.payload["transaction_id"]
                reached[tid] = max(reached.get(tid, 0), e.stream_version)
        for tid, version in reached.items():
            if feed.watched:
                doc = await store.get_document(TRANSACTIONS, tid)
                if doc is not None:
                    feed.changed(tid, doc)
                    continue
            feed.changed(tid, version=version)

    return Projection(NAME, handlers, (TRANSACTIONS,), elsewhere=elsewhere, inline=True)
