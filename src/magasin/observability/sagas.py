"""Saga metrics from plain facts handed over by the service that runs the saga: started,
finished by outcome, duration, and the step each saga in flight is at — so the saga itself
knows nothing of metrics, and this package nothing of the saga's context.

The transaction service calls `started`, `moved` and `ended` in the unit of work that saves
the sale (see `transactions/saga_index.py`): one document per saga in flight (the step it
reached) keeps the active-by-step gauge right after a restart; counters are bumped only once
that unit of work commits, and a redelivered event that changes nothing calls none of them.
Each finished saga also leaves a small record keyed by the moment it ended (collection
`metrics.saga_ends`), from which rolling statistics over the last minutes are read
(`transactions/stats.py`) in any process, after any restart.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.observability import metrics
from magasin.shared.clock import to_micros

SERVICE = "transaction"
"""The service that runs the sagas and keeps these documents (the sampler reads them where
it runs). Until issue 11 its consumer `transaction.sagas` followed its own events to keep
them; the sale's unit of work writes them now."""
COLLECTION = "metrics.sagas"
"""One document per saga in flight: {step}."""
ENDS = "metrics.saga_ends"
"""One document per finished saga, keyed `<end micros, 20 digits>:<transaction id>` so a
time range is a key range: {transaction_id, store_id, status, reason, ended_at, duration_s}."""
SAGA = "transaction"
CHOREOGRAPHY = "choreography"
STUCK = "transaction.sagas_stuck"
"""Sagas whose compensation stays unconfirmed after its retries, kept by the transaction
service's saga index: {transaction_id, status, attempts, since}."""

STEPS = ("PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "CANCELLING")
"""The steps a saga in flight can be at (the `step` label of the active gauge)."""


def started(uow: UnitOfWork, saga_id: str, mode: str, step: str = STEPS[0]) -> None:
    """A saga begins (in `mode`: `choreography` or `orchestration`) at `step`."""
    moved(uow, saga_id, step)
    uow.after_commit(metrics.SAGAS_STARTED.labels(SAGA, mode or CHOREOGRAPHY).inc)


def moved(uow: UnitOfWork, saga_id: str, step: str) -> None:
    """A saga in flight reached `step`."""
    uow.put_document(COLLECTION, saga_id, {"step": step})


def ended(
    uow: UnitOfWork,
    saga_id: str,
    *,
    completed: bool,
    mode: str,
    started_at: datetime,
    ended_at: datetime,
    store_id: str | None = None,
    reason: str | None = None,
) -> None:
    """A saga finished, completed or compensated: it leaves the gauge, its record is kept for
    the rolling statistics, and it is counted and timed once the unit of work commits."""
    outcome = "completed" if completed else "compensated"
    mode = mode or CHOREOGRAPHY
    uow.delete_document(COLLECTION, saga_id)
    seconds = max(0.0, (ended_at - started_at).total_seconds())
    uow.put_document(ENDS, end_key(ended_at, saga_id), {
        "transaction_id": saga_id, "store_id": store_id,
        "status": "COMPLETED" if completed else "CANCELLED",
        "reason": reason, "ended_at": ended_at.isoformat(),
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
    for step in STEPS:
        metrics.SAGAS_ACTIVE.labels(SAGA, step).set(steps.get(step, 0))
