"""HTTP API of stuck sagas: list sagas by state and age of their current step, and force the
compensation of one (admin key only)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from magasin.api.auth import AdminKey
from magasin.api.paging import Cursor, Limit, Page
from magasin.service import ServiceContext
from magasin.shared.clock import utcnow
from magasin.shared.errors import NotFound
from magasin.transactions import sagas
from magasin.transactions.domain import Status


class Saga(BaseModel):
    transaction_id: str
    store_id: str
    status: Status
    step: str | None
    """What the saga waits for (`payment`, `reservation`, `fulfilment`); None once it
    compensates or ended."""
    step_started_at: str
    age_s: float
    """Seconds since the current status was entered."""
    created_at: str
    reason: str | None


class Compensation(BaseModel):
    transaction_id: str
    status: Status
    reason: str
    aborted_step: str


def _saga(doc: dict[str, Any], now: datetime) -> Saga:
    age = (now - datetime.fromisoformat(doc["step_started_at"])).total_seconds()
    return Saga(
        transaction_id=doc["transaction_id"], store_id=doc["store_id"], status=doc["status"],
        step=doc["step"], step_started_at=doc["step_started_at"], age_s=round(age, 3),
        created_at=doc["created_at"], reason=doc.get("reason"),
    )


def router(ctx: ServiceContext, clock: Callable[[], datetime] = utcnow) -> APIRouter:
    store = ctx.store
    api = APIRouter(prefix="/api/sagas", tags=["sagas"])

    @api.get("")
    async def list_sagas(
        limit: Limit = 100,
        cursor: Cursor = None,
        state: Annotated[Status | None, Query(description="Only sagas in this status.")] = None,
        older_than: Annotated[float | None, Query(
            ge=0, description="Only sagas whose current status is at least this old, seconds."
        )] = None,
    ) -> Page[Saga]:
        """Sagas in transaction-id order, with their current step and its age. With
        `older_than`, a page may hold fewer than `limit` items: follow `next_cursor`."""
        where: dict[str, str | int | bool] = {"status": state.value} if state else {}
        rows = await store.find_documents(
            sagas.SAGAS, where=where, after_key=cursor, limit=limit + 1
        )
        more = len(rows) > limit
        rows = rows[:limit]
        now = clock()
        items = [_saga(doc, now) for _, doc in rows]
        if older_than is not None:
            items = [s for s in items if s.age_s >= older_than]
        return Page(items=items, next_cursor=rows[-1][0] if more and rows else None)

    @api.get("/{transaction_id}")
    async def get_saga(transaction_id: str) -> Saga:
        doc = await store.get_document(sagas.SAGAS, transaction_id)
        if doc is None:
            raise NotFound(f"no saga {transaction_id}")
        return _saga(doc, clock())

    @api.post("/{transaction_id}/compensate", status_code=202)
    async def compensate(transaction_id: str, _: AdminKey) -> Compensation:
        """Give up the saga at its current step and compensate it (refund, release) as a
        passed deadline would, with reason `forced`. 409 when it compensates or ended
        already; 403 without an admin key."""
        sale = await sagas.abort(store, transaction_id, "forced", actor="admin")
        assert sale.aborted_step is not None
        return Compensation(
            transaction_id=sale.id, status=sale.status, reason="forced",
            aborted_step=sale.aborted_step,
        )

    return api
