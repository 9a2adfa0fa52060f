"""The seed flows, competing consumers and crashes end to end in distributed mode: each
service its own OS process on PostgreSQL and RabbitMQ, driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from magasin.config import Settings
from magasin.messaging.partitioning import configured_partitions
from tests.e2e.conftest import eventually
from tests.e2e.processes import (
    SERVICES,
    Cluster,
    ServiceProcess,
    consumer_count,
    running_cluster,
)
from tests.e2e.webhooks import Hook

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

API_KEY = "e2e-distributed-key"
ADMIN_KEY = "e2e-distributed-admin-key"
RETRY_ATTEMPTS = 3
TERMINAL = {"COMPLETED", "CANCELLED"}
SAGA_TIMEOUT = 60.0
GATEWAY_LIMITS = {"gateway_rate_per_s": 100_000, "gateway_burst": 100_000}
"""The tests poll hard (every 20 ms per sale in flight): no rate limit in their way."""
COMMANDS = {"ChargePayment", "ReserveStock", "PrepareOrder", "RefundPayment", "ReleaseStock",
            "VoidPayment"}
SAGA_STEPS = ["PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED"]


MODES = ("choreography", "orchestration")
"""The saga coordinations; the seed flows and the crashes run under each, same assertions."""


@contextmanager
def distributed_cluster(
    pg_database: str, amqp_url: str, workdir: Path, saga_mode: str
) -> Iterator[Cluster]:
    """The four services and the event store, one process each, on a database and a RabbitMQ
    namespace of their own (every service in its schema `magasin_<service>`), removed
    afterwards, behind the real gateway (nginx) through which the tests make every call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_API_KEYS=API_KEY,
        MAGASIN_ADMIN_API_KEYS=ADMIN_KEY,
        MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_BANK_DECLINE_RATE="0",
        MAGASIN_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS),
        MAGASIN_RETRY_INITIAL_DELAY="0.05",
        MAGASIN_SAGA_MODE=saga_mode,
        PYTHONUNBUFFERED="1",
    )
    with running_cluster(
        pg_database, amqp_url, workdir, kind="e2e",
        services=(*SERVICES, "eventstore"), env=env, retry_attempts=RETRY_ATTEMPTS,
        gateway=GATEWAY_LIMITS,
    ) as running:
        yield running


