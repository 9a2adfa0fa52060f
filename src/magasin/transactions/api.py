"""HTTP API of the transaction service: create a sale, read it, follow it live (SSE), watch
every sale live (SSE) and the rolling statistics of how sagas end."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Response
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from magasin.api.auth import STREAM_TOKEN_ALLOWED
from magasin.api.paging import Cursor, Limit, Order, Page, cursor_of, key_of, page_of
from magasin.api.sse import EventStream
from magasin.eventstore.repository import Repository
from magasin.eventstore.store import Causation, EventStore
from magasin.eventstore_service import history
from magasin.messaging.partitioning import configured_partitions, partition_metadata
from magasin.observability import tracing
from magasin.service import ServiceContext
from magasin.shared.errors import AlreadyProcessed, BusinessRuleViolation, Conflict, NotFound
from magasin.shared.events import SaleLine
from magasin.shared.ids import time_ordered_id
from magasin.transactions import readmodel, saga_index, stats
from magasin.transactions.deadlines import Deadlines
from magasin.transactions.domain import MAX_LINES, MAX_QUANTITY, Status, Transaction
from magasin.transactions.feed import RELOAD, StatusFeed
from magasin.transactions.orchestrator.routing import Routing
from magasin.transactions.projection import new_document

sales = Repository(Transaction)
IDEMPOTENCY = "transaction.idempotency_keys"
PATH = "/api/transactions"
SSE_HEARTBEAT_S = 15.0


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_id: str = Field(min_length=1, max_length=100)
    quantity: int = Field(ge=1, le=MAX_QUANTITY)


class NewTransaction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_id: str = Field(min_length=1, max_length=100)
    customer_id: str = Field(min_length=1, max_length=100)
    items: list[Item] = Field(min_length=1, max_length=MAX_LINES)
    payment_method: str = Field(min_length=1, max_length=40, examples=["VISA", "FAIL_CARD"])
    callback_url: AnyHttpUrl | None = Field(
        None, description="Receives a POST with the final state (COMPLETED or CANCELLED)."
    )


class Line(BaseModel):
    product_id: str
    quantity: int
    unit_price: int


class StatusChange(BaseModel):
    status: Status
    at: str
    version: int


class TransactionView(BaseModel):
    transaction_id: str
    store_id: str
    customer_id: str
    lines: list[Line]
    total: int = Field(description="Integer cents.")
    currency: str
    payment_method: str
    status: Status
    reason: str | None
    payment_id: str | None
    reservation_id: str | None
    order_id: str | None
    created_at: str
    updated_at: str
    version: int
    history: list[StatusChange]


VIEW_FIELDS = tuple(TransactionView.model_fields)


class SagaBucket(BaseModel):
    start: str
    completed: int
    cancelled: int
    per_s: float
    p50_ms: float | None
    p95_ms: float | None


class SagaStats(BaseModel):
    now: str
    window_s: int
    bucket_s: int
    store_id: str | None
    finished: int
    completed: int
    cancelled: int
    cancelled_by_reason: dict[str, int]
    per_s: float = Field(description="Sagas finished per second over the window.")
    p50_ms: float | None = Field(description="Median duration, creation to end.")
    p95_ms: float | None
    in_flight: dict[str, int] | None = Field(
        description="Sagas not finished, by the step they reached (all stores only).")
    buckets: list[SagaBucket]


CHOREOGRAPHY = Routing()


async def create(
    store: EventStore, body: NewTransaction, key: str | None, routing: Routing = CHOREOGRAPHY,
    deadlines: Deadlines = saga_index.DEFAULT_DEADLINES,
) -> tuple[dict[str, Any], bool]:
    """Price the sale from the catalog replica and record it. Returns (view, created).

    With an Idempotency-Key, the key is claimed in the same unit of work as the sale
    (through the inbox table, whose (consumer, id) pairs are unique), so two requests
    with one key create one sale; the second gets it back, unless its body differs.
    """
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest() if key else ""
    if key and (replay := await _replay(store, key, fingerprint)) is not None:
        return replay, False
    ident = time_ordered_id()
    # The store and every product in one read (distributed: one round trip, not 1 + lines).
    catalog = await store.get_documents([(readmodel.STORES, body.store_id)] + [
        (readmodel.PRODUCTS, item.product_id) for item in body.items])
    if (readmodel.STORES, body.store_id) not in catalog:
        raise BusinessRuleViolation(f"unknown store {body.store_id!r}")
    lines, currencies = [], set()
    for item in body.items:
        product = catalog.get((readmodel.PRODUCTS, item.product_id))
        if product is None:
            raise BusinessRuleViolation(f"unknown product {item.product_id!r}")
        currencies.add(product["currency"])
        lines.append(SaleLine(item.product_id, item.quantity, product["unit_price"]))
    if len(currencies) > 1:
        raise BusinessRuleViolation(f"products are priced in several currencies: {currencies}")
    total = sum(line.quantity * line.unit_price for line in lines)
    sale = Transaction.create(
        ident, store_id=body.store_id, customer_id=body.customer_id, lines=lines,
        currency=currencies.pop(), payment_method=body.payment_method,
        callback_url=str(body.callback_url) if body.callback_url else None,
        # Decided once: a changed setting leaves this sale to the coordination it started in.
        saga_mode=routing.mode_for(body.store_id, body.payment_method.strip(), total).value,
    )
    try:
        # The sale's trace starts at this HTTP request's span (when tracing is on).
        causation = Causation(correlation_id=ident, traceparent=tracing.current_traceparent(),
                              metadata={"service": "transaction", **partition_metadata(
                                  body.customer_id, configured_partitions())})
        async with store.transaction(causation) as uow:
            if key:
                uow.mark_processed(IDEMPOTENCY, key)
                uow.put_document(IDEMPOTENCY, key, {"transaction_id": ident,
                                                    "fingerprint": fingerprint})
            # A new aggregate is at version 0: the stream must not exist. Its saga index,
            # payment deadline and metrics are written with it.
            await saga_index.save(uow, sale, deadlines)
    except AlreadyProcessed:  # the same key, a moment earlier
        replay = await _replay(store, key or "", fingerprint)
        if replay is None:
            raise
        return replay, False
    # The read model is a projection that may lag: answer from what was just recorded.
    return new_document(uow.recorded[0]), True


async def _replay(store: EventStore, key: str, fingerprint: str) -> dict[str, Any] | None:
    claim = await store.get_document(IDEMPOTENCY, key)
    if claim is None:
        return None
    if claim["fingerprint"] != fingerprint:
        raise Conflict(f"Idempotency-Key {key!r} was used for a different request")
    tid = claim["transaction_id"]
    doc = await store.get_document(readmodel.TRANSACTIONS, tid)
    if doc is None:  # claimed and created a moment ago, not projected yet
        doc = new_document((await store.read_stream(sales.stream(tid), to_version=1))[0])
    return doc


async def current(
    store: EventStore, transaction_id: str, min_version: int = 0
) -> tuple[dict[str, Any] | None, str]:
    """The sale as its stream has it now, and where that came from (`read-model` or
    `replay`). Seed 6.2.2: the read model answers when it is up to date; when it has no row
    yet (a sale created a moment ago, its projection lagging) or a row older than the
    stream, the sale is rebuilt from its events instead, so that a client reads at once
    what it was just told exists (the `Location` of a `201`). None: no such sale."""
    doc = await store.get_document(readmodel.TRANSACTIONS, transaction_id)
    stream = sales.stream(transaction_id)
    if doc is not None and doc["version"] >= max(await store.stream_version(stream), min_version):
        return doc, "read-model"
    return history.transaction_view(transaction_id, await store.read_stream(stream)), "replay"


def router(ctx: ServiceContext, feed: StatusFeed) -> APIRouter:
    store = ctx.store
    routing = Routing.from_settings(ctx.settings.saga_mode, ctx.settings.saga_orchestrate)
    deadlines = Deadlines.of(ctx.settings)
    # Full paths, no prefix: the service includes the sagas' router in this one (see service.py).
    api = APIRouter(tags=["transactions"])

    @api.post(PATH, status_code=201, response_model=TransactionView,
              responses={200: {"description": "Replay of an Idempotency-Key."},
                         409: {"description": "Idempotency-Key reused for another request."}})
    async def create_transaction(
        body: NewTransaction,
        response: Response,
        idempotency_key: Annotated[
            str | None, Header(max_length=200, description="Retry-safe key.")
        ] = None,
    ) -> dict[str, Any]:
        """Record a sale; the saga then runs asynchronously (follow it at `.../events`)."""
        view, created = await create(store, body, idempotency_key, routing, deadlines)
        response.status_code = 201 if created else 200
        response.headers["Location"] = f"{PATH}/{view['transaction_id']}"
        return view

    @api.get(PATH, response_model=Page[TransactionView])
    async def list_transactions(
        limit: Limit = 50,
        cursor: Cursor = None,
        store_id: str | None = None,
        status: Status | None = None,
        customer_id: str | None = None,
        as_of: history.AsOf = None,
        order: Order = "asc",
    ) -> dict[str, Any]:
        """Sales by id, which is in creation order (`order=desc`: newest first)."""
        if as_of is not None:  # the list as it was then, replayed from the log
            # Same cursors as the read model's list: one list, seen at another moment.
            page = history.page(
                await history.transactions_as_of(store, history.utc(as_of)), "transaction_id",
                {"store_id": store_id, "status": status.value if status else None,
                 "customer_id": customer_id}, key_of(readmodel.TRANSACTIONS, cursor), limit,
                descending=order == "desc")
            return {**page, "next_cursor": cursor_of(readmodel.TRANSACTIONS, page["next_cursor"])}
        where: dict[str, str | int | bool] = {}
        if store_id:
            where["store_id"] = store_id
        if status:
            where["status"] = status.value
        if customer_id:
            where["customer_id"] = customer_id
        items, next_cursor = await page_of(
            store, readmodel.TRANSACTIONS, where, cursor, limit, order
        )
        return {"items": items, "next_cursor": next_cursor}

    @api.get(
        f"{PATH}/live",
        response_class=EventStream,
        openapi_extra=STREAM_TOKEN_ALLOWED,
        responses={200: {"content": {"text/event-stream": {}}, "description":
                         "`sale` events (a sale's document, at each change), `gone` when a "
                         "sale leaves the `status` filter, `reload` when the client fell "
                         "behind, `timeout` at the end."}},
    )
    async def watch_transactions(
        store_id: str | None = None,
        status: Status | None = None,
        customer_id: str | None = None,
        recent: Annotated[int, Query(
            ge=0, le=500, description="First send this many of the newest matching sales.")
        ] = 0,
        max_wait: Annotated[
            float, Query(alias="timeout", gt=0, le=86400, description="Seconds.")
        ] = 3600,
    ) -> EventStream:
        """Server-Sent Events: every change of every sale matching the filters, as it is
        committed; sales are sent whole (as `GET /api/transactions/{id}` answers)."""
        where: dict[str, str | int | bool] = {}
        if store_id:
            where["store_id"] = store_id
        if customer_id:
            where["customer_id"] = customer_id
        if status:
            where["status"] = status.value
        return EventStream(
            _live_stream(store, feed, where, recent, max_wait),
        )

    @api.get(f"{PATH}/stats", response_model=SagaStats)
    async def saga_stats(
        window: Annotated[int, Query(
            ge=10, le=stats.RETENTION_S, description="Seconds back from now.")] = 300,
        bucket: Annotated[int, Query(ge=1, le=3600, description="Seconds per bucket.")] = 10,
        store_id: str | None = None,
    ) -> dict[str, Any]:
        """How the sagas that ended in the last `window` seconds ended: by outcome and
        reason, per second, p50/p95 duration, per bucket; and those in flight by step."""
        if window / bucket > 720:
            raise BusinessRuleViolation("at most 720 buckets: choose a larger bucket")
        return await stats.rolling(store, window, bucket, store_id)

    @api.get(PATH + "/{transaction_id}", response_model=TransactionView)
    async def get_transaction(
        transaction_id: str,
        response: Response,
        as_of: history.AsOf = None,
        min_version: Annotated[int | None, Query(
            ge=1, description="The version you wrote (returned by POST). Optional: a read "
            "model behind the sale's stream is always bypassed.")] = None,
    ) -> dict[str, Any]:
        if as_of is not None:
            found = await history.transaction_as_of(store, transaction_id, history.utc(as_of))
            if found is None:
                raise NotFound(f"no transaction {transaction_id} at {as_of.isoformat()}")
            response.headers[history.SOURCE] = "replay"
            return found
        doc, source = await current(store, transaction_id, min_version or 0)
        response.headers[history.SOURCE] = source
        if doc is None:
            raise NotFound(f"no transaction {transaction_id}")
        return doc

    @api.get(
        PATH + "/{transaction_id}/events",
        response_class=EventStream,
        openapi_extra=STREAM_TOKEN_ALLOWED,
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "One `status` event per change, until terminal."}},
    )
    async def follow_transaction(
        transaction_id: str,
        max_wait: Annotated[
            float, Query(alias="timeout", gt=0, le=3600, description="Seconds.")
        ] = 300,
    ) -> EventStream:
        """Server-Sent Events: every status change of the sale until it is terminal."""
        stream = sales.stream(transaction_id)
        # A sale this process wrote exists (a stream is never deleted): no query then.
        if not store.seen_version(stream) and await store.stream_version(stream) == 0:
            raise NotFound(f"no transaction {transaction_id}")
        return EventStream(
            _status_stream(store, feed, transaction_id, max_wait),
        )

    return api


async def _status_stream(
    store: EventStore, feed: StatusFeed, transaction_id: str, max_wait: float
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    sent, version = 0, 0
    with feed.follow(transaction_id) as changed:
        while loop.time() < deadline:
            # The document this process just committed comes with the change, and at the
            # start the one of the last change it committed (a sale it just created);
            # otherwise (another process's change) it is read. A sale just created may not
            # be projected yet: it then has nothing to say.
            doc = changed.take()
            if doc is None and version == 0:
                doc = feed.last(transaction_id)  # this process's last change, at the start
            if doc is None or doc["version"] < version:
                doc = await store.get_document(readmodel.TRANSACTIONS, transaction_id) or {
                    "history": [], "status": Status.PENDING.value, "reason": None,
                    "version": 0}
            version = doc["version"]
            # The changes a wake brings go in one chunk: one write, not one per change.
            if chunk := b"".join(
                    _sse(b"status", {"transaction_id": transaction_id, **change,
                                     "reason": doc["reason"]})
                    for change in doc["history"][sent:]):
                yield chunk
            sent = len(doc["history"])
            if Status(doc["status"]).terminal:
                return
            try:
                async with asyncio.timeout(min(SSE_HEARTBEAT_S, deadline - loop.time())):
                    await changed.event.wait()
            except TimeoutError:
                yield b": keep-alive\n\n"
    yield b"event: timeout\ndata: {}\n\n"


def _sse(kind: bytes, data: object) -> bytes:
    return b"event: " + kind + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _previous_status(doc: Any) -> str | None:
    """The sale's status before its latest change (which may have passed several)."""
    before = [h["status"] for h in doc["history"] if h["version"] < doc["version"]]
    return before[-1] if before else None


