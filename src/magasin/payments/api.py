"""Payment's HTTP queries: list and read payments from the read model (one payment is
replayed from its stream when the read model lags it)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from magasin.api.paging import Cursor, Limit, Page, page_of
from magasin.eventstore.store import EventStore
from magasin.payments.domain import Payment
from magasin.payments.projection import PAYMENTS, Doc, replayed
from magasin.service import ServiceContext
from magasin.shared.errors import NotFound
from magasin.shared.ids import stream_id

Status = Literal["CAPTURED", "FAILED", "REFUNDED"]
Ident = Annotated[str, Path(min_length=1, max_length=100)]


class Reconciled(BaseModel):
    """A charge the bank approved for this failed payment, found by reconciliation."""

    action: Literal["refunded", "recorded"]
    """`refunded` by the reconciler, or `recorded`: the bank had given it back already."""
    amount: int
    bank_reference: str
    refund_reference: str
    at: str


class PaymentView(BaseModel):
    payment_id: str
    transaction_id: str
    store_id: str
    status: Status
    amount: int
    """Cents."""
    currency: str
    bank_reference: str | None
    refund_reference: str | None
    reason: str | None
    """Why the payment failed or was refunded."""
    updated_at: str
    reconciled: Reconciled | None = None


async def current(store: EventStore, transaction_id: str) -> Doc | None:
    """The payment as its stream has it now (seed 6.2.2): the read model's document when it
    is up to date, else the stream's events folded as the projection will fold them, so a
    client that was just told a sale's outcome reads the payment behind it, whatever the
    projection's lag. None: no payment for that sale (yet)."""
    doc = await store.get_document(PAYMENTS, transaction_id)
    stream = stream_id(Payment.stream_type, transaction_id)
    if doc is not None and doc.get("version", 0) >= await store.stream_version(stream):
        return doc
    return replayed(await store.read_stream(stream))


def router(ctx: ServiceContext) -> APIRouter:
    api = APIRouter(prefix="/api/payments", tags=["payments"])

    @api.get("", response_model=Page[PaymentView])
    async def list_payments(
        limit: Limit = 50,
        cursor: Cursor = None,
        transaction_id: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
        status: Status | None = None,
        store_id: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
    ) -> Page[PaymentView]:
        """Payments in transaction id order (creation order), optionally filtered."""
        where: dict[str, str | int | bool] = {}
        if transaction_id is not None:
            where["transaction_id"] = transaction_id
        if status is not None:
            where["status"] = status
        if store_id is not None:
            where["store_id"] = store_id
        items, next_cursor = await page_of(ctx.store, PAYMENTS, where, cursor, limit)
        return Page[PaymentView](
            items=[PaymentView.model_validate(item) for item in items], next_cursor=next_cursor
        )

    @api.get("/{transaction_id}", response_model=PaymentView)
    async def get_payment(transaction_id: Ident) -> PaymentView:
        body = await current(ctx.store, transaction_id)
        if body is None:
            raise NotFound(f"no payment for transaction {transaction_id}")
        return PaymentView.model_validate(body)

    return api
