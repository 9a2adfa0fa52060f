"""The historical projector (seed 6.4.2): read models as they were at a past moment,
computed by replaying the log up to that moment rather than read from the live tables.

A transaction's view has the fields and shape of the live read model; its history's times
are those of the events (the live model stamps the moment it projected them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query

from magasin.eventstore.store import EventFilter, EventStore
from magasin.inventory.projection import STOCK_EVENTS, empty_line, move, stock_moves
from magasin.shared.events import SCHEMAS
from magasin.shared.ids import stream_id
from magasin.shared.messages import RecordedEvent
from magasin.transactions.domain import HAPPY_PATH, Status, Transaction

PAGE = 1000
SOURCE = "X-Magasin-Source"
"""Response header saying where a read came from: `read-model` or `replay`."""

AsOf = Annotated[datetime | None, Query(
    alias="asOf", description="ISO-8601 moment: answer as the read model was then, replayed "
    "from the log (UTC when no zone is given).")]


def page(
    rows: list[dict[str, Any]], key: str, where: dict[str, str | None], cursor: str | None,
    limit: int, descending: bool = False,
) -> dict[str, Any]:
    """A page of rows sorted by `key`, those matching `where` (None = any), after `cursor`
    (`descending`: the other way round, the page going on below `cursor`)."""
    if descending:
        rows = sorted(rows, key=lambda r: r[key], reverse=True)
    kept = [r for r in rows if all(v is None or r.get(f) == v for f, v in where.items())
            and (cursor is None or (r[key] < cursor if descending else r[key] > cursor))]
    more = len(kept) > limit
    kept = kept[:limit]
    return {"items": kept, "next_cursor": kept[-1][key] if more else None}


def utc(moment: datetime) -> datetime:
    """An `asOf` given without a time zone is read as UTC, the zone of every stored time."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def scan(store: EventStore, where: EventFilter) -> AsyncIterator[RecordedEvent]:
    """Every event matching `where`, in log order."""
    after = 0
    while True:
        page = await store.read_events(where, after=after, limit=PAGE)
        for event in page:
            yield event
        if len(page) < PAGE:
            return
        after = page[-1].global_position


async def streams(
    store: EventStore, aggregate: str, as_of: datetime
) -> dict[str, list[RecordedEvent]]:
    """The events of every stream of one aggregate type that occurred by `as_of`."""
    found: dict[str, list[RecordedEvent]] = {}
    async for event in scan(store, EventFilter(aggregates=(aggregate,), until=as_of)):
        found.setdefault(event.stream_id, []).append(event)
    return found


def transaction_view(ident: str, events: Iterable[RecordedEvent]) -> dict[str, Any] | None:
    """The read-model document of a transaction after `events` (its stream, in order)."""
    sale = Transaction(ident)
    history: list[dict[str, Any]] = []
    first = last = None
    for event in events:
        before = sale.status
        sale.apply(SCHEMAS.validate(event))
        sale.version = event.stream_version
        after = sale.status
        first = first or event
        last = event
        entered: list[Status] = []
        if not history:
            entered = [Status.PENDING] if after is Status.PENDING else [Status.PENDING, after]
        elif after != before:
            if before in HAPPY_PATH and after in HAPPY_PATH:
                entered += HAPPY_PATH[HAPPY_PATH.index(before) + 1:HAPPY_PATH.index(after)]
            entered.append(after)
        at = event.occurred_at.isoformat()
        history += [{"status": s.value, "at": at, "version": sale.version} for s in entered]
    if first is None or last is None:
        return None
    return {
        "transaction_id": sale.id,
        "store_id": sale.store_id,
        "customer_id": sale.customer_id,
        "lines": [{"product_id": li.product_id, "quantity": li.quantity,
                   "unit_price": li.unit_price} for li in sale.lines],
        "total": sale.total,
        "currency": sale.currency,
        "payment_method": sale.payment_method,
        "callback_url": sale.callback_url,
        "status": sale.status.value,
        "reason": sale.failure,
        "payment_id": sale.payment_id,
        "reservation_id": sale.reservation_id,
        "order_id": sale.order_id,
        "version": sale.version,
        "created_at": first.occurred_at.isoformat(),
        "updated_at": last.occurred_at.isoformat(),
        "history": history,
    }


async def transaction_as_of(
    store: EventStore, transaction_id: str, as_of: datetime
) -> dict[str, Any] | None:
    """One transaction as the read model showed it at `as_of` (None: it did not exist)."""
    key = stream_id(Transaction.stream_type, transaction_id)
    return transaction_view(transaction_id, await store.read_stream(key, until=as_of))


async def transactions_as_of(store: EventStore, as_of: datetime) -> list[dict[str, Any]]:
    """Every transaction that existed at `as_of`, by id."""
    found = await streams(store, Transaction.stream_type, as_of)
    views = (transaction_view(key.split("-", 1)[1], events) for key, events in found.items())
    return sorted((v for v in views if v is not None), key=lambda v: v["transaction_id"])


async def stock_as_of(
    store: EventStore, as_of: datetime, store_id: str | None = None
) -> list[dict[str, Any]]:
    """Stock lines (one per store and product) at `as_of`, by store then product: the
    stock items' events and the reservations' commits, folded as the live projection
    folds them."""
    lines: dict[str, dict[str, Any]] = {}
    async for event in scan(store, EventFilter(types=STOCK_EVENTS, until=as_of)):
        for store_of, product_id, on_hand, reserved in stock_moves(event):
            key = f"{store_of}:{product_id}"
            line = lines.get(key) or lines.setdefault(key, empty_line(store_of, product_id))
            move(line, on_hand, reserved)
    found = [line for line in lines.values() if store_id is None or line["store_id"] == store_id]
    return sorted(found, key=lambda line: (line["store_id"], line["product_id"]))


async def state_as_of(store: EventStore, as_of: datetime) -> dict[str, Any]:
    """What the read models showed at `as_of`: every transaction and every stock line."""
    transactions = await transactions_as_of(store, as_of)
    return {
        "as_of": as_of.isoformat(),
        "transactions": [
            {key: view[key] for key in (
                "transaction_id", "store_id", "customer_id", "status", "reason", "total",
                "currency", "version", "updated_at")}
            for view in transactions
        ],
        "stock": await stock_as_of(store, as_of),
    }
