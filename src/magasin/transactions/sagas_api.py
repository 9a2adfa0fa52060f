"""HTTP API of stuck sagas: list sagas by state and age of their current step, and force the
compensation of one (admin key only)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from magasin.api.auth import AdminKey
from magasin.api.paging import Cursor, Limit, Page, cursor_of, key_of
from magasin.eventstore.store import EventStore
from magasin.service import ServiceContext
from magasin.shared.clock import utcnow
from magasin.shared.errors import NotFound
from magasin.transactions import sagas
from magasin.transactions.deadlines import Deadlines, due_of
from magasin.transactions.domain import Status
from magasin.transactions.orchestrator import handlers as orchestration


class Orchestrator(BaseModel):
    """Where the orchestrator of an orchestrated sale stands (its own decisions)."""

    step: str | None
    """The step it waits on (`payment`, `reservation`, `fulfilment`, `compensation`); None
    once it ended."""
    pending_command: str | None
    """The command it sent and waits for the reply to (`ReserveStock`, `RefundPayment`...)."""
    command_id: str | None
    outcome: str | None
    """COMPLETED or CANCELLED once it ended."""


class Saga(BaseModel):
    transaction_id: str
    mode: str = "choreography"
    """The coordination that runs it: `choreography` or `orchestration`."""
    store_id: str
    status: Status
    step: str | None
    """What the saga waits for (a choreographed one: `order`, its order prepared after its
    payment and reservation; an orchestrated one: `payment`, `reservation`, `fulfilment`;
    either: `compensation` while CANCELLING, its refund and release); None once it ended."""
    step_started_at: str
    age_s: float
    """Seconds since the current step (or the last retry of the compensation) started."""
    created_at: str
    reason: str | None
    attempts: int = 0
    """Times its compensation was asked for again after not finishing in time."""
    stuck: bool = False
    """Its compensation's retries are spent and it is still not confirmed (alerted):
    look at the payment and inventory dead letters, then force it."""
    due_at: str | None = None
    """When the deadline loop acts on it next (aborts it, or retries its compensation)."""
    orchestrator: Orchestrator | None = None
    """For an orchestrated sale, the orchestrator's current step and pending command."""


class Compensation(BaseModel):
    transaction_id: str
    status: Status
    reason: str
    aborted_step: str
    """The step given up, or `compensation` when a compensating saga was asked again."""
    attempt: int = 0
    """For a retried compensation, which retry this is."""


async def _saga(store: EventStore, doc: dict[str, Any], now: datetime) -> Saga:
    age = (now - datetime.fromisoformat(doc["step_started_at"])).total_seconds()
    mode = doc.get("mode") or "choreography"
    orchestrator = None
    if mode == "orchestration":
        state = await store.get_document(orchestration.STATE, doc["transaction_id"])
        if state is not None:
            orchestrator = Orchestrator(
                step=state["step"], pending_command=state["pending_command"],
                command_id=state["command_id"], outcome=state["outcome"],
            )
    return Saga(
        transaction_id=doc["transaction_id"], mode=mode, orchestrator=orchestrator,
        store_id=doc["store_id"], status=doc["status"],
        step=doc["step"], step_started_at=doc["step_started_at"], age_s=round(age, 3),
        created_at=doc["created_at"], reason=doc.get("reason"),
        attempts=doc.get("attempts", 0), stuck=doc.get("stuck", False),
        due_at=due_of(doc["due_key"]).isoformat() if doc.get("due_key") else None,
    )


def router(ctx: ServiceContext, clock: Callable[[], datetime] = utcnow) -> APIRouter:
    store = ctx.store
    deadlines = Deadlines.of(ctx.settings)
    api = APIRouter(prefix="/api/sagas", tags=["sagas"])

    @api.get("")
    async def list_sagas(
        limit: Limit = 100,
        cursor: Cursor = None,
        state: Annotated[Status | None, Query(description="Only sagas in this status.")] = None,
        older_than: Annotated[float | None, Query(
            ge=0, description="Only sagas whose current status is at least this old, seconds."
        )] = None,
        stuck: Annotated[bool | None, Query(
            description="Only sagas whose compensation is (true) or is not (false) stuck."
        )] = None,
    ) -> Page[Saga]:
        """Sagas in transaction-id order, with their current step and its age. With
        `older_than`, a page may hold fewer than `limit` items: follow `next_cursor`.
        `?state=CANCELLING` lists the compensations under way, their retries and whether
        they are stuck."""
        where: dict[str, str | int | bool] = {"status": state.value} if state else {}
        if stuck is not None:
            where["stuck"] = stuck
        rows = await store.find_documents(
            sagas.SAGAS, where=where, after_key=key_of(sagas.SAGAS, cursor), limit=limit + 1
        )
        more = len(rows) > limit
        rows = rows[:limit]
        now = clock()
        items = [await _saga(store, doc, now) for _, doc in rows]
        if older_than is not None:
            items = [s for s in items if s.age_s >= older_than]
        return Page(items=items,
                    next_cursor=cursor_of(sagas.SAGAS, rows[-1][0] if more and rows else None))

    @api.get("/{transaction_id}")
    async def get_saga(transaction_id: str) -> Saga:
        doc = await store.get_document(sagas.SAGAS, transaction_id)
        if doc is None:
            raise NotFound(f"no saga {transaction_id}")
        return await _saga(store, doc, clock())

    @api.post("/{transaction_id}/compensate", status_code=202)
    async def compensate(transaction_id: str, _: AdminKey) -> Compensation:
        """Give up the saga at its current step and compensate it (refund, release) as a
        passed deadline would, with reason `forced`; a saga already compensating (stuck or
        not) has its compensation asked for again at once. 409 when it ended already;
        403 without an admin key."""
        sale, retried = await sagas.force(store, transaction_id, deadlines)
        assert sale.failure is not None
        return Compensation(
            transaction_id=sale.id, status=sale.status, reason=sale.failure,
            aborted_step="compensation" if retried else str(sale.aborted_step),
            attempt=sale.compensation_attempts if retried else 0,
        )

    return api