class Deployments:
    """The deployment in one coordination at a time: two at once would take more
    PostgreSQL connections than the shared server has. Tests parametrized over MODES with
    module scope are grouped by mode, so each mode starts once per module."""

    def __init__(self, pg_database: str, amqp_url: str,
                 factory: pytest.TempPathFactory) -> None:
        self._args = (pg_database, amqp_url)
        self._factory = factory
        self._running: tuple[str, Cluster, ExitStack] | None = None

    def get(self, saga_mode: str) -> Cluster:
        if self._running is not None and self._running[0] != saga_mode:
            self.close()
        if self._running is None:
            stack = ExitStack()
            workdir = self._factory.mktemp(saga_mode)
            cluster = stack.enter_context(distributed_cluster(*self._args, workdir, saga_mode))
            self._running = (saga_mode, cluster, stack)
        return self._running[1]

    def close(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running[2].close()


@pytest.fixture(scope="module")
def deployments(
    pg_database: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployments]:
    running = Deployments(pg_database, amqp_url, tmp_path_factory)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def saga_mode() -> str:
    """The coordination a test's deployment runs; the flows parametrize it over MODES."""
    return "choreography"


@pytest.fixture
def cluster(deployments: Deployments, saga_mode: str) -> Cluster:
    """The deployment running `saga_mode` (default: choreography)."""
    return deployments.get(saga_mode)


GATEWAY_GAVE_UP = {502, 503, 504}
"""What the gateway answers when no process of a service did: a POST then may or may not
have been recorded, and the client retries it with its Idempotency-Key."""


class Magasin:
    """An HTTP client of the distributed services, through their one gateway URL, with the
    steps a test needs."""

    def __init__(self, cluster: Cluster, client: httpx.AsyncClient) -> None:
        self.cluster = cluster
        self.client = client
        self.url = cluster.gateway.url

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        response = await self.client.request(method, self.url + path, **kw)
        assert response.status_code < 300, (path, response.status_code, response.text)
        return response.json()

    async def open_store(self, name: str) -> str:
        body = {"name": name, "district": "Ville-Marie", "address": "1 rue X"}
        store: str = (await self.ok("POST", "/api/stores", json=body))["store_id"]
        return store

    async def add_product(self, sku: str, unit_price: int) -> str:
        body = {"sku": f"{sku}-{uuid.uuid4().hex[:6]}", "name": sku, "unit_price": unit_price,
                "currency": "CAD"}
        product: str = (await self.ok("POST", "/api/products", json=body))["product_id"]
        return product

    async def restock(self, store_id: str, product_id: str, quantity: int) -> None:
        url = f"{self.url}/api/stock/{store_id}/{product_id}/restock"

        async def attempt() -> bool:  # 404 until inventory's replica knows store and product
            r = await self.client.post(url, json={"quantity": quantity})
            assert r.status_code in (200, 404), r.text
            return r.status_code == 200

        await eventually(attempt)

    async def sell(self, store_id: str, items: list[tuple[str, int]],
                   payment_method: str = "VISA", **extra: Any) -> dict[str, Any]:
        body = {"store_id": store_id, "customer_id": "alice", "payment_method": payment_method,
                "items": [{"product_id": p, "quantity": q} for p, q in items], **extra}
        url = f"{self.url}/api/transactions"
        key = {"Idempotency-Key": uuid.uuid4().hex}

        async def attempt() -> httpx.Response | None:
            try:
                r = await self.client.post(url, json=body, headers=key)
            except httpx.TransportError:
                return None  # the connection broke: retry, same key
            if r.status_code in GATEWAY_GAVE_UP:
                return None  # no process of the service answered: retry, same key
            # The catalog replica may lag a bit behind the store service.
            return None if r.status_code == 422 and "unknown" in r.text else r

        response: httpx.Response = await eventually(attempt)
        # 200: a retry whose first attempt was recorded though its answer was lost.
        assert response.status_code in (200, 201), response.text
        sale: dict[str, Any] = response.json()
        return sale

    async def final(self, transaction_id: str) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            url = f"{self.url}/api/transactions/{transaction_id}"
            try:
                response = await self.client.get(url)
            except httpx.TransportError:
                # The process answering was killed after its headers had left (the gateway
                # can only retry on another process before that): poll again.
                return None
            assert response.status_code == 200, response.text
            doc: dict[str, Any] = response.json()
            # Terminal, and the read model too (lists and stats read it; a GET by id
            # replays a lagging one).
            projected = response.headers["X-Magasin-Source"] == "read-model"
            return doc if doc["status"] in TERMINAL and projected else None

        result: dict[str, Any] = await eventually(done, timeout=SAGA_TIMEOUT)
        return result

    async def stock(self, store_id: str, product_id: str) -> dict[str, Any]:
        line: dict[str, Any] = await self.ok(
            "GET", f"/api/stock/{store_id}/{product_id}"
        )
        return line

    async def read(self, path: str) -> dict[str, Any]:
        """A read-model document, once its projection has it (a 404 may be only lag)."""

        async def found() -> dict[str, Any] | None:
            response = await self.client.get(self.url + path)
            if response.status_code == 404:
                return None
            assert response.status_code == 200, (path, response.text)
            doc: dict[str, Any] = response.json()
            return doc

        result: dict[str, Any] = await eventually(found, timeout=SAGA_TIMEOUT)
        return result

    async def payment(self, transaction_id: str) -> dict[str, Any]:
        return await self.read(f"/api/payments/{transaction_id}")

    async def every(self, path: str, **params: str) -> list[dict[str, Any]]:
        """Every item of a paged list endpoint."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query: dict[str, str] = {**params, "limit": "200"}
            if cursor is not None:
                query["cursor"] = cursor
            page = await self.ok("GET", path, params=query)
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture
async def magasin(cluster: Cluster, request: pytest.FixtureRequest) -> AsyncIterator[Magasin]:
    failed_before = request.session.testsfailed
    async with httpx.AsyncClient(
        headers={"X-API-Key": API_KEY}, timeout=30.0,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    ) as client:
        yield Magasin(cluster, client)
    if request.session.testsfailed > failed_before:
        # Shown under "Captured stdout teardown" in the failure's report.
        print(cluster.logs())


async def query(cluster: Cluster, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Read the services' own tables (schemas `magasin_<service>`) directly."""
    conn = await asyncpg.connect(cluster.env["MAGASIN_DATABASE_URL"])
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def dead_letters(cluster: Cluster) -> list[dict[str, Any]]:
    """Every dead letter of every service: consumer, event type, sale and reason."""
    letters: list[dict[str, Any]] = []
    for service in SERVICES:
        rows = await query(
            cluster,
            f'SELECT body FROM "magasin_{service}".documents WHERE collection = $1',
            "bus.dead_letters",
        )
        for row in rows:
            doc = json.loads(row["body"])
            envelope = json.loads(doc["body"]) if doc.get("type") else {}
            letters.append({
                "consumer": doc["consumer"], "type": doc.get("type"),
                "sale": envelope.get("correlation_id"), "reason": doc["reason"],
            })
    return letters


async def event_types(cluster: Cluster, transaction_id: str) -> dict[str, list[str]]:
    """The events each service recorded for one sale, per service, in log order."""
    found: dict[str, list[str]] = {}
    for service in SERVICES:
        rows = await query(
            cluster,
            f'SELECT type FROM "magasin_{service}".events WHERE correlation_id = $1 '
            "ORDER BY global_position",
            transaction_id,
        )
        found[service] = [row["type"] for row in rows]
    return found


async def sale_stream(cluster: Cluster, transaction_id: str) -> list[str]:
    """The events of the sale's own stream. Under orchestration the transaction service's
    log also holds the orchestrator's stream of the sale, whose last decisions may commit
    after the sale's TransactionCancelled (two consumers of one reply, in either order)."""
    rows = await query(
        cluster,
        'SELECT type FROM "magasin_transaction".events WHERE stream_id = $1 '
        "ORDER BY stream_version",
        f"transaction-{transaction_id}",
    )
    return [row["type"] for row in rows]


def assert_coordinated(saga_mode: str, types: dict[str, list[str]], *expected: str) -> None:
    """The sale ran under `saga_mode`: orchestrated, the transaction service sent exactly
    the `expected` commands, in order; choreographed, it sent none."""
    sent = [t for t in types["transaction"] if t in COMMANDS]
    assert sent == (list(expected) if saga_mode == "orchestration" else []), sent


def assert_every_step_reported(sales: list[dict[str, Any]]) -> None:
    """Each completed sale's history lists every step of the saga, in order."""
    histories = [[h["status"] for h in s["history"]] for s in sales]
    wrong = [h for h in histories if h != SAGA_STEPS]
    assert not wrong, wrong


# -- 1. the seed flows --------------------------------------------------------------------


@pytest.fixture
async def shelf(magasin: Magasin) -> dict[str, str]:
    store = await magasin.open_store("Centre")
    coffee = await magasin.add_product("CAF", 1899)
    milk = await magasin.add_product("LAI", 649)
    await asyncio.gather(*(magasin.restock(store, p, 10) for p in (coffee, milk)))
    return {"store": store, "coffee": coffee, "milk": milk}


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_a_paid_sale_with_stock_completes_and_consumes_the_stock(
    magasin: Magasin, shelf: dict[str, str], saga_mode: str
) -> None:
    cluster = magasin.cluster
    sale = await magasin.sell(shelf["store"], [(shelf["coffee"], 2), (shelf["milk"], 1)])
    assert sale["status"] == "PENDING"
    assert sale["total"] == 2 * 1899 + 649

    final = await magasin.final(sale["transaction_id"])

    assert final["status"] == "COMPLETED"
    payment = await magasin.payment(sale["transaction_id"])
    assert (payment["status"], payment["amount"]) == ("CAPTURED", sale["total"])
    order = await magasin.read(f"/api/orders/{sale['transaction_id']}")
    assert order["status"] == "FULFILLED"

    async def committed() -> bool:
        coffee = await magasin.stock(shelf["store"], shelf["coffee"])
        milk = await magasin.stock(shelf["store"], shelf["milk"])
        return (coffee["on_hand"], coffee["reserved"], milk["on_hand"], milk["reserved"]) == (
            8, 0, 9, 0)

    await eventually(committed)
    types = await event_types(cluster, sale["transaction_id"])
    assert types["transaction"][0] == "TransactionCreated"
    assert "TransactionCompleted" in types["transaction"]
    assert "PaymentProcessed" in types["payment"]
    assert "InventoryReserved" in types["inventory"] and "InventoryCommitted" in types["inventory"]
    assert "OrderFulfilled" in types["store"]
    assert_every_step_reported([final])
    assert_coordinated(saga_mode, types, "ChargePayment", "ReserveStock", "PrepareOrder")


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_a_declined_card_cancels_the_sale_without_touching_stock(
    magasin: Magasin, shelf: dict[str, str], saga_mode: str
) -> None:
    cluster = magasin.cluster
    sale = await magasin.sell(shelf["store"], [(shelf["coffee"], 1)], payment_method="FAIL_CARD")

    final = await magasin.final(sale["transaction_id"])

    assert (final["status"], final["reason"]) == ("CANCELLED", "declined")
    payment = await magasin.payment(sale["transaction_id"])
    assert payment["status"] == "FAILED"
    line = await magasin.stock(shelf["store"], shelf["coffee"])
    assert (line["on_hand"], line["reserved"]) == (10, 0)
    types = await event_types(cluster, sale["transaction_id"])
    assert "PaymentFailed" in types["payment"]
    assert "TransactionCancelled" in types["transaction"]
    assert "InventoryReserved" not in types["inventory"]
    assert_coordinated(saga_mode, types, "ChargePayment")


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_inventory_unavailable_refunds_then_cancels(
    magasin: Magasin, shelf: dict[str, str], saga_mode: str
) -> None:
    cluster = magasin.cluster
    sale = await magasin.sell(shelf["store"], [(shelf["milk"], 1), (shelf["coffee"], 11)])

    final = await magasin.final(sale["transaction_id"])

    assert (final["status"], final["reason"]) == ("CANCELLED", "inventory_unavailable")
    payment = await magasin.payment(sale["transaction_id"])
    assert (payment["status"], payment["amount"]) == ("REFUNDED", sale["total"])
    milk = await magasin.stock(shelf["store"], shelf["milk"])
    assert (milk["on_hand"], milk["reserved"]) == (10, 0), "all lines or none are reserved"
    types = await event_types(cluster, sale["transaction_id"])
    assert "InventoryUnavailable" in types["inventory"]
    assert "PaymentRefunded" in types["payment"]
    assert (await sale_stream(cluster, sale["transaction_id"]))[-1] == "TransactionCancelled"
    assert_coordinated(saga_mode, types, "ChargePayment", "ReserveStock", "RefundPayment")


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_a_closed_store_releases_the_stock_refunds_and_cancels(
    magasin: Magasin, shelf: dict[str, str], saga_mode: str
) -> None:
    cluster = magasin.cluster
    await magasin.ok("POST", f"/api/stores/{shelf['store']}/close",
                     json={"reason": "flood"})
    sale = await magasin.sell(shelf["store"], [(shelf["coffee"], 3)])

    final = await magasin.final(sale["transaction_id"])

    assert final["status"] == "CANCELLED"
    assert final["reason"] == "fulfillment_failed:store_closed"
    payment = await magasin.payment(sale["transaction_id"])
    assert payment["status"] == "REFUNDED"

    async def released() -> dict[str, Any] | None:
        line = await magasin.stock(shelf["store"], shelf["coffee"])
        return line if line["reserved"] == 0 else None

    line = await eventually(released)
    assert (line["on_hand"], line["reserved"], line["available"]) == (10, 0, 10)
    types = await event_types(cluster, sale["transaction_id"])
    assert "OrderFulfillmentFailed" in types["store"]
    assert "InventoryReleased" in types["inventory"]
    assert "PaymentRefunded" in types["payment"]
    assert (await sale_stream(cluster, sale["transaction_id"]))[-1] == "TransactionCancelled"
    # Orchestrated, the compensation runs in the order the seed draws: refund, then release.
    assert_coordinated(saga_mode, types, "ChargePayment", "ReserveStock", "PrepareOrder",
                       "RefundPayment", "ReleaseStock")


async def deliveries(magasin: Magasin, *consumers: str) -> Counter[str]:
    """Broker deliveries to these consumers so far, all outcomes (the processes' /metrics)."""
    found: Counter[str] = Counter()
    for process in magasin.cluster.processes:
        text = (await magasin.client.get(f"{process.url}/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "magasin_events_consumed_total"
                        and sample.labels["consumer"] in consumers):
                    found[sample.labels["consumer"]] += int(sample.value)
    return found


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_the_orchestrator_and_the_notifier_are_sent_only_the_sales_meant_for_them(
    magasin: Magasin, shelf: dict[str, str], saga_mode: str
) -> None:
    """Routing tags (issue 11): the broker sends the notifier the final event of the sale
    with a callback_url only, and the orchestrator the events of orchestrated sales only
    (its TransactionCreated and the replies to its three commands)."""
    hook = Hook()
    server = await asyncio.start_server(hook.serve_one, "127.0.0.1", 0)
    hook.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/sales"
    async with server:
        watched = ("transaction.orchestrator", "transaction.notifier")
        before = await deliveries(magasin, *watched)
        plain = await magasin.sell(shelf["store"], [(shelf["milk"], 1)])
        await magasin.final(plain["transaction_id"])
        hooked = await magasin.sell(shelf["store"], [(shelf["milk"], 1)],
                                    callback_url=hook.url)
        assert (await magasin.final(hooked["transaction_id"]))["status"] == "COMPLETED"
        await eventually(hook.arrived(1))
        expected = Counter({"transaction.notifier": 1})
        if saga_mode == "orchestration":
            expected["transaction.orchestrator"] = 2 * 4

        async def counted() -> Counter[str] | None:
            got = await deliveries(magasin, *watched) - before
            return got if all(got[c] >= n for c, n in expected.items()) else None

        assert await eventually(counted) == expected
    assert [r.body["transaction_id"] for r in hook.requests] == [hooked["transaction_id"]]


async def test_the_event_store_service_archives_every_event_of_a_saga(
    magasin: Magasin, shelf: dict[str, str], cluster: Cluster
) -> None:
    sale = await magasin.sell(shelf["store"], [(shelf["coffee"], 1)])

    async def done() -> dict[str, Any] | None:  # min_version: read past any projection lag
        doc: dict[str, Any] = await magasin.ok(
            "GET", f"/api/transactions/{sale['transaction_id']}",
            params={"min_version": sale["version"]})
        return doc if doc["status"] in TERMINAL else None

    final = await eventually(done, timeout=SAGA_TIMEOUT)

    async def archived() -> list[dict[str, Any]] | None:
        """The archive's events of the saga, once they are those the services recorded."""
        recorded = await event_types(cluster, sale["transaction_id"])
        page = await magasin.ok("GET", "/api/events",
                                params={"correlation_id": sale["transaction_id"]})
        got = Counter(e["type"] for e in page["items"])
        expected = Counter(t for types in recorded.values() for t in types)
        return page["items"] if got == expected else None

    events = await eventually(archived, timeout=SAGA_TIMEOUT)
    originals = await query(
        cluster, 'SELECT event_id, stream_id, stream_version FROM "magasin_transaction".events '
        "WHERE correlation_id = $1", sale["transaction_id"])
    kept = {(e["event_id"], e["stream_id"], e["stream_version"]) for e in events}
    assert {(r["event_id"], r["stream_id"], r["stream_version"]) for r in originals} <= kept
    replayed = await magasin.ok(
        "POST", f"/api/replay/aggregate/transaction-{sale['transaction_id']}")
    assert (replayed["state"]["status"], replayed["version"]) == ("COMPLETED", final["version"])
    created = next(e for e in events if e["type"] == "TransactionCreated")
    then = await magasin.ok("GET", f"/api/transactions/{sale['transaction_id']}",
                            params={"asOf": created["occurred_at"]})
    assert then["status"] == "PENDING"  # the transaction service replays its own log


# -- 2. and 3. many sales, more processes, crashes: the books must balance ----------------


async def stock_up(
    magasin: Magasin, name: str, stock: dict[str, int]
) -> tuple[str, dict[str, int], dict[str, Any]]:
    """A store with one product per (sku, quantity) of `stock`, once the transaction
    service's catalog replica knows them all. Returns the store id, the stock by product
    id, and the sale that proved the replica up to date (declined: it moves nothing)."""
    store = await magasin.open_store(name)
    products = [await magasin.add_product(sku, 500 + 100 * i)
                for i, sku in enumerate(stock)]
    await asyncio.gather(*(magasin.restock(store, p, q)
                           for p, q in zip(products, stock.values(), strict=True)))
    probe = await magasin.sell(store, [(p, 1) for p in products], payment_method="FAIL_CARD")
    return store, dict(zip(products, stock.values(), strict=True)), probe


def random_sales(
    products: list[str], count: int, seed: int
) -> list[tuple[list[tuple[str, int]], str]]:
    """`count` sales of 1-2 products, 1-3 units each; about one in ten is declined."""
    rng = random.Random(seed)
    sales = []
    for _ in range(count):
        chosen = rng.sample(products, rng.choice((1, 1, 2)))
        method = "FAIL_CARD" if rng.random() < 0.1 else "VISA"
        sales.append(([(p, rng.randint(1, 3)) for p in chosen], method))
    return sales


async def wait_until_all_terminal(
    magasin: Magasin, store: str, products: list[str], expected: int
) -> list[dict[str, Any]]:
    """Every sale of `store` once all `expected` are terminal; checks meanwhile that no
    stock line ever goes negative."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SAGA_TIMEOUT
    while True:
        for product in products:
            line = await magasin.stock(store, product)
            assert min(line["on_hand"], line["reserved"], line["available"]) >= 0, line
        sales = await magasin.every("/api/transactions", store_id=store)
        if len(sales) == expected and all(s["status"] in TERMINAL for s in sales):
            return sales
        # A dead-lettered saga step never runs again by itself: no use waiting for it.
        ids = {s["transaction_id"] for s in sales}
        if letters := [x for x in await dead_letters(magasin.cluster) if x["sale"] in ids]:
            raise AssertionError(f"saga steps were dead-lettered: {letters[:10]}")
        if loop.time() > deadline:
            stuck = {s["transaction_id"]: [h["status"] for h in s["history"]]
                     for s in sales if s["status"] not in TERMINAL}
            letters = [x for x in await dead_letters(magasin.cluster) if x["sale"] in stuck]
            raise AssertionError(
                f"after {SAGA_TIMEOUT}s, {len(sales)}/{expected} sales recorded, "
                f"statuses {Counter(s['status'] for s in sales)}; "
                f"not terminal (with their history): {list(stuck.items())[:10]}; "
                f"their dead letters: {letters[:10]}"
            )
        await asyncio.sleep(0.25)


async def assert_books_balance(
    magasin: Magasin, store: str, stock: dict[str, int], posted: list[dict[str, Any]]
) -> Counter[str]:
    """Every saga of `store` ends; stock moves and money match the completed sales exactly,
    and no sale was reserved or charged twice. Returns the sales' outcomes."""
    products = list(stock)
    sales = await wait_until_all_terminal(magasin, store, products, len(posted))
    assert {s["transaction_id"] for s in sales} == {s["transaction_id"] for s in posted}
    completed = [s for s in sales if s["status"] == "COMPLETED"]
    sold: Counter[str] = Counter()
    for sale in completed:
        for line in sale["lines"]:
            sold[line["product_id"]] += line["quantity"]

    # Stock: what left the shelves is exactly what completed sales took, nothing is held.
    async def settled() -> dict[str, dict[str, Any]] | None:
        lines = {p: await magasin.stock(store, p) for p in products}
        ok = all(
            (line["on_hand"], line["reserved"], line["available"])
            == (stock[p] - sold[p], 0, stock[p] - sold[p])
            for p, line in lines.items()
        )
        return lines if ok else None

    try:
        await eventually(settled, timeout=SAGA_TIMEOUT)
    except TimeoutError:
        lines = {p: await magasin.stock(store, p) for p in products}
        raise AssertionError(f"stock {lines} does not match {stock} minus sold {sold}") from None

    # Money: one payment per sale; captured - refunded = total of the completed sales.
    async def projected() -> list[dict[str, Any]] | None:  # the payments read model may lag
        payments = await magasin.every("/api/payments", store_id=store)
        cancelled = sum(s["status"] == "CANCELLED" and s["reason"] != "declined" for s in sales)
        refunds = sum(p["status"] == "REFUNDED" for p in payments)
        return payments if len(payments) >= len(sales) and refunds >= cancelled else None

    try:
        payments = await eventually(projected, timeout=SAGA_TIMEOUT)
    except TimeoutError:
        payments = await magasin.every("/api/payments", store_id=store)
    by_sale = {p["transaction_id"]: p for p in payments}
    assert len(by_sale) == len(payments) == len(sales)
    for sale in sales:
        payment = by_sale[sale["transaction_id"]]
        if sale["status"] == "COMPLETED":
            assert (payment["status"], payment["amount"]) == ("CAPTURED", sale["total"]), sale
        elif sale["reason"] == "declined":
            assert payment["status"] == "FAILED", (sale, payment)
        else:
            assert payment["status"] == "REFUNDED", (sale, payment)
    captured = sum(p["amount"] for p in payments if p["status"] in ("CAPTURED", "REFUNDED"))
    refunded = sum(p["amount"] for p in payments if p["status"] == "REFUNDED")
    assert captured - refunded == sum(s["total"] for s in completed)

    # The services' own logs: one charge, one reservation, one commit per sale at most.
    ids = [s["transaction_id"] for s in sales]
    charged = await query(
        magasin.cluster,
        'SELECT correlation_id, count(*) AS n FROM "magasin_payment".events '
        "WHERE type = 'PaymentProcessed' AND correlation_id = ANY($1) GROUP BY 1",
        ids,
    )
    assert all(row["n"] == 1 for row in charged), [dict(r) for r in charged if r["n"] > 1]
    assert {row["correlation_id"] for row in charged} == {
        s["transaction_id"] for s in sales if s["reason"] != "declined"
    }
    moves = await query(
        magasin.cluster,
        "SELECT type, stream_id, payload->>'transaction_id' AS sale, count(*) AS n "
        'FROM "magasin_inventory".events '
        "WHERE type IN ('StockReserved', 'StockReleased', 'InventoryCommitted') "
        "AND payload->>'transaction_id' = ANY($1) GROUP BY 1, 2, 3",
        ids,
    )
    assert all(row["n"] == 1 for row in moves), [dict(r) for r in moves if r["n"] > 1]
    reserved = await query(
        magasin.cluster,
        'SELECT correlation_id, count(*) AS n FROM "magasin_inventory".events '
        "WHERE type = 'InventoryReserved' AND correlation_id = ANY($1) GROUP BY 1",
        ids,
    )
    assert all(row["n"] == 1 for row in reserved), [dict(r) for r in reserved if r["n"] > 1]
    letters = [x for x in await dead_letters(magasin.cluster) if x["sale"] in set(ids)]
    assert not letters, letters
    return Counter(s["reason"] or s["status"] for s in sales)


@pytest.mark.parametrize(
    "more", [("inventory",), ("inventory", "payment")], ids=lambda more: "+".join(more)
)
async def test_competing_consumers_never_promise_stock_or_charge_twice(
    magasin: Magasin, cluster: Cluster, more: tuple[str, ...]
) -> None:
    extra = [cluster.spawn(service) for service in more]  # a second process of each
    try:
        await asyncio.gather(*(process.healthy() for process in extra))
        namespace = cluster.env["MAGASIN_AMQP_NAMESPACE"]
        for service in more:
            # Each partition is consumed by exactly one of the processes at a time.
            queues = [f"{namespace}.{service}.p{n}" for n in range(configured_partitions())]

            async def one_each(queues: list[str] = queues) -> bool:
                counts = [await consumer_count(cluster.env["MAGASIN_AMQP_URL"], queue)
                          for queue in queues]
                return counts == [1] * len(queues)

            await eventually(one_each)
        store, stock, probe = await stock_up(magasin, "Concurrence", {"A": 20, "B": 15, "C": 10})

        posted = await asyncio.gather(*(
            magasin.sell(store, items, payment_method=method)
            for items, method in random_sales(list(stock), 60, seed=2)
        ))
        outcomes = await assert_books_balance(magasin, store, stock, [probe, *posted])
    finally:
        for process in extra:
            cluster.retire(process)
    # The demand exceeds the stock: the run must have exercised both outcomes.
    assert outcomes["COMPLETED"] > 0 and outcomes["inventory_unavailable"] > 0, outcomes


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
@pytest.mark.parametrize("victim", ["inventory", "payment", "store", "transaction", "eventstore"])
async def test_a_service_killed_mid_flight_recovers_and_every_saga_ends(
    magasin: Magasin, victim: str
) -> None:
    cluster = magasin.cluster
    store, stock, probe = await stock_up(magasin, f"Crash {victim}", {"A": 25, "B": 25})
    sales_to_post = random_sales(list(stock), 100, seed=3)
    posting = asyncio.gather(*(
        magasin.sell(store, items, payment_method=method) for items, method in sales_to_post
    ))

    # Kill once the sagas are under way: some have moved on while the others are still
    # being posted. The read model is a projection that may lag and then jump, so a
    # narrower window (many moved, many not ended) could be skipped over entirely; after
    # 5 s the kill happens whatever the read model shows, with sales still in flight.
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def under_way() -> bool:
        if loop.time() - started > 5.0:
            return True
        sales = await magasin.every("/api/transactions", store_id=store)
        return sum(s["status"] != "PENDING" for s in sales) >= 15

    await eventually(under_way, timeout=SAGA_TIMEOUT)
    process = cluster.first(victim)
    process.kill()
    await asyncio.sleep(1.0)
    process.start()  # same environment, same port
    await process.healthy()
    posted = await posting

    outcomes = await assert_books_balance(magasin, store, stock, [probe, *posted])
    assert outcomes["COMPLETED"] > 0 and outcomes["inventory_unavailable"] > 0, outcomes
    # Every event a service recorded reaches the archive, whoever was killed: a relay killed
    # between publishing and shipping leaves its events to the next start, an archive killed
    # mid-batch gets the batch again (and its event ids are unique: no event twice).
    sales = [sale["transaction_id"] for sale in [probe, *posted]]
    try:
        await eventually(lambda: _archived_all(cluster, sales), timeout=SAGA_TIMEOUT)
    except TimeoutError:
        missing = await _not_archived(cluster, sales)
        pytest.fail(f"{len(missing)} event(s) never archived, e.g. {missing[:5]}\n"
                    f"{cluster.logs(30)}")


async def _not_archived(cluster: Cluster, sales: list[str]) -> list[str]:
    """The ids of the events of these sales that some service recorded and the archive
    does not hold."""
    recorded: set[str] = set()
    for schema in [f"magasin_{service}" for service in SERVICES]:
        recorded |= {r["event_id"] for r in await query(
            cluster, f'SELECT event_id FROM "{schema}".events '
            "WHERE correlation_id = ANY($1::text[])", sales)}
    archived = {r["event_id"] for r in await query(
        cluster, 'SELECT event_id FROM "magasin_eventstore".events '
        "WHERE correlation_id = ANY($1::text[])", sales)}
    return sorted(recorded - archived)


async def _archived_all(cluster: Cluster, sales: list[str]) -> bool:
    return not await _not_archived(cluster, sales)


async def test_a_refund_after_the_payment_service_restarted_finds_the_charge(
    magasin: Magasin, cluster: Cluster
) -> None:
    store, stock, probe = await stock_up(magasin, "Refund after restart", {"A": 1})
    (product,) = stock
    inventory, payment = cluster.first("inventory"), cluster.first("payment")
    inventory.kill()  # holds the sale between its charge and its refund
    try:
        sale = await magasin.sell(store, [(product, 2)])  # more than the stock

        async def charged() -> bool:
            doc = await magasin.payment(sale["transaction_id"])
            return bool(doc["status"] == "CAPTURED")

        await eventually(charged)
        payment.kill()
        payment.start()
        await payment.healthy()
    finally:
        inventory.start()
        await inventory.healthy()

    outcomes = await assert_books_balance(magasin, store, stock, [probe, sale])
    assert outcomes == Counter({"declined": 1, "inventory_unavailable": 1})


async def test_every_completed_sale_reports_each_step_of_the_saga(magasin: Magasin) -> None:
    store, stock, probe = await stock_up(magasin, "Histoires", {"A": 100, "B": 100})
    posted = await asyncio.gather(*(
        magasin.sell(store, [(product, 1)]) for product in list(stock) * 20
    ))

    await assert_books_balance(magasin, store, stock, [probe, *posted])

    finals = [await magasin.final(sale["transaction_id"]) for sale in posted]
    assert {sale["status"] for sale in finals} == {"COMPLETED"}
    assert_every_step_reported(finals)


# -- 3b. stuck sagas: deadlines and forced compensation ----------------------------------

AT_FULFILMENT = {"choreography": ("PENDING", "order"),
                 "orchestration": ("INVENTORY_RESERVED", "fulfilment")}
"""A reserved sale waiting for the store, as /api/sagas shows it: a choreographed sale hears
nothing of its payment and reservation before its order, and has one deadline (`order`);
an orchestrated one is at its fulfilment step."""
DEFAULT_S = {"order": Settings.model_fields["deadline_order_s"].default,
             "fulfilment": Settings.model_fields["deadline_fulfilment_s"].default}


@asynccontextmanager
async def restarted(process: ServiceProcess, **env: str) -> AsyncIterator[None]:
    """`process` restarted with `env` over its environment, and as it was afterwards."""
    before = dict(process.env)
    process.terminate()
    process.env.update(env)
    try:
        process.start()
        await process.healthy()
        yield
    finally:
        process.terminate()
        process.env = before
        process.start()
        await process.healthy()


@asynccontextmanager
async def down(process: ServiceProcess) -> AsyncIterator[None]:
    """`process` killed (`kill -9`: what it had not consumed waits in its queue), then
    started again."""
    process.kill()
    try:
        yield
    finally:
        process.start()
        await process.healthy()


async def stuck_at_fulfilment(magasin: Magasin, store: str, stock: dict[str, int]
                              ) -> dict[str, Any]:
    """A sale of 3 of the one product of `stock` the store service (down) does not
    prepare: it waits, reserved, for its fulfilment (orchestrated: once the orchestrator
    asked for it; the sale and the orchestrator hear InventoryReserved in two consumers, so
    the sale may read reserved a moment before the orchestrator sent PrepareOrder)."""
    (product,) = stock
    sale = await magasin.sell(store, [(product, 3)])
    tid = sale["transaction_id"]

    async def reserved() -> bool:
        saga = await magasin.read(f"/api/sagas/{tid}")
        orchestrator = saga.get("orchestrator") or {}
        held = await magasin.client.get(f"{magasin.url}/api/reservations/{tid}")
        return bool(
            held.status_code == 200 and held.json()["status"] == "RESERVED"
            and saga["status"] == AT_FULFILMENT[saga["mode"]][0]
            and (saga["mode"] != "orchestration"
                 or orchestrator.get("pending_command") == "PrepareOrder"))

    try:
        await eventually(reserved, timeout=SAGA_TIMEOUT)
    except TimeoutError:
        saga = await magasin.ok("GET", f"/api/sagas/{tid}")
        types = await event_types(magasin.cluster, tid)
        raise AssertionError(f"sale {tid} not reserved: {saga}; events: {types}") from None
    return sale


async def refused_late(magasin: Magasin, transaction_id: str) -> None:
    """The store service, back, prepared the cancelled sale's order at last: the sale
    refuses it (seed: the transaction decides) and stays cancelled."""

    async def refused() -> bool:
        return "FulfilmentRefused" in await sale_stream(magasin.cluster, transaction_id)

    await eventually(refused, timeout=SAGA_TIMEOUT)


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_a_sale_the_store_never_prepares_is_compensated_at_its_deadline(
    magasin: Magasin, saga_mode: str
) -> None:
    cluster = magasin.cluster
    short = {"MAGASIN_DEADLINE_FULFILMENT_S": "1", "MAGASIN_DEADLINE_ORDER_S": "1",
             "MAGASIN_DEADLINE_SWEEP_S": "0.1"}
    waiting, step = AT_FULFILMENT[saga_mode]
    reason = f"deadline:{step}"
    async with restarted(cluster.first("transaction"), **short):
        store, stock, probe = await stock_up(magasin, "Délai", {"A": 10})
        (product,) = stock
        async with down(cluster.first("store")):
            sale = await magasin.sell(store, [(product, 3)])
            tid = sale["transaction_id"]
            final = await magasin.final(tid)
            assert (final["status"], final["reason"]) == ("CANCELLED", reason)
            steps = {h["status"]: datetime.fromisoformat(h["at"]) for h in final["history"]}
            assert list(steps)[-3:] == [waiting, "CANCELLING", "CANCELLED"]
            # Given up at the configured deadline (1 s), well before the default one.
            waited = steps["CANCELLING"] - steps[waiting]
            assert timedelta(seconds=1) <= waited < timedelta(seconds=DEFAULT_S[step])
        await refused_late(magasin, tid)

    outcomes = await assert_books_balance(magasin, store, stock, [probe, sale])
    assert outcomes == Counter({"declined": 1, reason: 1})
    payment = await magasin.payment(tid)
    assert (payment["status"], payment["reason"]) == ("REFUNDED", reason)
    reservation = await magasin.read(f"/api/reservations/{tid}")
    assert reservation["status"] == "RELEASED"
    # Orchestrated, the deadline goes to the orchestrator, which compensates in order.
    assert_coordinated(saga_mode, await event_types(cluster, tid), "ChargePayment",
                       "ReserveStock", "PrepareOrder", "RefundPayment", "ReleaseStock")


@pytest.mark.parametrize("saga_mode", MODES, scope="module")
async def test_an_admin_forces_the_compensation_of_a_stuck_sale_through_the_gateway(
    magasin: Magasin, saga_mode: str
) -> None:
    cluster = magasin.cluster
    store, stock, probe = await stock_up(magasin, "Forcée", {"A": 10})
    async with down(cluster.first("store")):  # default deadlines: nothing aborts by itself
        sale = await stuck_at_fulfilment(magasin, store, stock)
        tid = sale["transaction_id"]
        saga = await magasin.ok("GET", f"/api/sagas/{tid}")
        step = AT_FULFILMENT[saga_mode][1]
        assert (saga["step"], saga["mode"]) == (step, saga_mode)
        if saga_mode == "orchestration":
            assert saga["orchestrator"]["pending_command"] == "PrepareOrder"

        url = f"{magasin.url}/api/sagas/{tid}/compensate"
        assert (await magasin.client.post(url)).status_code == 403  # not an admin key
        forced = await magasin.client.post(url, headers={"X-API-Key": ADMIN_KEY})
        assert forced.status_code == 202, forced.text
        assert (forced.json()["reason"], forced.json()["aborted_step"]) == ("forced", step)

        final = await magasin.final(tid)
        assert (final["status"], final["reason"]) == ("CANCELLED", "forced")
        again = await magasin.client.post(url, headers={"X-API-Key": ADMIN_KEY})
        assert again.status_code == 409  # it ended: nothing left to compensate
    await refused_late(magasin, tid)

    outcomes = await assert_books_balance(magasin, store, stock, [probe, sale])
    assert outcomes == Counter({"declined": 1, "forced": 1})
    payment = await magasin.payment(tid)
    assert (payment["status"], payment["reason"]) == ("REFUNDED", "forced")
    assert_coordinated(saga_mode, await event_types(cluster, tid), "ChargePayment",
                       "ReserveStock", "PrepareOrder", "RefundPayment", "ReleaseStock")


# -- 4. the gateway: failover, streams, rate limits ---------------------------------------


async def test_a_transaction_process_killed_behind_the_gateway_costs_no_sale(
    magasin: Magasin, cluster: Cluster
) -> None:
    """200 sales through the gateway while one of two transaction processes is killed
    (`kill -9`): every sale ends; the only 5xx clients see are POSTs the gateway could not
    finish, which the client retries with the same Idempotency-Key, and those retries do
    not create a second sale."""
    second = cluster.spawn("transaction")
    await second.healthy()
    victim = cluster.first("transaction")
    # One process of the service relays its outbox: the first, which took the lease.
    await eventually(lambda: _relaying([victim, second], [True, False]))
    store, stock, probe = await stock_up(magasin, "Bascule", {"A": 400, "B": 400})
    answers: list[tuple[str, str, int, str | None]] = []

    async def record(response: httpx.Response) -> None:
        request = response.request
        answers.append((request.method, request.url.path, response.status_code,
                        request.headers.get("Idempotency-Key")))

    posted: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(
            headers={"X-API-Key": API_KEY}, timeout=30.0, event_hooks={"response": [record]},
        ) as client:
            watched = Magasin(cluster, client)
            sales = iter(random_sales(list(stock), 200, seed=9))
            killed = False

            async def seller() -> None:
                nonlocal killed
                for items, method in sales:
                    posted.append(await watched.sell(store, items, payment_method=method))
                    await watched.final(posted[-1]["transaction_id"])
                    if len(posted) >= 60 and not killed:
                        killed = True
                        victim.kill()

            await asyncio.gather(*(seller() for _ in range(8)))
        outcomes = await assert_books_balance(magasin, store, stock, [probe, *posted])
        await eventually(lambda: _relaying([second], [True]))  # it took the lease over
    finally:
        cluster.retire(second)
        victim.start()
        await victim.healthy()

    assert killed and outcomes["COMPLETED"] > 0
    failures = [a for a in answers if a[2] >= 500]
    assert all(method == "POST" and path == "/api/transactions" for method, path, _, _ in
               failures), failures
    for _, _, _, key in failures:  # each failed POST was retried until it was answered
        assert any(a[3] == key and a[2] in (200, 201) for a in answers), key
    assert len({s["transaction_id"] for s in posted}) == len(posted) == 200


async def _relaying(processes: list[ServiceProcess], expected: list[bool]) -> bool:
    """Whether each process's /health says it relays its service's outbox as expected."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        said = [(await client.get(f"{p.url}/health")).json().get("outbox_relaying")
                for p in processes]
    return said == expected


async def test_every_201_s_location_answers_200_at_once_through_the_gateway(
    magasin: Magasin,
) -> None:
    """200 sales created at once, each read back from its `Location` as soon as the `201`
    arrives; the same for stores and products: never a 404, whatever the read models'
    lag (seed 6.2.2: a lagging read model is bypassed by a replay of the events)."""
    store, stock, _ = await stock_up(magasin, "Relecture", {"A": 200})
    (product,) = stock

    async def created_then_read(path: str, body: dict[str, Any]) -> int:
        created = await magasin.client.post(magasin.url + path, json=body)
        assert created.status_code == 201, created.text
        location = created.request.url.join(created.headers["Location"])
        assert str(location).startswith(magasin.url), location  # back through the gateway
        read = await magasin.client.get(location)
        if read.status_code == 200:
            assert read.json()[next(iter(created.json()))] == next(iter(created.json().values()))
        return read.status_code

    sale = {"store_id": store, "customer_id": "alice", "payment_method": "VISA",
            "items": [{"product_id": product, "quantity": 1}]}
    statuses = await asyncio.gather(
        *(created_then_read("/api/transactions", sale) for _ in range(200)),
        *(created_then_read("/api/stores", {"name": f"R{n}", "district": "Plateau",
                                            "address": "3 rue Z"}) for n in range(20)),
        *(created_then_read("/api/products", {
            "sku": f"RYW-{uuid.uuid4().hex[:8]}", "name": "P", "unit_price": 100,
            "currency": "CAD"}) for _ in range(20)),
    )
    assert Counter(statuses) == {200: 240}


async def test_a_sale_s_status_streams_through_the_gateway_as_it_changes(
    magasin: Magasin, cluster: Cluster
) -> None:
    """The stream shows the sale pending while it provably cannot go further (paid, its
    inventory service down), then every step once the service is back: a choreographed
    sale learns its payment and reservation with its order, and its history lists them."""
    store, stock, _ = await stock_up(magasin, "En direct", {"A": 3})
    (product,) = stock
    inventory = cluster.first("inventory")
    inventory.kill()
    try:
        sale = await magasin.sell(store, [(product, 1)])
        async with magasin.client.stream(
            "GET", f"{magasin.url}/api/transactions/{sale['transaction_id']}/events",
        ) as stream:
            seen: list[str] = []
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:])["status"])
                    break
            assert seen == ["PENDING"]

            async def paid() -> bool:
                return bool((await magasin.payment(sale["transaction_id"]))["status"]
                            == "CAPTURED")

            await eventually(paid)
            inventory.start()
            await inventory.healthy()
            async for line in lines:
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:])["status"])
    finally:
        if not inventory.alive:
            inventory.start()
            await inventory.healthy()

    assert seen == SAGA_STEPS


async def test_a_sale_s_stream_follows_it_on_either_transaction_process(
    magasin: Magasin, cluster: Cluster
) -> None:
    """With two transaction processes both project the sales (whichever commits a batch
    first); a client's stream is on either, and hears every change to the end, not at the
    next heartbeat (15 s, past the streams' 10 s `timeout`)."""
    second = cluster.spawn("transaction")
    await second.healthy()
    processes = [cluster.first("transaction"), second]
    store, stock, _ = await stock_up(magasin, "Deux caisses", {"A": 50})
    (product,) = stock

    async def follow(url: str, transaction_id: str) -> list[str]:
        seen: list[str] = []
        async with magasin.client.stream(
            "GET", f"{url}/api/transactions/{transaction_id}/events",
            params={"timeout": 10},
        ) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: timeout"):
                    seen.append("timeout")  # its data line is {}: the assertion shows it
                    break
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:])["status"])
        return seen

    async def sale() -> list[list[str]]:
        created = await magasin.sell(store, [(product, 1)])
        tid = created["transaction_id"]
        return list(await asyncio.gather(*(follow(p.url, tid) for p in processes)))

    try:
        streams = [s for pair in await asyncio.gather(*(sale() for _ in range(12)))
                   for s in pair]
    finally:
        cluster.retire(second)
    assert all(s and s[-1] == "COMPLETED" for s in streams), streams


