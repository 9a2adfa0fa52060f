"""Routing tags (messaging.tags): what an event carries, what a consumer may require, and
the routing and binding keys RabbitMQ matches them with."""

from __future__ import annotations

import pytest

from magasin.messaging.tags import (
    Routed,
    binding_key,
    carries,
    check_tag,
    routed,
    routing_key,
    tag,
    tags_of,
)


def test_an_events_tags_are_its_baggage_entries_sorted() -> None:
    metadata = {"service": "x", "baggage": {"zone": "eu", "saga_mode": "orchestration"}}
    assert tags_of(metadata) == ("saga_mode=orchestration", "zone=eu")
    assert tags_of({"service": "x"}) == () and tags_of({"baggage": {}}) == ()


def test_a_baggage_entry_that_is_not_one_routing_key_word_is_no_tag() -> None:
    metadata = {"baggage": {"url": "a.b", "star": "*", "n": 3, "ok": "yes"}}
    assert tags_of(metadata) == ("ok=yes",)


@pytest.mark.parametrize("metadata", [
    {}, {"baggage": None}, {"baggage": {"tier": "silver"}}, {"baggage": {"tier2": "gold"}},
])
def test_an_event_without_the_tag_is_not_for_a_consumer_requiring_it(
    metadata: dict[str, object],
) -> None:
    assert not carries(metadata, "tier=gold")
    assert carries(metadata, None)


def test_an_event_with_the_tag_among_others_is_for_it() -> None:
    assert carries({"baggage": {"a": "1", "tier": "gold"}}, tag("tier", "gold"))


@pytest.mark.parametrize("word", ["a.b=c", "*", "#", "", "a b", "x" * 101])
def test_a_tag_is_one_routing_key_word(word: str) -> None:
    with pytest.raises(ValueError, match="routing tag"):
        check_tag(word)


def test_the_routing_key_puts_the_tags_after_the_partition() -> None:
    assert routing_key("cart.ItemAdded", 2, ()) == "cart.ItemAdded.2"
    assert routing_key("cart.ItemAdded", 2, ("a=1", "b=2")) == "cart.ItemAdded.2.a=1.b=2"
    assert binding_key("ItemAdded", 2, None) == "*.ItemAdded.2.#"
    assert binding_key("ItemAdded", 2, "b=2") == "*.ItemAdded.2.#.b=2.#"


def test_a_routing_key_is_read_back_as_what_built_it() -> None:
    key = routing_key("transaction.TransactionCreated", 3, (tag("saga_mode", "orchestration"),))
    route = routed(key)
    assert route == Routed("transaction", "TransactionCreated", 3)
    assert route.event_key == "transaction.TransactionCreated"
    assert routed(routing_key("sale.OrderFulfilled", 0, ())) == Routed("sale", "OrderFulfilled", 0)


@pytest.mark.parametrize("key", [None, "", "payment", "dead.letters", "sale.Created.x"])
def test_a_key_not_built_as_a_routing_key_names_no_route(key: str | None) -> None:
    assert routed(key) is None
