"""The HTTP contract a client sees, end to end in embedded mode: live status over SSE,
webhooks, API keys, input validation, Idempotency-Key, listing, and the query endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from magasin.api.app import create_app
from magasin.bootstrap import Runtime, build_service
from magasin.payments.gateway import BankGateway, BankRecord, BankSimulator, Charge
from magasin.payments.service import build as build_payment
from magasin.service import ServiceContext
from magasin.shared.messages import RecordedEvent
from magasin.transactions.readmodel import TRANSACTIONS
from tests.e2e.conftest import API_KEY, TERMINAL, Shop, eventually, served
from tests.e2e.conftest import test_settings as settings_in
from tests.e2e.webhooks import Hook

NOMINAL = ["PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED"]
DECLINED = ["PENDING", "CANCELLING", "CANCELLED"]


@pytest.fixture
async def shelf(shop: Shop) -> dict[str, str]:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF-1", 1899)
    milk = await shop.add_product("LAI-2", 649)
    for product in (coffee, milk):
        await shop.restock(store, product, 20)
    return {"store": store, "coffee": coffee, "milk": milk}


async def log_events(shop: Shop) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    after = 0
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        events += page
        after = page[-1].global_position
    return events


async def business_events(shop: Shop) -> list[str]:
    """Ids of every event in the log but the audit trail's, which the embedded audit
    service appends in the background whatever the request under test did."""
    return [e.event_id for e in await log_events(shop) if not e.stream_id.startswith("audit-")]


async def settle(shop: Shop, store_id: str, product_id: str) -> None:
    """Wait until the inventory holds nothing back for this product (commits are done)."""

    async def quiet() -> bool:
        return bool((await shop.stock(store_id, product_id))["reserved"] == 0)

    await eventually(quiet)


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each message of a text/event-stream body."""
    messages = []
    for block in text.split("\n\n"):
        name, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
        if data is not None:
            messages.append((name, data))
    return messages


async def follow(shop: Shop, transaction_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with shop.client.stream(
        "GET", f"/api/transactions/{transaction_id}/events"
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        body = "".join([chunk async for chunk in response.aiter_text()])
    return parse_sse(body)


# -- Server-Sent Events ----------------------------------------------------------------


async def test_events_stream_every_status_of_a_nominal_sale_then_end(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)])

    messages = await follow(shop, sale["transaction_id"])

    assert {name for name, _ in messages} == {"status"}, "no timeout, no other event"
    assert [data["status"] for _, data in messages] == NOMINAL
    assert all(data["transaction_id"] == sale["transaction_id"] for _, data in messages)
    versions = [data["version"] for _, data in messages]
    assert versions == sorted(versions)


async def test_events_stream_the_compensation_of_a_declined_card(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)], payment_method="FAIL_CARD")

    messages = await follow(shop, sale["transaction_id"])

    assert [data["status"] for _, data in messages] == DECLINED
    assert messages[-1][1]["reason"] == "declined"


async def test_events_of_a_finished_sale_replay_its_history_and_end_at_once(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 2)])
    await shop.final(sale["transaction_id"])

    async with asyncio.timeout(5):
        messages = await follow(shop, sale["transaction_id"])

    assert [data["status"] for _, data in messages] == NOMINAL


async def test_events_of_an_unknown_transaction_are_404(shop: Shop) -> None:
    response = await shop.client.get("/api/transactions/no-such-sale/events")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no transaction no-such-sale"}


