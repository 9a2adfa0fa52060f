"""HTTP API of the store service: stores, the product catalog and prepared orders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from magasin.api.paging import Cursor, Limit, Page, page_of
from magasin.eventstore.repository import Repository
from magasin.eventstore.store import EventStore
from magasin.service import ServiceContext
from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import NotFound
from magasin.stores import commands, readmodel
from magasin.stores.domain import MAX_SKU, MAX_TEXT, MAX_UNIT_PRICE, OrderStatus

A = TypeVar("A", bound=Aggregate)
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT)]
Sku = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_SKU, pattern=r"^\S+$"),
]
# strict: 12.5, "1250" and true are refused rather than coerced into a price.
Cents = Annotated[int, Field(strict=True, gt=0, le=MAX_UNIT_PRICE, description="Integer cents.")]
Currency = Annotated[
    str, StringConstraints(pattern=r"^[A-Z]{3}$"), Field(examples=["CAD"], description="ISO 4217.")
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewStore(_Body):
    name: Text
    district: Text
    address: Text


class Closing(_Body):
    reason: Text


class NewProduct(_Body):
    sku: Sku
    name: Text
    unit_price: Cents
    currency: Currency


class Price(_Body):
    unit_price: Cents
    currency: Currency


class StoreView(BaseModel):
    store_id: str
    name: str
    district: str
    address: str
    open: bool
    closed_reason: str | None


class ProductView(BaseModel):
    product_id: str
    sku: str
    name: str
    unit_price: int = Field(description="Integer cents.")
    currency: str


class OrderLine(BaseModel):
    product_id: str
    quantity: int


class OrderView(BaseModel):
    order_id: str | None = Field(description="None when the order could not be prepared.")
    transaction_id: str
    store_id: str
    status: OrderStatus
    reason: str | None = Field(description="`store_closed` or `unknown_store` when FAILED.")
    lines: list[OrderLine]
    updated_at: str


async def _document(ctx: ServiceContext, collection: str, key: str, what: str) -> dict[str, Any]:
    doc = await ctx.store.get_document(collection, key)
    if doc is None:
        raise NotFound(f"no {what} {key}")
    return doc


async def _current(
    store: EventStore, collection: str, repository: Repository[A], ident: str,
    document: Callable[[A], dict[str, Any]],
) -> dict[str, Any]:
    """The read-model document when it is as recent as the aggregate's stream; otherwise
    (no document yet, or an older one: the projection lags) the aggregate rebuilt from its
    events (seed 6.2.2), so that the `Location` of a `201` answers `200` at once."""
    doc = await store.get_document(collection, ident)
    stream = repository.stream(ident)
    if doc is not None and doc.get("version", 0) >= await store.stream_version(stream):
        return doc
    rebuilt = await repository.rebuild(store, ident)
    if rebuilt is None:
        raise NotFound(f"no {repository.cls.stream_type} {ident}")
    return document(rebuilt.aggregate)


def router(ctx: ServiceContext) -> APIRouter:
    store = ctx.store
    api = APIRouter(prefix="/api", tags=["stores"])

    # -- stores -----------------------------------------------------------------------

    @api.get("/stores", response_model=Page[StoreView])
    async def list_stores(
        limit: Limit = 50,
        cursor: Cursor = None,
        district: Annotated[str | None, Query(min_length=1, max_length=MAX_TEXT)] = None,
    ) -> dict[str, Any]:
        where: dict[str, str | int | bool] = {"district": district} if district else {}
        items, next_cursor = await page_of(store, readmodel.STORES, where, cursor, limit)
        return {"items": items, "next_cursor": next_cursor}

    @api.post("/stores", status_code=201, response_model=StoreView)
    async def register_store(body: NewStore, response: Response) -> Any:
        """Register a store; it is open at once."""
        doc = await commands.register_store(store, body.name, body.district, body.address)
        # A path, not an absolute URL: behind the gateway this process does not know the
        # host and port clients use (as for sales, transactions/api.py).
        response.headers["Location"] = api.url_path_for("get_store", store_id=doc["store_id"])
        return doc

    @api.get("/stores/{store_id}", response_model=StoreView)
    async def get_store(store_id: str) -> dict[str, Any]:
        return await _current(store, readmodel.STORES, commands.stores, store_id,
                              readmodel.store_document)

    @api.post("/stores/{store_id}/close", response_model=StoreView)
    async def close_store(store_id: str, body: Closing) -> dict[str, Any]:
        """Close a store: orders reaching it fail and their sales are compensated."""
        return await commands.close_store(store, store_id, body.reason)

    @api.post("/stores/{store_id}/reopen", response_model=StoreView)
    async def reopen_store(store_id: str) -> dict[str, Any]:
        return await commands.reopen_store(store, store_id)

    # -- catalog ----------------------------------------------------------------------

    @api.get("/products", response_model=Page[ProductView])
    async def list_products(limit: Limit = 50, cursor: Cursor = None) -> dict[str, Any]:
        items, next_cursor = await page_of(store, readmodel.PRODUCTS, {}, cursor, limit)
        return {"items": items, "next_cursor": next_cursor}

    @api.post("/products", status_code=201, response_model=ProductView)
    async def add_product(body: NewProduct, response: Response) -> Any:
        """Add a product; 409 if its SKU is used already."""
        doc = await commands.add_product(
            store, body.sku, body.name, body.unit_price, body.currency
        )
        response.headers["Location"] = api.url_path_for(
            "get_product", product_id=doc["product_id"])
        return doc

    @api.get("/products/{product_id}", response_model=ProductView)
    async def get_product(product_id: str) -> dict[str, Any]:
        return await _current(store, readmodel.PRODUCTS, commands.products, product_id,
                              readmodel.product_document)

    @api.put("/products/{product_id}/price", response_model=ProductView)
    async def change_price(product_id: str, body: Price) -> dict[str, Any]:
        """Set the price of future sales; sales already created keep theirs."""
        return await commands.change_price(store, product_id, body.unit_price, body.currency)

    # -- orders -----------------------------------------------------------------------

    @api.get("/orders", response_model=Page[OrderView])
    async def list_orders(
        limit: Limit = 50,
        cursor: Cursor = None,
        store_id: Annotated[str | None, Query(min_length=1, max_length=MAX_TEXT)] = None,
        status: OrderStatus | None = None,
    ) -> dict[str, Any]:
        where: dict[str, str | int | bool] = {}
        if store_id:
            where["store_id"] = store_id
        if status:
            where["status"] = status.value
        items, next_cursor = await page_of(store, readmodel.ORDERS, where, cursor, limit)
        return {"items": items, "next_cursor": next_cursor}

    @api.get("/orders/{transaction_id}", response_model=OrderView)
    async def get_order(transaction_id: str) -> dict[str, Any]:
        return await _document(ctx, readmodel.ORDERS, transaction_id, "order of transaction")

    return api
