"""HTTP routes of the inventory: stock per store, restocking, and reservations."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from magasin.api.paging import Cursor, Limit, Order, Page, cursor_of, key_of, page_of
from magasin.eventstore_service import history
from magasin.inventory import readmodel
from magasin.inventory.commands import restock
from magasin.inventory.domain import Reservation
from magasin.inventory.projection import RESERVATION_EVENTS, reservation_applied
from magasin.projections import fresh
from magasin.projections.current import current
from magasin.service import ServiceContext
from magasin.shared.errors import NotFound
from magasin.shared.ids import stream_id

Id = Annotated[str, Path(min_length=1, max_length=200)]


class StockLineOut(BaseModel):
    store_id: str
    product_id: str
    on_hand: int
    reserved: int
    available: int


class RestockIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quantity: StrictInt = Field(gt=0, le=1_000_000_000, description="Units to add.")
    reason: str = Field("restock", min_length=1, max_length=200)


class LineOut(BaseModel):
    product_id: str
    quantity: int


class MissingOut(BaseModel):
    product_id: str
    requested: int
    available: int


class ReservationOut(BaseModel):
    reservation_id: str | None
    transaction_id: str
    store_id: str | None
    lines: list[LineOut]
    status: str
    """RESERVED, UNAVAILABLE, RELEASED, COMMITTED or VOIDED."""
    expires_at: str | None
    fulfilled: bool
    missing: list[MissingOut] = []
    reason: str | None = None


def router(ctx: ServiceContext) -> APIRouter:
    api = APIRouter(tags=["inventory"])
    store = ctx.store

    async def known_store(store_id: str) -> None:
        if await store.get_document(readmodel.STORES, store_id) is None:
            raise NotFound(f"no store {store_id}")

    @api.get("/api/stock/{store_id}", response_model=Page[StockLineOut])
    async def list_stock(
        store_id: Id, cursor: Cursor = None, limit: Limit = 50, as_of: history.AsOf = None
    ) -> Page[StockLineOut]:
        """The stock lines of one store, by product id (as they were at `asOf` if given)."""
        await known_store(store_id)
        if as_of is not None:  # replayed from the log up to that moment
            lines = await history.stock_as_of(store, history.utc(as_of), store_id)
            # The read model's keys are `store:product`: the cursors of both lists agree.
            after = key_of(readmodel.STOCK, cursor)
            page = history.page(lines, "product_id", {},
                                None if after is None else after.partition(":")[2], limit)
            docs = page["items"]
            next_cursor = cursor_of(readmodel.STOCK, None if page["next_cursor"] is None
                                    else f"{store_id}:{page['next_cursor']}")
        else:
            await fresh(store, readmodel.STOCK)  # the lines as the sales seen ended left them
            docs, next_cursor = await page_of(
                store, readmodel.STOCK, {"store_id": store_id}, cursor, limit
            )
        return Page[StockLineOut](
            items=[StockLineOut.model_validate(d) for d in docs], next_cursor=next_cursor
        )

    @api.get("/api/stock/{store_id}/{product_id}", response_model=StockLineOut)
    async def get_stock(store_id: Id, product_id: Id) -> StockLineOut:
        """One product's stock in one store (zero if it was never stocked there)."""
        await fresh(store, readmodel.STOCK)  # the stock projection lingers between commits
        doc = await store.get_document(readmodel.STOCK, f"{store_id}:{product_id}")
        if doc is None:
            await known_store(store_id)
            if await store.get_document(readmodel.PRODUCTS, product_id) is None:
                raise NotFound(f"no product {product_id}")
            doc = readmodel.empty_stock_document(store_id, product_id)
        return StockLineOut.model_validate(doc)

    @api.post("/api/stock/{store_id}/{product_id}/restock", response_model=StockLineOut)
    async def restock_product(store_id: Id, product_id: Id, body: RestockIn) -> StockLineOut:
        """Add units to a product's stock in a store; returns the updated line."""
        line = await restock(store, store_id, product_id, body.quantity, body.reason)
        return StockLineOut.model_validate(line)

    @api.get("/api/reservations", response_model=Page[ReservationOut])
    async def list_reservations(
        store_id: str | None = None,
        status: Annotated[
            Literal["RESERVED", "UNAVAILABLE", "RELEASED", "COMMITTED", "VOIDED"] | None,
            Query(description="RESERVED = held now (see `expires_at`)."),
        ] = None,
        cursor: Cursor = None,
        limit: Limit = 50,
        order: Order = "asc",
    ) -> Page[ReservationOut]:
        """Reservations by transaction id, which is in the order sales were made
        (`order=desc`: newest first), of one store and in one status if given."""
        where: dict[str, str | int | bool] = {}
        if store_id:
            where["store_id"] = store_id
        if status:
            where["status"] = status
        docs, next_cursor = await page_of(store, readmodel.RESERVATIONS, where, cursor, limit,
                                          order)
        return Page[ReservationOut](
            items=[ReservationOut.model_validate(d) for d in docs], next_cursor=next_cursor
        )

    @api.get("/api/reservations/{transaction_id}", response_model=ReservationOut)
    async def get_reservation(transaction_id: Id) -> ReservationOut:
        """What the inventory holds for a transaction."""
        # Seed 6.2.2: a lagging read model is bypassed by a replay of the stream, so a client
        # told a sale's outcome reads the reservation behind it at once.
        doc = await current(store, readmodel.RESERVATIONS, transaction_id,
                            stream_id(Reservation.stream_type, transaction_id),
                            reservation_applied, RESERVATION_EVENTS)
        if doc is None:
            raise NotFound(f"no reservation for transaction {transaction_id}")
        return ReservationOut.model_validate(doc)

    return api