class GatedBank(BankGateway):
    """The simulated bank, whose charges wait until the test opens the gate."""

    def __init__(self) -> None:
        self.bank = BankSimulator(latency_s=0)
        self.gate = asyncio.Event()

    async def charge(self, idempotency_key: str, amount: int, currency: str,
                     method: str) -> Charge:
        await self.gate.wait()
        return await self.bank.charge(idempotency_key, amount, currency, method)

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        return await self.bank.refund(idempotency_key, reference, amount)

    async def lookup(self, idempotency_key: str) -> BankRecord | None:
        return await self.bank.lookup(idempotency_key)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Shop, GatedBank]]:
    """A whole embedded magasin behind a real HTTP server, whose bank answers only once the
    test opens its gate: sales stay PENDING until then."""
    settings = settings_in(tmp_path)
    bare = Runtime.embedded(settings, services=())  # its store and bus, no service yet
    ctx = ServiceContext(bare.store, settings)
    bank = GatedBank()
    services = [build_service(name, ctx) for name in ("transaction", "inventory", "store")]
    services.append(build_payment(ctx, gateway=bank))
    runtime = Runtime("embedded", settings, bare.store, bare.bus, services)
    async with served(create_app(runtime, frozenset({API_KEY}))) as url, httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": API_KEY}, timeout=10, trust_env=False
    ) as client:
        yield Shop(client, runtime), bank


async def pending_sale(shop: Shop) -> str:
    store = await shop.open_store()
    tea = await shop.add_product("THE-3", 500)
    await shop.restock(store, tea, 5)
    sale: str = (await shop.sell(store, [(tea, 1)]))["transaction_id"]
    return sale


async def test_events_are_pushed_over_real_http_as_they_happen(
    gated: tuple[Shop, GatedBank]
) -> None:
    """Through a real server, PENDING reaches the client while the bank still holds the
    charge: the stream is live, not a body sent once the saga is over."""
    shop, bank = gated
    sale = await pending_sale(shop)

    statuses = []
    async with shop.client.stream("GET", f"/api/transactions/{sale}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async with asyncio.timeout(10):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    statuses.append(json.loads(line.removeprefix("data: "))["status"])
                    if statuses == ["PENDING"]:
                        assert not bank.gate.is_set()
                        bank.gate.set()  # only now can the saga move on
    assert statuses == NOMINAL


async def test_a_followed_sale_s_changes_reach_its_client_without_reading_the_sale_back(
    gated: tuple[Shop, GatedBank], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The projection hands the client each change it commits, and the stream starts from
    the last one this process committed (the sale's creation here): it never reads the
    sale's document (distributed, each read is a round trip to PostgreSQL)."""
    shop, bank = gated
    sale = await pending_sale(shop)
    store = shop.runtime.store
    reads: list[str] = []
    get_document = store.get_document

    async def counted(collection: str, key: str) -> dict[str, Any] | None:
        if collection == TRANSACTIONS and key == sale:
            reads.append(key)
        return await get_document(collection, key)

    monkeypatch.setattr(store, "get_document", counted)
    statuses = []
    async with shop.client.stream("GET", f"/api/transactions/{sale}/events") as response:
        async with asyncio.timeout(10):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    statuses.append(json.loads(line.removeprefix("data: "))["status"])
                    if statuses == ["PENDING"]:
                        bank.gate.set()
    assert statuses == NOMINAL
    assert reads == []


async def test_events_stop_with_a_timeout_event_when_the_sale_takes_too_long(
    gated: tuple[Shop, GatedBank]
) -> None:
    shop, bank = gated
    sale = await pending_sale(shop)

    async with asyncio.timeout(5):
        response = await shop.client.get(f"/api/transactions/{sale}/events?timeout=0.3")

    assert [name for name, _ in parse_sse(response.text)] == ["status", "timeout"]
    assert parse_sse(response.text)[0][1]["status"] == "PENDING"
    bank.gate.set()
    assert (await shop.final(sale))["status"] == "COMPLETED"


# -- webhooks --------------------------------------------------------------------------


async def test_a_completed_sale_is_posted_once_to_its_callback_url(
    shop: Shop, shelf: dict[str, str], hook: Hook
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 2)], callback_url=hook.url)

    await eventually(hook.arrived(1), timeout=10)
    await asyncio.sleep(0.3)  # room for a duplicate to show up

    [call] = hook.requests
    assert (call.method, call.path) == ("POST", "/hooks/sales")
    assert call.headers["x-magasin-event"] == "TransactionCompleted"
    assert call.headers["idempotency-key"]
    assert call.headers["content-type"] == "application/json"
    assert call.body == {
        "transaction_id": sale["transaction_id"], "store_id": shelf["store"],
        "customer_id": "alice", "total": 2 * 1899, "currency": "CAD", "reason": None,
        "status": "COMPLETED",
    }
    assert (await shop.final(sale["transaction_id"]))["status"] == "COMPLETED"


async def test_a_cancelled_sale_is_posted_to_its_callback_url(
    shop: Shop, shelf: dict[str, str], hook: Hook
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 1)], payment_method="FAIL_CARD",
                           callback_url=hook.url)

    await eventually(hook.arrived(1), timeout=10)
    await asyncio.sleep(0.3)

    [call] = hook.requests
    assert call.headers["x-magasin-event"] == "TransactionCancelled"
    assert call.headers["idempotency-key"]
    assert (call.body["transaction_id"], call.body["status"], call.body["reason"]) == (
        sale["transaction_id"], "CANCELLED", "declined",
    )


