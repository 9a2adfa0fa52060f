"""The event store service over HTTP in embedded mode: browse the log, replay an aggregate,
read any state as of a moment, and reads that bypass a read model that is behind."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from magasin.transactions import readmodel
from tests.e2e.conftest import Shop, eventually


@pytest.fixture
async def sold(shop: Shop) -> dict[str, Any]:
    """A completed sale of 2 coffees out of 10, and the events of its transaction stream."""
    store = await shop.open_store()
    coffee = await shop.add_product("CAF-1", 1899)
    await shop.restock(store, coffee, 10)
    sale = await shop.sell(store, [(coffee, 2)])

    async def done() -> dict[str, Any] | None:  # min_version: never a 404 for lag
        doc: dict[str, Any] = await shop.ok("GET", f"/api/transactions/{sale['transaction_id']}",
                                            params={"min_version": sale["version"]})
        return doc if doc["status"] in ("COMPLETED", "CANCELLED") else None

    final = await eventually(done)
    assert final["status"] == "COMPLETED"

    async def committed() -> bool:
        return bool((await shop.stock(store, coffee))["on_hand"] == 8)

    await eventually(committed)
    stream = await shop.ok("GET", f"/api/streams/transaction-{sale['transaction_id']}")
    return {"store": store, "coffee": coffee, "id": sale["transaction_id"], "final": final,
            "events": stream["items"]}


def moment(event: dict[str, Any]) -> str:
    return str(event["occurred_at"])


def before(event: dict[str, Any]) -> str:
    return (datetime.fromisoformat(event["occurred_at"]) - timedelta(microseconds=1)).isoformat()


async def test_the_log_is_browsed_by_correlation_type_and_aggregate_page_by_page(
    shop: Shop, sold: dict[str, Any]
) -> None:
    saga = await shop.ok("GET", "/api/events", params={"correlation_id": sold["id"]})
    types = [e["type"] for e in saga["items"]]
    for step in ("TransactionCreated", "PaymentProcessed", "InventoryReserved",
                 "OrderFulfilled", "TransactionCompleted"):
        assert step in types

    paid = await shop.ok("GET", "/api/events", params={"type": "PaymentProcessed"})
    assert [e["payload"]["transaction_id"] for e in paid["items"]] == [sold["id"]]
    stock = await shop.ok("GET", "/api/events", params={"aggregate_type": "stock"})
    assert {e["stream_id"].split("-", 1)[0] for e in stock["items"]} == {"stock"}

    first = await shop.ok("GET", "/api/events", params={"limit": 3})
    second = await shop.ok("GET", "/api/events",
                           params={"limit": 3, "cursor": first["next_cursor"]})
    positions = [e["global_position"] for e in first["items"] + second["items"]]
    assert positions == sorted(set(positions)) and len(positions) == 6
    assert first["next_cursor"] == str(first["items"][-1]["global_position"])

    one = await shop.ok("GET", f"/api/events/{saga['items'][0]['event_id']}")
    assert one == saga["items"][0]
    missing = await shop.client.get("/api/events/no-such-event")
    assert missing.status_code == 404


async def test_a_stream_is_read_between_versions(shop: Shop, sold: dict[str, Any]) -> None:
    # A choreographed sale's stream: its creation, then its completion (which records the
    # payment and the reservation the order named).
    url = f"/api/streams/transaction-{sold['id']}"
    assert [e["type"] for e in sold["events"]] == ["TransactionCreated", "TransactionCompleted"]
    first = await shop.ok("GET", url, params={"to_version": 1})
    last = await shop.ok("GET", url, params={"from_version": 2, "to_version": 3})

    assert [e["stream_version"] for e in first["items"]] == [1]
    assert [e["stream_version"] for e in last["items"]] == [2]
    assert last["version"] == sold["final"]["version"] == len(sold["events"])
    assert (await shop.client.get("/api/streams/transaction-nope")).status_code == 404


async def test_replay_rebuilds_an_aggregate_at_a_version_or_a_moment_and_caches_it(
    shop: Shop, sold: dict[str, Any]
) -> None:
    url = f"/api/replay/aggregate/transaction-{sold['id']}"
    now = await shop.ok("POST", url)
    assert (now["state"]["status"], now["version"]) == ("COMPLETED", sold["final"]["version"])
    assert now["state"]["total"] == 2 * 1899

    first = await shop.ok("POST", url, params={"version": 1})
    assert (first["state"]["status"], first["version"], first["cached"]) == ("PENDING", 1, False)
    assert (await shop.ok("POST", url, params={"version": 1}))["cached"] is True

    created, completed = sold["events"]
    then = await shop.ok("POST", url, params={"asOf": moment(created)})
    assert (then["state"]["status"], then["version"]) == ("PENDING", 1)
    done = await shop.ok("POST", url, params={"asOf": moment(completed)})
    assert (done["state"]["payment_id"], done["state"]["reservation_id"]) == (
        sold["final"]["payment_id"], sold["final"]["reservation_id"])
    # The payment's own stream says when the money was taken.
    payment = await shop.ok("POST", f"/api/replay/aggregate/payment-{sold['id']}")
    assert (payment["state"]["status"], payment["state"]["id"]) == ("CAPTURED", sold["id"])

    too_early = await shop.client.post(url, params={"asOf": before(sold["events"][0])})
    assert too_early.status_code == 404
    unknown = await shop.client.post("/api/replay/aggregate/spaceship-1")
    assert unknown.status_code == 404
    stock = await shop.ok("POST", f"/api/replay/aggregate/stock-{sold['store']}:{sold['coffee']}")
    # A stock item knows what it received and what can still be promised; the sale's
    # commit is its reservation's (the stock read models split taken into reserved, sold).
    assert (stock["state"]["received"], stock["state"]["available"]) == (10, 8)


async def test_state_as_of_shows_the_read_models_before_and_after_the_sale_completed(
    shop: Shop, sold: dict[str, Any]
) -> None:
    created = sold["events"][0]

    then = await shop.ok("GET", "/api/state", params={"asOf": moment(created)})
    after = await shop.ok("GET", "/api/state",
                          params={"asOf": datetime.now().astimezone().isoformat()})
    empty = await shop.ok("GET", "/api/state", params={"asOf": before(created)})

    def sale(state: dict[str, Any]) -> Any:
        (found,) = [t for t in state["transactions"] if t["transaction_id"] == sold["id"]]
        return found

    def coffee(state: dict[str, Any]) -> Any:
        (line,) = [s for s in state["stock"] if s["product_id"] == sold["coffee"]]
        return line

    assert (sale(then)["status"], sale(then)["total"]) == ("PENDING", 2 * 1899)
    assert (coffee(then)["on_hand"], coffee(then)["reserved"]) == (10, 0)
    assert sale(after)["status"] == "COMPLETED"
    assert (coffee(after)["on_hand"], coffee(after)["reserved"]) == (8, 0)
    assert empty["transactions"] == []
    assert coffee(empty)["on_hand"] == 10


async def test_read_routes_answer_as_of_a_moment_from_a_replay(
    shop: Shop, sold: dict[str, Any]
) -> None:
    created, completed = sold["events"]

    response = await shop.client.get(f"/api/transactions/{sold['id']}",
                                     params={"asOf": moment(completed)})
    assert response.status_code == 200
    assert response.headers["X-Magasin-Source"] == "replay"
    view = response.json()
    assert view["status"] == "COMPLETED"
    assert [h["status"] for h in view["history"]] == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED"]
    assert view == {**sold["final"], "version": view["version"]}  # as the projection has it

    listed = await shop.ok("GET", "/api/transactions", params={"asOf": moment(created)})
    assert [(t["transaction_id"], t["status"]) for t in listed["items"]] == [
        (sold["id"], "PENDING")]
    none_yet = await shop.ok("GET", "/api/transactions", params={"asOf": before(created)})
    assert none_yet["items"] == []
    gone = await shop.client.get(f"/api/transactions/{sold['id']}",
                                 params={"asOf": before(created)})
    assert gone.status_code == 404

    # The stock as it was when the inventory reserved the sale's (its own event says when).
    (reserved,) = (await shop.ok("GET", "/api/events", params={
        "correlation_id": sold["id"], "type": "InventoryReserved"}))["items"]
    stock = await shop.ok("GET", f"/api/stock/{sold['store']}", params={"asOf": moment(reserved)})
    (line,) = stock["items"]
    assert (line["on_hand"], line["reserved"], line["available"]) == (10, 2, 8)


async def test_a_read_model_behind_the_sale_s_stream_is_bypassed_by_a_replay(
    shop: Shop, sold: dict[str, Any]
) -> None:
    url = f"/api/transactions/{sold['id']}"
    async with shop.runtime.store.transaction() as uow:  # the read model falls behind
        uow.put_document(readmodel.TRANSACTIONS, sold["id"],
                         {**sold["final"], "status": "PENDING", "version": 1})
    written = sold["final"]["version"]

    for params in ({}, {"min_version": written}):
        fresh = await shop.client.get(url, params=params)
        assert (fresh.json()["status"], fresh.headers["X-Magasin-Source"]) == (
            "COMPLETED", "replay")
        assert fresh.json()["version"] == written

    async with shop.runtime.store.transaction() as uow:  # or has not caught up at all
        uow.delete_document(readmodel.TRANSACTIONS, sold["id"])
    rebuilt = await shop.client.get(url)
    assert (rebuilt.json()["status"], rebuilt.headers["X-Magasin-Source"]) == (
        "COMPLETED", "replay")
    assert (await shop.client.get("/api/transactions/no-such-sale")).status_code == 404

    async with shop.runtime.store.transaction() as uow:  # caught up: the read model answers
        uow.put_document(readmodel.TRANSACTIONS, sold["id"], sold["final"])
    current = await shop.client.get(url)
    assert (current.json(), current.headers["X-Magasin-Source"]) == (sold["final"],
                                                                     "read-model")


async def test_a_sale_just_written_is_read_at_the_version_its_post_returned(
    shop: Shop, sold: dict[str, Any]
) -> None:
    sale = await shop.sell(sold["store"], [(sold["coffee"], 1)])
    read = await shop.ok("GET", f"/api/transactions/{sale['transaction_id']}",
                         params={"min_version": sale["version"]})
    assert read["version"] >= sale["version"]
