"""Saves a sale together with its saga index, deadline entry, stuck entry and saga metrics,
in the one unit of work that stages the sale's events: the index is in step with the sale
the moment it commits, and the service never hears its own events back to keep it.

Every place that saves a Transaction saves it through `save` (the saga handlers, the API's
creation, the deadline loop's and the operators' decisions, orchestrated or not). Documents:

- `transaction.sagas/<transaction id>`: status, mode, what the saga waits for (`compensation`
  while CANCELLING), when that step started, compensation retries, stuck or not;
- `transaction.sagas_stuck/<transaction id>`: the sagas reported stuck (a small collection,
  so the metric sampler counts them without reading every saga);
- `transaction.saga_deadlines/<due micros>:<transaction id>`: one entry per waiting saga,
  keyed by the moment its step is due, so the deadline loop reads only the due head;
- the saga metrics' documents (`observability.sagas`: in flight by step, finished sagas),
  with their counters bumped after the commit.

A step is dated from the `occurred_at` of the staged event that started it, so a deadline
is never extended by a slow commit or a late reader. A save that stages nothing (a
redelivery, an event that changes nothing) writes nothing.

The index document a save starts from is the one this process last committed for the sale
when it was written at the version the sale is saved from (`_Written`); it is read only
otherwise. That is exact: the document is written together with events of the sale's
stream (or by `repair`, only while it is behind the stream, which a document written at
the stream's version is not), so while the stream stands at that version nothing else
wrote it, and the commit, which expects that version, fails if something did meanwhile.
A sale being created has no index document: none is read.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from datetime import datetime
from typing import Any

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.observability import sagas as saga_metrics
from magasin.observability.sagas import STUCK
from magasin.shared.messages import NewEvent
from magasin.transactions import tags
from magasin.transactions.deadlines import Deadlines, due_key
from magasin.transactions.domain import Status, Transaction

SAGAS = "transaction.sagas"
DEADLINES = "transaction.saga_deadlines"
DEFAULT_DEADLINES = Deadlines()

INDEXED = frozenset({
    "TransactionCreated", "PaymentRecorded", "ReservationRecorded", "FulfilmentRecorded",
    "CompensationStarted", "SagaAborted", "CompensationStalled", "TransactionCompleted",
    "TransactionCancelled",
})
"""The transaction's own events after which its status (hence its step) may change."""

sales = Repository(Transaction)

WRITTEN_KEPT = 10_000
"""Index documents of the sales this process saved last, kept to start their next save."""


class _Written:
    """The index documents this process committed last, by transaction id (most recent
    last), each with the sale's version it was written at (its `version` field)."""

    def __init__(self) -> None:
        self.docs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def at(self, tid: str, version: int) -> dict[str, Any] | None:
        doc = self.docs.get(tid)
        return dict(doc) if doc is not None and doc["version"] == version else None

    def keep(self, tid: str, doc: dict[str, Any]) -> None:
        self.docs[tid] = doc
        self.docs.move_to_end(tid)
        if len(self.docs) > WRITTEN_KEPT:
            self.docs.popitem(last=False)


_written: weakref.WeakKeyDictionary[EventStore, _Written] = weakref.WeakKeyDictionary()


def _written_of(store: EventStore) -> _Written:
    written = _written.get(store)
    if written is None:
        written = _written[store] = _Written()
    return written


async def save(
    uow: UnitOfWork, sale: Transaction, deadlines: Deadlines = DEFAULT_DEADLINES
) -> list[NewEvent]:
    """Stage the sale's pending events (expecting the version it was loaded at), carrying
    its routing tags (tags.py), and bring its saga index, deadline, stuck entry and metrics
    in step with them; returns the staged events."""
    tags.stamp(uow, sale)
    staged = sales.save(uow, sale)
    started = [e for e in staged if e.type in INDEXED]
    if started:
        # Several indexed events in one save (SagaAborted then CompensationStarted, say):
        # the step the sale is at now began with the last one.
        created = any(e.type == "TransactionCreated" for e in staged)
        await _index(uow, sale, started[-1].occurred_at, created, deadlines,
                     loaded_at=sale.version - len(staged))
    return staged


