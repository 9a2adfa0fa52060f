"""Stuck sagas: an index of where each saga waits and since when, the loop that compensates
the ones past their step's deadline, and the command that aborts one (deadline or admin).

The index is a projection (consumer `transaction.sagas`) of the transaction's own events:

- `transaction.sagas/<transaction id>`: status, current step, when that step started;
- `transaction.saga_deadlines/<due micros>:<transaction id>`: one entry per waiting saga,
  keyed by the moment its step is due, so the loop reads only the head of the index that
  is due (never every saga) and stops at the first entry in the future.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import Causation, EventStore, UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.clock import utcnow
from magasin.shared.errors import ConcurrencyError, Conflict, NotFound
from magasin.shared.messages import RecordedEvent
from magasin.transactions.deadlines import Deadlines, due_key, due_of
from magasin.transactions.domain import Transaction

log = logging.getLogger("magasin.transactions.sagas")

SAGAS = "transaction.sagas"
DEADLINES = "transaction.saga_deadlines"
CONSUMER = "transaction.sagas"
PAGE = 100
ATTEMPTS = 10
"""Tries of an abort that keeps losing version races with the saga's own handlers."""

Clock = Callable[[], datetime]
sales = Repository(Transaction)

INDEXED = (
    "TransactionCreated", "PaymentRecorded", "ReservationRecorded", "FulfilmentRecorded",
    "CompensationStarted", "TransactionCompleted",
    "TransactionCancelled",
)
"""The transaction's own events after which its status (hence its step) may change."""


def index_handlers(deadlines: Deadlines) -> dict[str, Handler]:
    """Consumer `transaction.sagas`: keeps the saga index in step with the aggregate."""

    async def index(event: RecordedEvent, uow: UnitOfWork) -> None:
        tid = event.payload["transaction_id"]
        sale = await sales.find(uow, tid)
        if sale is None:
            raise NotFound(f"no transaction {tid}")
        doc = await uow.get_document(SAGAS, tid)
        step = sale.step if not sale.status.terminal else None
        status = sale.status.value
        if doc is not None and (doc["status"], doc["step"]) == (status, step):
            return  # a redelivery, or an event that changed no status
        at = event.occurred_at.isoformat()
        if doc is None:
            doc = {"transaction_id": tid, "store_id": sale.store_id, "created_at": at,
                   "due_key": None}
        if doc["due_key"] is not None:
            uow.delete_document(DEADLINES, doc["due_key"])
        key = None
        if step is not None:
            # The step started when the event that led to it occurred (not when this
            # projection caught up), so a lagging index never extends a deadline.
            key = due_key(deadlines.due_at(step, event.occurred_at), tid)
            uow.put_document(DEADLINES, key, {"transaction_id": tid, "step": step})
        doc.update(status=status, step=step, step_started_at=at, due_key=key,
                   reason=sale.failure, version=sale.version)
        uow.put_document(SAGAS, tid, doc)

    return dict.fromkeys(INDEXED, index)


async def abort(
    store: EventStore,
    transaction_id: str,
    reason: str,
    step: str | None = None,
    actor: str = "deadline",
) -> Transaction:
    """Give up the saga at its current step (only at `step`, when given) and start its
    compensation. Raises NotFound for an unknown sale and Conflict when there is nothing
    to abort (it compensates already, ended, or moved past `step`)."""
    causation = Causation(
        correlation_id=transaction_id, metadata={"service": "transaction", "actor": actor}
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with store.transaction(causation) as uow:
                sale = await sales.get(uow, transaction_id)
                if not sale.abort(reason, step):
                    raise Conflict(
                        f"transaction {transaction_id} is {sale.status}: "
                        + (f"not waiting for its {step}" if step else "nothing to compensate")
                    )
                sales.save(uow, sale)
            return sale
        except ConcurrencyError:
            # A saga step landed meanwhile: decide again on the fresh state.
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def abort_overdue(store: EventStore, now: datetime) -> int:
    """Abort every saga whose current step is due at `now`; returns how many were aborted.

    Reads the deadline index in due order and stops at the first entry not due yet. An
    entry the projection has not caught up with (the saga moved on, or was aborted
    already) changes nothing and goes once the projection sees the saga's new step.
    """
    aborted = 0
    after: str | None = None
    while True:
        rows = await store.find_documents(DEADLINES, after_key=after, limit=PAGE)
        for key, entry in rows:
            if due_of(key) > now:
                return aborted
            tid, step = entry["transaction_id"], entry["step"]
            try:
                await abort(store, tid, f"deadline:{step}", step)
            except (Conflict, NotFound):
                continue
            aborted += 1
            log.warning("saga %s passed its %s deadline: compensating it", tid, step)
        if len(rows) < PAGE:
            return aborted
        after = rows[-1][0]


def deadline_loop(
    store: EventStore, every_s: float, clock: Clock = utcnow
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop (for `Service.loops`) aborting overdue sagas every `every_s`."""

    async def loop() -> None:
        while True:
            try:
                await abort_overdue(store, clock())
            except Exception:
                # A broken sweep must not stop the next one (the database may come back).
                log.exception("saga deadline sweep failed")
            await asyncio.sleep(every_s)

    return loop
