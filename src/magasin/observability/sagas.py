"""Saga metrics from the transaction's own events: started, finished by outcome, duration, and
the step each saga in flight is at — so the saga itself knows nothing of metrics.

The consumer reads the transaction stream's events (TransactionCreated, the saga's step
records, TransactionCompleted/Cancelled). It keeps one document per saga in flight (when it
started, the furthest step reached) so durations and the active-by-step gauge survive a
restart; counters are bumped only once the unit of work commits, and its inbox keeps a
redelivered event from counting twice. Each finished saga also leaves a small record keyed
by the moment it ended (collection `metrics.saga_ends`), from which rolling statistics over
the last minutes are read (`transactions/stats.py`) in any process, after any restart.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging.bus import Handler
from magasin.observability import metrics
from magasin.shared.clock import to_micros
from magasin.shared.commands import mode_of
from magasin.shared.messages import RecordedEvent

CONSUMER = "transaction.sagas"
"""The consumer running these handlers: the transaction service folds them into the
delivery of its saga index (one inbox mark, one commit for both; it was a consumer of its
own, `transaction.saga-metrics`, before issue 11)."""
COLLECTION = "metrics.sagas"
ENDS = "metrics.saga_ends"
"""One document per finished saga, keyed `<end micros, 20 digits>:<transaction id>` so a
time range is a key range: {transaction_id, store_id, status, reason, ended_at, duration_s}."""
SAGA = "transaction"
CHOREOGRAPHY = "choreography"
STUCK = "transaction.sagas_stuck"
"""Sagas whose compensation stays unconfirmed after its retries, kept by the transaction
service's saga index: {transaction_id, status, attempts, since}."""

# The saga's steps in the order the domain ranks its statuses: a saga only moves forward,
# so a step record delivered late never moves it back.
STEPS: dict[str, tuple[int, str]] = {
    "TransactionCreated": (0, "PENDING"),
    "PaymentRecorded": (1, "PAYMENT_PROCESSED"),
    "ReservationRecorded": (2, "INVENTORY_RESERVED"),
    "FulfilmentRecorded": (3, "FULFILLED"),
    "CompensationStarted": (4, "CANCELLING"),
}
OUTCOMES = {"TransactionCompleted": "completed", "TransactionCancelled": "compensated"}


def handlers() -> dict[str, Handler]:
    """Registry of the saga-metrics consumer."""
    table: dict[str, Handler] = {name: _on_step for name in STEPS}
    table.update({name: _on_end for name in OUTCOMES})
    return table


async def _on_step(event: RecordedEvent, uow: UnitOfWork) -> None:
    saga_id = str(event.payload["transaction_id"])
    rank, step = STEPS[event.type]
    doc = await uow.get_document(COLLECTION, saga_id)
    if event.type == "TransactionCreated":
        if doc is not None and doc.get("started_at"):
            return
        mode = mode_of(event) or CHOREOGRAPHY
        doc = {**(doc or {"rank": rank, "step": step}),
               "started_at": event.occurred_at.isoformat(), "mode": mode}
        uow.put_document(COLLECTION, saga_id, doc)
        uow.after_commit(metrics.SAGAS_STARTED.labels(SAGA, mode).inc)
        return
    if doc is None:
        # A step seen before the saga's start (a reordered delivery): remember the step;
        # the start fills in when it arrives.
        doc = {"rank": -1, "step": step, "started_at": None}
    if rank > int(doc["rank"]):
        uow.put_document(COLLECTION, saga_id, {**doc, "rank": rank, "step": step})


async def _on_end(event: RecordedEvent, uow: UnitOfWork) -> None:
    saga_id = str(event.payload["transaction_id"])
    outcome = OUTCOMES[event.type]
    doc = await uow.get_document(COLLECTION, saga_id)
    started: datetime | None = None
    mode: str | None = None
    if doc is not None:
        uow.delete_document(COLLECTION, saga_id)
        mode = doc.get("mode")
        if doc.get("started_at"):
            started = datetime.fromisoformat(str(doc["started_at"]))
    if started is None or mode is None:
        # A saga begun before this consumer (or its mode label) existed: its stream knows.
        first = await uow.read_stream(event.stream_id, to_version=1)
        started = started or (first[0].occurred_at if first else event.occurred_at)
        mode = (mode_of(first[0]) if first else None) or CHOREOGRAPHY
    seconds = max(0.0, (event.occurred_at - started).total_seconds())
    uow.put_document(ENDS, end_key(event.occurred_at, saga_id), {
        "transaction_id": saga_id, "store_id": event.payload.get("store_id"),
        "status": "COMPLETED" if outcome == "completed" else "CANCELLED",
        "reason": event.payload.get("reason"), "ended_at": event.occurred_at.isoformat(),
        "duration_s": round(seconds, 6),
    })

    def count() -> None:
        metrics.SAGAS_FINISHED.labels(SAGA, outcome, mode).inc()
        metrics.SAGA_DURATION.labels(SAGA, outcome, mode).observe(seconds)

    uow.after_commit(count)


def end_key(ended_at: datetime, saga_id: str) -> str:
    """Key of a finished saga's record: fixed-width microseconds, so keys sort by time."""
    return f"{to_micros(ended_at):020d}:{saga_id}"


async def active_by_step(store: EventStore) -> Counter[str]:
    """How many sagas are in flight at each step (the documents of sagas not finished)."""
    steps: Counter[str] = Counter()
    after: str | None = None
    while page := await store.find_documents(COLLECTION, after_key=after, limit=500):
        steps.update(str(doc["step"]) for _, doc in page)
        after = page[-1][0]
    return steps


async def stuck_by_state(store: EventStore) -> Counter[str]:
    """How many sagas are reported stuck, by their status."""
    states: Counter[str] = Counter()
    after: str | None = None
    while page := await store.find_documents(STUCK, after_key=after, limit=500):
        states.update(str(doc["status"]) for _, doc in page)
        after = page[-1][0]
    return states


def sample_stuck(states: Counter[str]) -> None:
    """Set the stuck-sagas gauge; CANCELLING reads 0 rather than vanish."""
    for state in {"CANCELLING", *states}:
        metrics.SAGAS_STUCK.labels(SAGA, state).set(states.get(state, 0))


def sample_active(steps: Counter[str]) -> None:
    """Set the active-sagas gauge; steps with no saga read 0 rather than vanish."""
    for _, step in STEPS.values():
        metrics.SAGAS_ACTIVE.labels(SAGA, step).set(steps.get(step, 0))