async def test_a_list_s_cursor_pages_on_any_process_and_a_garbled_one_is_400(
    magasin: Magasin, cluster: Cluster
) -> None:
    """Cursors carry no process state: a page asked of one transaction process goes on at
    another; a cursor no list handed out answers 400 through the gateway, not a last page."""
    second = cluster.spawn("transaction")
    await second.healthy()
    processes = [cluster.first("transaction"), second]
    try:
        store, stock, probe = await stock_up(magasin, "Pages", {"A": 10})
        (product,) = stock
        made = [probe, *[await magasin.sell(store, [(product, 1)]) for _ in range(3)]]
        expected = [s["transaction_id"] for s in made]

        async def listed() -> list[str] | None:
            seen: list[str] = []
            cursor: str | None = None
            for turn in range(len(expected) + 1):
                query = {"store_id": store, "limit": "1", **({"cursor": cursor} if cursor else {})}
                response = await magasin.client.get(
                    f"{processes[turn % 2].url}/api/transactions", params=query)
                assert response.status_code == 200, response.text
                page = response.json()
                seen += [s["transaction_id"] for s in page["items"]]
                if (cursor := page["next_cursor"]) is None:
                    break
            return seen if seen == expected else None  # both replicas projected them all

        await eventually(listed)
    finally:
        cluster.retire(second)
    for path in ("/api/transactions", "/api/payments", "/api/stores", "/api/reservations",
                 "/api/events"):
        response = await magasin.client.get(magasin.url + path, params={"cursor": "x.y"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"] == "invalid_input"


async def test_the_gateway_limits_each_api_key_to_its_rate(cluster: Cluster) -> None:
    """A burst above the limit gets 429 in the services' error shape with Retry-After;
    another key, under its limit, is never refused."""
    limited = cluster.add_gateway(gateway_rate_per_s=1, gateway_burst=10)
    other = f"{API_KEY}-other"
    try:
        async with httpx.AsyncClient(base_url=limited.url, timeout=30.0) as client:
            async def get(key: str) -> httpx.Response:
                return await client.get("/api/stores", params={"limit": "1"},
                                        headers={"X-API-Key": key})

            burst = await asyncio.gather(*(get(API_KEY) for _ in range(40)))
            calm = await asyncio.gather(*(get(other) for _ in range(10)))
    finally:
        cluster.gateways.remove(limited)
        limited.stop()

    refused = [r for r in burst if r.status_code == 429]
    assert refused and len(refused) < 40
    assert {r.status_code for r in burst} == {200, 429}
    for answer in refused:
        assert answer.json()["error"] == "rate_limited"
        assert int(answer.headers["Retry-After"]) >= 1
    # The other key is unknown to the services (401) but never limited by the gateway.
    assert {r.status_code for r in calm} == {401}
