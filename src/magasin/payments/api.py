"""Payment's HTTP queries: list and read payments from the read model (one payment is
replayed from its stream when the read model lags it)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from magasin.api.paging import Cursor, Limit, Page, page_of
from magasin.payments.domain import Payment
from magasin.payments.projection import APPLIES, PAYMENTS, applied
from magasin.projections.current import current
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
        body = await current(ctx.store, PAYMENTS, transaction_id,
                             stream_id(Payment.stream_type, transaction_id), applied, APPLIES)
        if body is None:
            raise NotFound(f"no payment for transaction {transaction_id}")
        return PaymentView.model_validate(body)

    return api