async def test_a_failing_callback_is_retried_without_holding_the_sale(
    shop: Shop, shelf: dict[str, str], hook: Hook
) -> None:
    hook.script = [500, 500]  # then 200
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)], callback_url=hook.url)

    await eventually(hook.arrived(2), timeout=10)
    # Both deliveries failed, and the sale was already over: the webhook never holds it.
    final = await shop.ok("GET", f"/api/transactions/{sale['transaction_id']}")
    assert final["status"] == "COMPLETED"
    await eventually(hook.arrived(3), timeout=10)
    await asyncio.sleep(0.3)

    assert [r.answered for r in hook.requests] == [500, 500, 200]
    assert {r.headers["idempotency-key"] for r in hook.requests} == {
        hook.requests[0].headers["idempotency-key"]
    }, "a retry is the same notification: the receiver can deduplicate it"
    assert all(r.body["status"] == "COMPLETED" for r in hook.requests)
    assert await shop.runtime.bus.dead_letters("transaction.notifier") == []


async def test_an_unreachable_callback_is_dead_lettered_and_the_sale_stays_completed(
    shop: Shop, shelf: dict[str, str], unused_tcp_port: int
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/nobody-listens"
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 1)], callback_url=url)

    async def dead_lettered() -> list[Any]:
        return await shop.runtime.bus.dead_letters("transaction.notifier")

    [letter] = await eventually(dead_lettered, timeout=10)
    assert letter.event.type == "TransactionCompleted"
    assert letter.event.payload["transaction_id"] == sale["transaction_id"]
    assert letter.attempts == shop.runtime.settings.retry_attempts
    assert "ConnectError" in letter.reason
    assert (await shop.final(sale["transaction_id"]))["status"] == "COMPLETED"


# -- authentication --------------------------------------------------------------------


async def send_as(shop: Shop, method: str, url: str, key: str | None) -> httpx.Response:
    request = shop.client.build_request(method, url)
    del request.headers["X-API-Key"]
    if key is not None:
        request.headers["X-API-Key"] = key
    return await shop.client.send(request)


async def test_every_api_route_needs_a_valid_api_key(shop: Shop) -> None:
    spec = (await send_as(shop, "GET", "/openapi.json", None)).json()
    routes = [
        (method.upper(), path.replace("{", "").replace("}", ""))
        for path, operations in spec["paths"].items()
        for method in operations
    ]
    assert {path for _, path in routes if not path.startswith("/api/")} == {"/health", "/metrics"}
    api = [(method, path) for method, path in routes if path.startswith("/api/")]
    assert len(api) >= 20, api
    before = await business_events(shop)

    for method, path in api:
        missing = await send_as(shop, method, path, None)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json() == {"error": "unauthorized", "detail": "missing X-API-Key header"}
        assert missing.headers["www-authenticate"] == "API-Key"
        wrong = await send_as(shop, method, path, "not-" + API_KEY)
        assert wrong.status_code == 401, (method, path, wrong.text)
        assert wrong.json() == {"error": "unauthorized", "detail": "invalid API key"}

    assert await business_events(shop) == before


