"""Aggregates of the store service: stores, products, SKU claims and orders (pure Python)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum

from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    OrderFulfilled,
    OrderFulfillmentFailed,
    ProductAdded,
    ProductPriceChanged,
    SkuClaimed,
    StockLine,
    StoreClosed,
    StoreRegistered,
    StoreReopened,
)

MAX_TEXT = 200
MAX_ID = 100
MAX_SKU = 64
MAX_UNIT_PRICE = 1_000_000_000
"""Ten million currency units: a bound that keeps sums of lines far from any overflow."""

UNKNOWN_STORE = "unknown_store"
STORE_CLOSED = "store_closed"

_CURRENCY = re.compile(r"[A-Z]{3}")
_NO_SPACE = re.compile(r"\S+")


# -- validation helpers -------------------------------------------------------------------


def text(field: str, value: str, max_length: int = MAX_TEXT) -> str:
    """`value` trimmed; InvalidInput if it is then empty or too long."""
    cleaned = value.strip()
    if not cleaned:
        raise InvalidInput(f"{field} must not be empty")
    if len(cleaned) > max_length:
        raise InvalidInput(f"{field} must be at most {max_length} characters")
    return cleaned


def identifier(field: str, value: str) -> str:
    """An id chosen by a caller (the seeder, say): no whitespace, at most MAX_ID chars."""
    if not _NO_SPACE.fullmatch(value) or len(value) > MAX_ID:
        raise InvalidInput(f"{field} must be 1 to {MAX_ID} characters without whitespace")
    return value


def sku_of(value: str) -> str:
    sku = text("sku", value, MAX_SKU)
    if not _NO_SPACE.fullmatch(sku):
        raise InvalidInput(f"sku must not contain whitespace: {sku!r}")
    return sku


def price_of(unit_price: int, currency: str) -> tuple[int, str]:
    # bool is an int subclass: True must not become a price of one cent.
    if isinstance(unit_price, bool) or not isinstance(unit_price, int):
        raise InvalidInput(f"unit_price must be an integer number of cents, got {unit_price!r}")
    if not 0 < unit_price <= MAX_UNIT_PRICE:
        raise InvalidInput(
            f"unit_price must be between 1 and {MAX_UNIT_PRICE} cents, got {unit_price}"
        )
    if not _CURRENCY.fullmatch(currency):
        raise InvalidInput(f"currency must be 3 upper-case letters (ISO 4217), got {currency!r}")
    return unit_price, currency


# -- stores ---------------------------------------------------------------------------------


class Store(Aggregate):
    """A shop of the chain; only an open store prepares orders."""

    stream_type = "store"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.name = ""
        self.district = ""
        self.address = ""
        self.open = False
        self.closed_reason: str | None = None

    @classmethod
    def register(cls, ident: str, *, name: str, district: str, address: str) -> Store:
        store = cls(identifier("store_id", ident))
        store._record(
            StoreRegistered(
                store_id=store.id,
                name=text("name", name),
                district=text("district", district),
                address=text("address", address),
            )
        )
        return store

    def close(self, reason: str) -> None:
        if not self.open:
            raise BusinessRuleViolation(f"store {self.id} is already closed")
        self._record(StoreClosed(store_id=self.id, reason=text("reason", reason)))

    def reopen(self) -> None:
        if self.open:
            raise BusinessRuleViolation(f"store {self.id} is already open")
        self._record(StoreReopened(store_id=self.id))

    def apply(self, event: object) -> None:
        match event:
            case StoreRegistered():
                self.name, self.district, self.address = event.name, event.district, event.address
                self.open = True
            case StoreClosed():
                self.open, self.closed_reason = False, event.reason
            case StoreReopened():
                self.open, self.closed_reason = True, None
            case _:
                raise TypeError(f"a store does not apply {type(event).__name__}")


# -- catalog --------------------------------------------------------------------------------


class Product(Aggregate):
    """A catalog entry: its SKU and name never change, its price does."""

    stream_type = "product"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.sku = ""
        self.name = ""
        self.unit_price = 0
        self.currency = ""

    @classmethod
    def add(
        cls, ident: str, *, sku: str, name: str, unit_price: int, currency: str
    ) -> Product:
        product = cls(identifier("product_id", ident))
        price, curr = price_of(unit_price, currency)
        product._record(
            ProductAdded(
                product_id=product.id, sku=sku_of(sku), name=text("name", name),
                unit_price=price, currency=curr,
            )
        )
        return product

    def change_price(self, unit_price: int, currency: str) -> None:
        """Set the price; the same price again records nothing (a PUT may be retried)."""
        price, curr = price_of(unit_price, currency)
        if (price, curr) != (self.unit_price, self.currency):
            self._record(ProductPriceChanged(product_id=self.id, unit_price=price, currency=curr))

    def apply(self, event: object) -> None:
        match event:
            case ProductAdded():
                self.sku, self.name = event.sku, event.name
                self.unit_price, self.currency = event.unit_price, event.currency
            case ProductPriceChanged():
                self.unit_price, self.currency = event.unit_price, event.currency
            case _:
                raise TypeError(f"a product does not apply {type(event).__name__}")


class Sku(Aggregate):
    """The claim on one SKU (id = the SKU): at most one product ever holds it."""

    stream_type = "sku"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.product_id: str | None = None

    @classmethod
    def claim(cls, sku: str, product_id: str) -> Sku:
        claim = cls(sku)
        claim._record(SkuClaimed(sku=sku, product_id=product_id))
        return claim

    def apply(self, event: object) -> None:
        match event:
            case SkuClaimed():
                self.product_id = event.product_id
            case _:
                raise TypeError(f"a SKU claim does not apply {type(event).__name__}")


# -- order preparation ------------------------------------------------------------------------


class OrderStatus(StrEnum):
    FULFILLED = "FULFILLED"
    FAILED = "FAILED"


class Order(Aggregate):
    """The preparation of one sale's reserved goods (id = the transaction id); decided once."""

    stream_type = "order"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.store_id = ""
        self.order_id: str | None = None
        self.status: OrderStatus | None = None
        self.reason: str | None = None

    def prepare(
        self, store_id: str, store: Store | None, order_id: str,
        lines: Sequence[StockLine] = (), payment_id: str = "", reservation_id: str = "",
    ) -> None:
        """Prepare the order in `store` (None: no such store). A store that cannot prepare
        it is a failure recorded as an event, not an error: the saga compensates on it.
        `payment_id` and `reservation_id` (what the order follows) travel on with
        OrderFulfilled to the transaction service."""
        if self.status is not None:
            raise BusinessRuleViolation(f"the order of transaction {self.id} is already prepared")
        if store is not None and store.id != store_id:
            raise ValueError(f"store {store.id} given for an order of store {store_id}")
        goods = tuple(lines)
        if store is None:
            self._record(OrderFulfillmentFailed(self.id, store_id, UNKNOWN_STORE, lines=goods))
        elif not store.open:
            self._record(OrderFulfillmentFailed(self.id, store_id, STORE_CLOSED, lines=goods))
        else:
            self._record(OrderFulfilled(order_id=order_id, transaction_id=self.id,
                                        store_id=store_id, lines=goods, payment_id=payment_id,
                                        reservation_id=reservation_id))

    def apply(self, event: object) -> None:
        match event:
            case OrderFulfilled():
                self.store_id, self.order_id = event.store_id, event.order_id
                self.status = OrderStatus.FULFILLED
            case OrderFulfillmentFailed():
                self.store_id, self.reason = event.store_id, event.reason
                self.status = OrderStatus.FAILED
            case _:
                raise TypeError(f"an order does not apply {type(event).__name__}")
