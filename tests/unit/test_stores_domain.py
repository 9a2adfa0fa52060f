"""Rules of the store service's aggregates: stores, products and order preparation."""

from __future__ import annotations

import pytest

from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    OrderFulfilled,
    OrderFulfillmentFailed,
    ProductAdded,
    ProductPriceChanged,
    StoreClosed,
    StoreRegistered,
    StoreReopened,
)
from magasin.stores.domain import Order, OrderStatus, Product, Store


def open_store(ident: str = "s1") -> Store:
    return Store.register(ident, name="Plateau", district="Montréal", address="1 rue Saint-Denis")


def test_registering_a_store_trims_its_fields_and_opens_it() -> None:
    store = Store.register("s1", name="  Plateau ", district=" Montréal", address="1 rue A  ")
    assert store.pending == [StoreRegistered("s1", "Plateau", "Montréal", "1 rue A")]
    assert store.open
    assert store.closed_reason is None


@pytest.mark.parametrize("field", ["name", "district", "address"])
def test_a_store_needs_a_name_a_district_and_an_address(field: str) -> None:
    fields = {"name": "Plateau", "district": "Montréal", "address": "1 rue A", field: "   "}
    with pytest.raises(InvalidInput, match=f"{field} must not be empty"):
        Store.register("s1", **fields)


def test_a_store_id_with_whitespace_is_refused() -> None:
    with pytest.raises(InvalidInput, match="store_id"):
        Store.register("s 1", name="a", district="b", address="c")


def test_closing_then_reopening_a_store() -> None:
    store = open_store()
    store.close(" renovation ")
    assert not store.open
    assert store.closed_reason == "renovation"
    store.reopen()
    assert store.open
    assert store.closed_reason is None
    assert store.pending[1:] == [StoreClosed("s1", "renovation"), StoreReopened("s1")]


def test_closing_a_closed_store_is_refused() -> None:
    store = open_store()
    store.close("renovation")
    with pytest.raises(BusinessRuleViolation, match="store s1 is already closed"):
        store.close("again")


def test_reopening_an_open_store_is_refused() -> None:
    with pytest.raises(BusinessRuleViolation, match="store s1 is already open"):
        open_store().reopen()


def test_closing_needs_a_reason() -> None:
    with pytest.raises(InvalidInput, match="reason must not be empty"):
        open_store().close(" ")


def test_a_store_rebuilt_from_its_events_remembers_it_is_closed() -> None:
    events = [StoreRegistered("s1", "a", "b", "c"), StoreClosed("s1", "flood")]
    store = Store.replay("s1", events, version=2)
    assert not store.open
    assert store.closed_reason == "flood"
    assert store.version == 2


def test_adding_a_product() -> None:
    product = Product.add("p1", sku=" SKU-1 ", name=" Café ", unit_price=499, currency="CAD")
    assert product.pending == [ProductAdded("p1", "SKU-1", "Café", 499, "CAD")]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sku": " "}, "sku must not be empty"),
        ({"sku": "A B"}, "sku must not contain whitespace"),
        ({"name": ""}, "name must not be empty"),
        ({"unit_price": 0}, "unit_price must be between 1 and"),
        ({"unit_price": -5}, "unit_price must be between 1 and"),
        ({"unit_price": 4.99}, "unit_price must be an integer number of cents"),
        ({"unit_price": True}, "unit_price must be an integer number of cents"),
        ({"currency": "cad"}, "currency must be 3 upper-case letters"),
        ({"currency": "CA"}, "currency must be 3 upper-case letters"),
        ({"currency": "CADD"}, "currency must be 3 upper-case letters"),
    ],
)
def test_a_product_with_bad_fields_is_refused(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"sku": "SKU-1", "name": "Café", "unit_price": 499,
                                 "currency": "CAD", **changes}
    with pytest.raises(InvalidInput, match=message):
        Product.add("p1", **fields)  # type: ignore[arg-type]


def test_changing_a_price_records_it_and_the_same_price_records_nothing() -> None:
    product = Product.replay("p1", [ProductAdded("p1", "SKU-1", "Café", 499, "CAD")], 1)
    product.change_price(499, "CAD")
    assert product.pending == []
    product.change_price(549, "CAD")
    assert product.pending == [ProductPriceChanged("p1", 549, "CAD")]
    assert product.unit_price == 549


def test_a_price_change_to_nothing_is_refused() -> None:
    product = Product.replay("p1", [ProductAdded("p1", "SKU-1", "Café", 499, "CAD")], 1)
    with pytest.raises(InvalidInput, match="unit_price"):
        product.change_price(0, "CAD")


def test_an_open_store_fulfils_the_order() -> None:
    order = Order("t1")
    order.prepare("s1", open_store(), order_id="o1")
    assert order.pending == [OrderFulfilled(order_id="o1", transaction_id="t1", store_id="s1")]
    assert order.status is OrderStatus.FULFILLED


def test_a_closed_store_fails_the_order() -> None:
    store = open_store()
    store.close("renovation")
    order = Order("t1")
    order.prepare("s1", store, order_id="o1")
    assert order.pending == [OrderFulfillmentFailed("t1", "s1", "store_closed")]
    assert order.status is OrderStatus.FAILED


def test_an_unknown_store_fails_the_order() -> None:
    order = Order("t1")
    order.prepare("nowhere", None, order_id="o1")
    assert order.pending == [OrderFulfillmentFailed("t1", "nowhere", "unknown_store")]


def test_an_order_is_prepared_only_once() -> None:
    order = Order("t1")
    order.prepare("s1", open_store(), order_id="o1")
    with pytest.raises(BusinessRuleViolation, match="already prepared"):
        order.prepare("s1", open_store(), order_id="o2")