async def test_health_and_api_documentation_need_no_key(shop: Shop) -> None:
    health = await send_as(shop, "GET", "/health", None)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["mode"] == "embedded"

    spec = await send_as(shop, "GET", "/openapi.json", None)
    assert spec.status_code == 200
    assert "/api/transactions/{transaction_id}/events" in spec.json()["paths"]
    assert spec.json()["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"

    docs = await send_as(shop, "GET", "/docs", None)
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


# -- invalid input ---------------------------------------------------------------------


def detail_of(response: httpx.Response) -> Any:
    return response.json()["detail"]


async def test_invalid_input_is_refused_precisely_and_writes_nothing(
    shop: Shop, shelf: dict[str, str]
) -> None:
    store, coffee = shelf["store"], shelf["coffee"]
    # A first sale makes sure the transaction service knows the store and products.
    first = await shop.sell(store, [(coffee, 1)])
    await shop.final(first["transaction_id"])
    await settle(shop, store, coffee)

    def sale(**changes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "store_id": store, "customer_id": "bob", "payment_method": "VISA",
            "items": [{"product_id": coffee, "quantity": 1}],
        }
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    def field_error(loc: list[Any], kind: str) -> Callable[[httpx.Response], None]:
        def check(response: httpx.Response) -> None:
            errors = detail_of(response)
            assert [(e["loc"], e["type"]) for e in errors] == [(loc, kind)], errors

        return check

    def message(status: int, error: str, text: str) -> Callable[[httpx.Response], None]:
        def check(response: httpx.Response) -> None:
            assert response.status_code == status
            assert response.json() == {"error": error, "detail": text}

        return check

    sales = "/api/transactions"
    restock = f"/api/stock/{store}/{coffee}/restock"
    cases: list[tuple[str, str, str, Any, int, Callable[[httpx.Response], None]]] = [
        ("unknown product", "POST", sales,
         sale(items=[{"product_id": "nope", "quantity": 1}]),
         422, message(422, "business_rule_violation", "unknown product 'nope'")),
        ("unknown store", "POST", sales, sale(store_id="nowhere"),
         422, message(422, "business_rule_violation", "unknown store 'nowhere'")),
        ("quantity 0", "POST", sales, sale(items=[{"product_id": coffee, "quantity": 0}]),
         422, field_error(["body", "items", 0, "quantity"], "greater_than_equal")),
        ("quantity 1001", "POST", sales,
         sale(items=[{"product_id": coffee, "quantity": 1001}]),
         422, field_error(["body", "items", 0, "quantity"], "less_than_equal")),
        ("fractional quantity", "POST", sales,
         sale(items=[{"product_id": coffee, "quantity": 1.5}]),
         422, field_error(["body", "items", 0, "quantity"], "int_from_float")),
        ("empty items", "POST", sales, sale(items=[]),
         422, field_error(["body", "items"], "too_short")),
        ("missing payment_method", "POST", sales,
         {k: v for k, v in sale().items() if k != "payment_method"},
         422, field_error(["body", "payment_method"], "missing")),
        ("blank payment_method", "POST", sales, sale(payment_method="   "),
         400, message(400, "invalid_input", "payment_method must not be empty")),
        ("blank customer_id", "POST", sales, sale(customer_id="  "),
         400, message(400, "invalid_input", "customer_id must not be empty")),
        ("callback_url not a URL", "POST", sales, sale(callback_url="not a url"),
         422, field_error(["body", "callback_url"], "url_parsing")),
        ("body not JSON", "POST", sales, b"{not json",
         422, lambda r: None),
        ("misspelt field on a sale", "POST", sales, sale(callbak_url="http://x.test/"),
         422, field_error(["body", "callbak_url"], "extra_forbidden")),
        ("unknown field on a store", "POST", "/api/stores",
         {"name": "N", "district": "D", "address": "A", "owner": "x"},
         422, field_error(["body", "owner"], "extra_forbidden")),
        ("fractional unit_price", "POST", "/api/products",
         {"sku": "X-1", "name": "X", "unit_price": 12.5, "currency": "CAD"},
         422, field_error(["body", "unit_price"], "int_type")),
        ("unit_price as text", "POST", "/api/products",
         {"sku": "X-1", "name": "X", "unit_price": "1250", "currency": "CAD"},
         422, field_error(["body", "unit_price"], "int_type")),
        ("unit_price 0", "POST", "/api/products",
         {"sku": "X-1", "name": "X", "unit_price": 0, "currency": "CAD"},
         422, field_error(["body", "unit_price"], "greater_than")),
        ("currency not ISO 4217", "POST", "/api/products",
         {"sku": "X-1", "name": "X", "unit_price": 100, "currency": "cad"},
         422, field_error(["body", "currency"], "string_pattern_mismatch")),
        ("restock of 0", "POST", restock, {"quantity": 0},
         422, field_error(["body", "quantity"], "greater_than")),
        ("restock of -3", "POST", restock, {"quantity": -3},
         422, field_error(["body", "quantity"], "greater_than")),
        ("restock of an unknown product", "POST", f"/api/stock/{store}/nope/restock",
         {"quantity": 1}, 404, message(404, "not_found", "no product nope")),
        ("restock in an unknown store", "POST", f"/api/stock/nowhere/{coffee}/restock",
         {"quantity": 1}, 404, message(404, "not_found", "no store nowhere")),
        ("close an unknown store", "POST", "/api/stores/nowhere/close", {"reason": "x"},
         404, lambda r: None),
        ("reopen an open store", "POST", f"/api/stores/{store}/reopen", None,
         422, lambda r: None),
        ("price of an unknown product", "PUT", "/api/products/nope/price",
         {"unit_price": 100, "currency": "CAD"}, 404, lambda r: None),
        ("list with limit 0", "GET", "/api/transactions?limit=0", None,
         422, field_error(["query", "limit"], "greater_than_equal")),
        ("list with an unknown status", "GET", "/api/transactions?status=LOST", None,
         422, field_error(["query", "status"], "enum")),
    ]
    listed = await shop.ok("GET", "/api/transactions")
    before = await business_events(shop)

    for name, method, url, body, status, check in cases:
        if isinstance(body, bytes):
            response = await shop.client.request(
                method, url, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            response = await shop.client.request(method, url, json=body)
        assert response.status_code == status, (name, response.status_code, response.text)
        check(response)
        assert await business_events(shop) == before, f"{name} wrote events"

    assert await shop.ok("GET", "/api/transactions") == listed


async def test_a_long_idempotency_key_is_refused(shop: Shop, shelf: dict[str, str]) -> None:
    body = {"store_id": shelf["store"], "customer_id": "bob", "payment_method": "VISA",
            "items": [{"product_id": shelf["coffee"], "quantity": 1}]}
    before = await business_events(shop)
    response = await shop.client.post(
        "/api/transactions", json=body, headers={"Idempotency-Key": "k" * 201}
    )
    assert response.status_code == 422
    assert detail_of(response)[0]["loc"] == ["header", "idempotency-key"]
    assert await business_events(shop) == before


# -- Idempotency-Key -------------------------------------------------------------------


def created_events(events: list[RecordedEvent], transaction_id: str) -> list[RecordedEvent]:
    return [e for e in events if e.type == "TransactionCreated"
            and e.payload["transaction_id"] == transaction_id]


async def test_the_same_idempotency_key_records_one_sale(
    shop: Shop, shelf: dict[str, str]
) -> None:
    key = {"Idempotency-Key": "order-7f3a"}
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)], payment_method="VISA")
    await shop.final(sale["transaction_id"])  # the catalog replica is warm from here on
    body = {"store_id": shelf["store"], "customer_id": "bob", "payment_method": "VISA",
            "items": [{"product_id": shelf["coffee"], "quantity": 2}]}

    first = await shop.client.post("/api/transactions", json=body, headers=key)
    again = await shop.client.post("/api/transactions", json=body, headers=key)

    assert (first.status_code, again.status_code) == (201, 200)
    tid = first.json()["transaction_id"]
    assert again.json()["transaction_id"] == tid
    assert again.headers["Location"] == first.headers["Location"] == f"/api/transactions/{tid}"
    final = await shop.final(tid)
    assert final["status"] == "COMPLETED"
    replay = await shop.client.post("/api/transactions", json=body, headers=key)
    assert replay.status_code == 200
    assert replay.json()["status"] == "COMPLETED", "a replay answers with the sale as it is now"
    assert len(created_events(await log_events(shop), tid)) == 1
    payments = await shop.ok("GET", f"/api/payments?transaction_id={tid}")
    assert [p["amount"] for p in payments["items"]] == [2 * 1899], "charged once"

    other = await shop.client.post("/api/transactions", headers=key,
                                   json={**body, "customer_id": "mallory"})
    assert other.status_code == 409, "a key reused for another request is refused"
    assert "different request" in other.json()["detail"]