async def _index(
    uow: UnitOfWork, sale: Transaction, at: datetime, created: bool, deadlines: Deadlines,
    loaded_at: int,
) -> None:
    tid = sale.id
    written = _written_of(uow.store)
    doc = None if created else written.at(tid, loaded_at)
    if doc is None and not created:
        doc = await uow.get_document(SAGAS, tid)
    step = sale.waits_for
    status = sale.status.value
    # A stuck saga that ends after all (a requeued dead letter) is no longer stuck.
    attempts, stuck = sale.compensation_attempts, sale.stalled and step is not None
    if doc is not None and (
        doc["status"], doc["step"], doc.get("attempts", 0), doc.get("stuck", False)
    ) == (status, step, attempts, stuck):
        return  # an event that changed no status (a second CompensationStarted, say)
    before: str | None = None if doc is None else doc["status"]
    since = at.isoformat()
    if doc is None:
        begun = at if created else await _created_at(uow, sale, at)
        doc = {"transaction_id": tid, "store_id": sale.store_id, "created_at": begun.isoformat(),
               "due_key": None, "mode": sale.saga_mode}
    if doc["due_key"] is not None:
        uow.delete_document(DEADLINES, doc["due_key"])
    key = None
    if step is not None and not stuck:
        key = due_key(deadlines.due_at(step, at, attempts), tid)
        uow.put_document(DEADLINES, key, {"transaction_id": tid, "step": step,
                                          "attempt": attempts})
    if stuck:
        uow.put_document(STUCK, tid, {"transaction_id": tid, "status": status,
                                      "attempts": attempts, "since": since})
    elif doc.get("stuck"):
        uow.delete_document(STUCK, tid)
    doc.update(status=status, step=step, step_started_at=since, due_key=key, mode=sale.saga_mode,
               reason=sale.failure, version=sale.version, attempts=attempts, stuck=stuck)
    uow.put_document(SAGAS, tid, doc)
    kept = dict(doc)
    uow.after_commit(lambda: written.keep(tid, kept))
    _count(uow, sale, doc, before, at, created)


def _count(
    uow: UnitOfWork, sale: Transaction, doc: dict[str, Any], before: str | None,
    at: datetime, created: bool,
) -> None:
    """The saga metrics of this change of status."""
    status = sale.status
    if created:
        saga_metrics.started(uow, sale.id, sale.saga_mode, status.value)
    elif status.terminal:
        if before is None or not Status(before).terminal:
            saga_metrics.ended(
                uow, sale.id, completed=status is Status.COMPLETED, mode=sale.saga_mode,
                started_at=datetime.fromisoformat(doc["created_at"]), ended_at=at,
                store_id=sale.store_id,
                reason=sale.failure if status is Status.CANCELLED else None,
            )
    elif status.value != before:
        saga_metrics.moved(uow, sale.id, status.value)


async def _created_at(uow: UnitOfWork, sale: Transaction, default: datetime) -> datetime:
    """When a sale indexed for the first time long after its creation began (one begun
    before the index existed): its stream's first event says."""
    first = await uow.read_stream(sales.stream(sale.id), to_version=1)
    return first[0].occurred_at if first else default


async def repair(
    store: EventStore, transaction_id: str, entry_key: str,
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> None:
    """After the sale refused what a deadline entry asked: drop the entry if the index no
    longer points at it, and bring in step an index that is behind the sale (one left by
    the consumer that kept the index before issue 11, stopped short of the sale's last
    events), dated from the last indexed event of its stream."""
    async with store.transaction() as uow:
        doc = await uow.get_document(SAGAS, transaction_id)
        sale = await sales.find(uow, transaction_id)
        if sale is None or doc is None or doc.get("due_key") != entry_key:
            uow.delete_document(DEADLINES, entry_key)
        if sale is None or (doc is not None and doc.get("version") == sale.version):
            return
        events = await uow.read_stream(sales.stream(transaction_id))
        indexed = [e for e in events if e.type in INDEXED]
        if indexed:
            await _index(uow, sale, indexed[-1].occurred_at, False, deadlines,
                         loaded_at=sale.version)