def _view(doc: Any) -> dict[str, Any]:
    return {field: doc[field] for field in VIEW_FIELDS}


async def _live_stream(
    store: EventStore, feed: StatusFeed, where: dict[str, str | int | bool], recent: int,
    max_wait: float,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    status = where.get("status")
    others = [(k, v) for k, v in where.items() if k != "status"]
    # Watch before reading the newest sales, so a change committed in between is not lost
    # (it may come twice: a client keeps the higher `version` of a sale).
    with feed.watch() as watcher:
        if recent:
            rows = await store.find_documents(readmodel.TRANSACTIONS, where=where,
                                              limit=recent, descending=True)
            for _, newest in rows:
                yield _sse(b"sale", _view(newest))
        yield b"event: ready\ndata: {}\n\n"
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(min(SSE_HEARTBEAT_S, left)):
                    doc = await watcher.queue.get()
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if doc is RELOAD:
                yield b"event: reload\ndata: {}\n\n"
                continue
            if any(doc[k] != v for k, v in others):
                continue
            if status is not None and doc["status"] != status:
                if _previous_status(doc) == status:  # it left the filtered set
                    yield _sse(b"gone", {"transaction_id": doc["transaction_id"],
                                         "status": doc["status"]})
                continue
            yield _sse(b"sale", _view(doc))
    yield b"event: timeout\ndata: {}\n\n"