async def test_concurrent_posts_with_one_idempotency_key_record_one_sale(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 1)])
    await shop.final(sale["transaction_id"])
    body = {"store_id": shelf["store"], "customer_id": "bob", "payment_method": "VISA",
            "items": [{"product_id": shelf["milk"], "quantity": 1}]}

    responses = await asyncio.gather(*(
        shop.client.post("/api/transactions", json=body, headers={"Idempotency-Key": "race"})
        for _ in range(8)
    ))

    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    [tid] = {r.json()["transaction_id"] for r in responses}
    assert len(created_events(await log_events(shop), tid)) == 1
    assert (await shop.final(tid))["status"] == "COMPLETED"


# -- listing ---------------------------------------------------------------------------


async def ids_of(shop: Shop, query: str, limit: int = 50) -> list[list[str]]:
    """Every page of /api/transactions?query, as lists of ids, following next_cursor."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        url = f"/api/transactions?{query}&limit={limit}"
        page = await shop.ok("GET", url + (f"&cursor={cursor}" if cursor else ""))
        pages.append([t["transaction_id"] for t in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def test_listing_filters_and_pages_in_creation_order(shop: Shop) -> None:
    a, b = await shop.open_store("A"), await shop.open_store("B")
    soap = await shop.add_product("SAV-1", 300)
    for store in (a, b):
        await shop.restock(store, soap, 50)
    plan = [(a, "alice", "VISA"), (b, "bob", "VISA"), (a, "bob", "FAIL_CARD"),
            (a, "alice", "VISA"), (b, "alice", "FAIL_CARD")]
    made = []
    for store, customer, method in plan:
        sale = await shop.sell(store, [(soap, 1)], payment_method=method, customer_id=customer)
        made.append(sale["transaction_id"])
    for tid in made:
        await shop.final(tid)
    s1, s2, s3, s4, s5 = made

    assert await ids_of(shop, "") == [made]
    assert await ids_of(shop, "", limit=2) == [[s1, s2], [s3, s4], [s5]]
    assert await ids_of(shop, f"store_id={a}") == [[s1, s3, s4]]
    assert await ids_of(shop, f"store_id={a}", limit=2) == [[s1, s3], [s4]]
    assert await ids_of(shop, f"store_id={b}", limit=2) == [[s2, s5]]
    assert await ids_of(shop, "status=CANCELLED") == [[s3, s5]]
    assert await ids_of(shop, f"status=COMPLETED&store_id={a}", limit=1) == [[s1], [s4]]
    assert await ids_of(shop, "customer_id=alice") == [[s1, s4, s5]]
    assert await ids_of(shop, "customer_id=alice&status=COMPLETED") == [[s1, s4]]
    assert await ids_of(shop, "customer_id=carol") == [[]]
    assert await ids_of(shop, "status=PENDING") == [[]]
    page = await shop.ok("GET", f"/api/transactions?store_id={a}&limit=1")
    assert page["items"][0]["status"] in TERMINAL and page["items"][0]["lines"] == [
        {"product_id": soap, "quantity": 1, "unit_price": 300}
    ]


async def test_every_paged_list_refuses_a_cursor_it_did_not_hand_out(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)])
    await shop.final(sale["transaction_id"])
    store = shelf["store"]
    lists = ["/api/transactions", "/api/transactions?asOf=2100-01-01T00:00:00Z",
             "/api/stores", "/api/products", "/api/orders", f"/api/stock/{store}",
             f"/api/stock/{store}?asOf=2100-01-01T00:00:00Z", "/api/reservations",
             "/api/payments", "/api/sagas", "/api/events", "/api/audit"]
    products = await shop.ok("GET", "/api/products?limit=1")
    of_another_list = products["next_cursor"]
    assert of_another_list is not None
    garbled = ["garbage", "", "%00", "x" * 5000, store, sale["transaction_id"],
               of_another_list, of_another_list[:-1], "99999999", "-1"]
    for url in lists:
        # Each list still pages with its own cursors...
        first = await shop.ok("GET", url, params={"limit": 1})
        if first["next_cursor"] is not None:
            await shop.ok("GET", url, params={"limit": 1, "cursor": first["next_cursor"]})
        # ... and refuses any other, instead of an empty page that looks like the end.
        for cursor in garbled:
            if url == "/api/products" and cursor == of_another_list:
                continue
            response = await shop.client.get(url, params={"cursor": cursor})
            assert response.status_code == 400, (url, cursor[:40], response.text)
            assert response.json()["error"] == "invalid_input"
            assert "cursor" in response.json()["detail"]


async def test_a_422_echoes_at_most_the_start_of_each_input_and_20_problems(
    shop: Shop, shelf: dict[str, str]
) -> None:
    huge = "é" * 100_000
    body = {"store_id": shelf["store"], "customer_id": "bob", "payment_method": "VISA",
            "items": [{"product_id": huge, "quantity": 0} for _ in range(30)]}
    response = await shop.client.post("/api/transactions", json=body)
    assert response.status_code == 422
    answer = response.json()
    assert answer["error"] == "invalid_input"
    assert len(answer["detail"]) == 20
    assert answer["more_problems"] > 0
    assert len(response.content) < 20 * 1000
    for problem in answer["detail"]:
        echoed = json.dumps(problem["input"]) if not isinstance(problem["input"], str) \
            else problem["input"]
        assert len(echoed) < 300, problem
    too_long = [p for p in answer["detail"] if p["type"] == "string_too_long"]
    assert too_long and too_long[0]["input"] == "é" * 200 + "…(truncated, 100000 chars)"
    # So is an unknown field's name.
    odd = await shop.client.post("/api/stores", json={"name": "N", "district": "D",
                                                      "address": "A", "k" * 50_000: 1})
    (problem,) = odd.json()["detail"]
    assert problem["loc"] == ["body", "k" * 200 + "…(truncated, 50000 chars)"]
    assert len(odd.content) < 1000
    # A short input is echoed whole, as before.
    short = await shop.client.post("/api/transactions", json={**body, "items": [
        {"product_id": shelf["coffee"], "quantity": 0}]})
    (problem,) = short.json()["detail"]
    assert problem["input"] == 0 and "more_problems" not in short.json()


async def test_sales_created_with_an_idempotency_key_list_in_creation_order(
    shop: Shop, shelf: dict[str, str]
) -> None:
    made = []
    for n in range(4):
        extra = {"headers": {"Idempotency-Key": f"checkout-{n}"}} if n % 2 else {}
        body = {"store_id": shelf["store"], "customer_id": "bob", "payment_method": "VISA",
                "items": [{"product_id": shelf["milk"], "quantity": 1}]}

        async def post(body: dict[str, Any] = body, extra: dict[str, Any] = extra) -> Any:
            r = await shop.client.post("/api/transactions", json=body, **extra)
            return None if r.status_code == 422 else r

        made.append((await eventually(post)).json()["transaction_id"])
        await asyncio.sleep(0.002)  # distinct milliseconds: order is not left to chance

    async def all_listed() -> bool:  # the list is a projection: it shows them shortly
        return sum(map(len, await ids_of(shop, ""))) == len(made)

    await eventually(all_listed)
    assert await ids_of(shop, "") == [made]


# -- what the saga did, as the query endpoints show it ---------------------------------


async def test_the_query_endpoints_show_what_the_sagas_did(shop: Shop) -> None:
    open_store = await shop.open_store("Plateau")
    closed_store = await shop.open_store("Verdun")
    jam = await shop.add_product("CONF-1", 450)
    for store in (open_store, closed_store):
        await shop.restock(store, jam, 10)
    closed = await shop.ok("POST", f"/api/stores/{closed_store}/close", json={"reason": "flood"})
    assert (closed["open"], closed["closed_reason"]) == (False, "flood")

    done = await shop.sell(open_store, [(jam, 3)])
    failed = await shop.sell(closed_store, [(jam, 2)])
    assert (await shop.final(done["transaction_id"]))["status"] == "COMPLETED"
    assert (await shop.final(failed["transaction_id"]))["status"] == "CANCELLED"
    await settle(shop, open_store, jam)
    await settle(shop, closed_store, jam)
    ok, ko = done["transaction_id"], failed["transaction_id"]

    # stores and catalog
    stores = await shop.ok("GET", "/api/stores")
    assert {s["store_id"]: s["open"] for s in stores["items"]} == {
        open_store: True, closed_store: False
    }
    assert (await shop.ok("GET", f"/api/stores/{open_store}"))["name"] == "Plateau"
    product = await shop.ok("GET", f"/api/products/{jam}")
    assert (product["sku"], product["unit_price"], product["currency"]) == ("CONF-1", 450, "CAD")
    assert [p["product_id"] for p in (await shop.ok("GET", "/api/products"))["items"]] == [jam]

    # stock: the completed sale consumed 3, the failed one gave its 2 back
    assert await shop.stock(open_store, jam) == {
        "store_id": open_store, "product_id": jam, "on_hand": 7, "reserved": 0, "available": 7,
    }
    assert (await shop.stock(closed_store, jam))["on_hand"] == 10
    listing = await shop.ok("GET", f"/api/stock/{open_store}")
    assert [(s["product_id"], s["on_hand"]) for s in listing["items"]] == [(jam, 7)]

    # reservations
    kept = await shop.ok("GET", f"/api/reservations/{ok}")
    assert (kept["status"], kept["fulfilled"]) == ("COMMITTED", True)
    assert kept["lines"] == [{"product_id": jam, "quantity": 3}]
    given_back = await shop.ok("GET", f"/api/reservations/{ko}")
    assert (given_back["status"], given_back["reason"]) == ("RELEASED", "fulfillment_failed")

    # payments: captured for the completed sale, refunded for the failed one
    paid = await shop.ok("GET", f"/api/payments/{ok}")
    assert (paid["status"], paid["amount"], paid["store_id"]) == ("CAPTURED", 1350, open_store)
    assert paid["bank_reference"] and paid["refund_reference"] is None
    refunded = await shop.ok("GET", f"/api/payments/{ko}")
    assert (refunded["status"], refunded["amount"]) == ("REFUNDED", 900)
    assert refunded["refund_reference"] and refunded["reason"] == "fulfillment_failed"
    by_status = await shop.ok("GET", "/api/payments?status=REFUNDED")
    assert [p["transaction_id"] for p in by_status["items"]] == [ko]
    by_store = await shop.ok("GET", f"/api/payments?store_id={open_store}")
    assert [p["transaction_id"] for p in by_store["items"]] == [ok]

    # orders
    order = await shop.ok("GET", f"/api/orders/{ok}")
    assert (order["status"], order["store_id"]) == ("FULFILLED", open_store)
    assert order["order_id"] == (await shop.ok("GET", f"/api/transactions/{ok}"))["order_id"]
    refused = await shop.ok("GET", f"/api/orders/{ko}")
    assert (refused["status"], refused["reason"], refused["order_id"]) == (
        "FAILED", "store_closed", None
    )
    assert [o["transaction_id"] for o in
            (await shop.ok("GET", "/api/orders?status=FULFILLED"))["items"]] == [ok]

    # the transaction itself links every piece
    sale = await shop.ok("GET", f"/api/transactions/{ok}")
    assert sale["payment_id"] == paid["payment_id"]
    assert sale["reservation_id"] == kept["reservation_id"]
    assert sale["total"] == 1350

    # and unknown ids are 404s, never 500s
    for url in ("/api/transactions/x", "/api/payments/x", "/api/orders/x",
                "/api/reservations/x", "/api/stores/x", "/api/products/x", "/api/stock/x",
                f"/api/stock/x/{jam}", f"/api/stock/{open_store}/x"):
        response = await shop.client.get(url)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["error"] == "not_found"
