"""Sales under crashes and restarts, and the invariants that must hold once the dust has
settled. Shared by the CI chaos tests (tests/e2e/test_chaos.py) and the soak benchmark
(bench/soak.py); works over HTTP in both modes, plus a look at the services' own event logs.

Invariants (DESIGN.md §4), each broken one reported as a line of text:
every sale is terminal; each stock line is its initial quantity minus what completed sales
took, with nothing held; a completed sale's payment is captured for its total, a cancelled
sale's failed or refunded; the bank holds exactly the completed sales' money; no sale was
charged, refunded or reserved twice, and no stock item moved twice for one sale.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"COMPLETED", "CANCELLED"}
RETRY_FOR_S = 90.0
"""How long a call keeps retrying while the service it calls is down or restarting."""

PG_CLUSTER = ("15", "main")
"""The local PostgreSQL cluster (`pg_lsclusters`)."""


class Shop:
    """A client of a running magasin in either mode: `url_of(service)` is the base URL of
    the service's routes (one URL for every service in embedded mode). Calls retry while
    the service is unreachable or answers 5xx, as a patient client would."""

    def __init__(self, client: httpx.AsyncClient, url_of: Callable[[str], str]) -> None:
        self.client = client
        self.url_of = url_of

    async def call(self, method: str, service: str, path: str, **kw: Any) -> httpx.Response:
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                response = await self.client.request(method, self.url_of(service) + path, **kw)
                if response.status_code < 500:
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {service}{path} kept failing for {RETRY_FOR_S}s")
            await asyncio.sleep(0.2)

    async def ok(self, method: str, service: str, path: str, **kw: Any) -> Any:
        response = await self.call(method, service, path, **kw)
        assert response.status_code < 300, (response.status_code, response.text)
        return response.json()

    async def open_store(self, name: str) -> str:
        body = {"name": name, "district": "Ville-Marie", "address": "1 rue X"}
        return str((await self.ok("POST", "store", "/api/stores", json=body))["store_id"])

    async def add_product(self, sku: str, unit_price: int) -> str:
        body = {"sku": sku, "name": sku, "unit_price": unit_price, "currency": "CAD"}
        return str((await self.ok("POST", "store", "/api/products", json=body))["product_id"])

    async def restock(self, store_id: str, product_id: str, quantity: int) -> None:
        path = f"/api/stock/{store_id}/{product_id}/restock"
        async with asyncio.timeout(RETRY_FOR_S):
            # 404 until the inventory's replica knows the store and the product.
            while (await self.call("POST", "inventory", path,
                                   json={"quantity": quantity})).status_code != 200:
                await asyncio.sleep(0.1)

    async def sell(self, store_id: str, items: list[tuple[str, int]], method: str) -> str:
        """Post one sale until it is recorded, with one Idempotency-Key across retries so
        that a request whose answer was lost in a crash records it once."""
        body = {"store_id": store_id, "customer_id": f"c{random.randrange(100)}",
                "payment_method": method,
                "items": [{"product_id": p, "quantity": q} for p, q in items]}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        async with asyncio.timeout(RETRY_FOR_S):
            while True:
                r = await self.call("POST", "transaction", "/api/transactions", json=body,
                                    headers=headers)
                if r.status_code in (200, 201):
                    return str(r.json()["transaction_id"])
                # 422: the catalog replica lags; 409: the same key is being recorded.
                assert r.status_code in (409, 422), (r.status_code, r.text)
                await asyncio.sleep(0.1)

    async def every(self, service: str, path: str, **params: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {**params, "limit": "500", **({"cursor": cursor} if cursor else {})}
            page = await self.ok("GET", service, path, params=query)
            items += page["items"]
            if (cursor := page["next_cursor"]) is None:
                return items


@dataclass
class Shelf:
    """One store's products and their initial stock, and the sales posted there."""

    store_id: str
    stock: dict[str, int]
    sales: list[str] = field(default_factory=list)


async def stock_up(shop: Shop, name: str, stock: Iterable[tuple[str, int]]) -> Shelf:
    store = await shop.open_store(name)
    shelf = Shelf(store, {})
    for i, (sku, quantity) in enumerate(stock):
        product = await shop.add_product(f"{sku}-{uuid.uuid4().hex[:6]}", 500 + 100 * i)
        shelf.stock[product] = quantity
    await asyncio.gather(*(shop.restock(store, p, q) for p, q in shelf.stock.items()))
    return shelf


def random_sales(products: list[str], count: int, rng: random.Random
                 ) -> list[tuple[list[tuple[str, int]], str]]:
    """`count` sales of 1-2 products, 1-3 units each; about one in ten is declined."""
    return [
        ([(p, rng.randint(1, 3)) for p in rng.sample(products, rng.choice((1, 1, 2)))],
         "FAIL_CARD" if rng.random() < 0.1 else "VISA")
        for _ in range(count)
    ]


async def post_sales(shop: Shop, shelf: Shelf, count: int, rng: random.Random,
                     concurrency: int = 16) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(items: list[tuple[str, int]], method: str) -> None:
        async with gate:
            shelf.sales.append(await shop.sell(shelf.store_id, items, method))

    await asyncio.gather(*(one(i, m) for i, m in random_sales(list(shelf.stock), count, rng)))


async def wait_terminal(shop: Shop, shelf: Shelf, timeout: float) -> list[dict[str, Any]]:
    """The store's sales once every posted one is terminal, or as they are at `timeout`."""
    deadline = time.monotonic() + timeout
    wanted = set(shelf.sales)
    while True:
        sales = await shop.every("transaction", "/api/transactions", store_id=shelf.store_id)
        done = {s["transaction_id"] for s in sales if s["status"] in TERMINAL}
        if wanted <= done or time.monotonic() > deadline:
            return sales
        await asyncio.sleep(0.5)


@dataclass
class Evidence:
    """What the services' own stores say once the sales have ended."""

    effects: list[Effect]
    bank: list[dict[str, Any]]
    """The bank simulator's ledger of captured charges."""
    stock: dict[str, tuple[int, int]]
    """(on_hand, reserved) per product, summed from the inventory's stock events and the
    lines of its reservations' commits."""
    dead_letters: int = 0
    projection_lag: dict[str, int] = field(default_factory=dict)
    """Per service: events its slowest projection still had to read (diagnostic)."""


@dataclass(frozen=True)
class Effect:
    """How often one effect happened for one sale in a service's event log."""

    kind: str
    stream: str
    sale: str
    count: int


EFFECTS_SQL = {
    "payment": "SELECT type, stream_id, correlation_id, count(*) FROM {events} "
               "WHERE type IN ('PaymentProcessed', 'PaymentRefunded') GROUP BY 1, 2, 3",
    "inventory": "SELECT type, stream_id, {sale}, count(*) FROM {events} "
                 "WHERE type IN ('StockReserved', 'StockCommitted', 'StockReleased', "
                 "'InventoryReserved', 'InventoryCommitted') GROUP BY 1, 2, 3",
}


STOCK_SQL = (
    "SELECT {product}, type, sum(CAST({quantity} AS INTEGER)) FROM {events} WHERE type IN "
    "('StockAdded', 'StockReserved', 'StockReleased', 'StockCommitted') GROUP BY 1, 2"
)
# Since issue 11 a commit moves no stock item: the reservation's InventoryCommitted takes
# its lines off on_hand and reserved (older events, with per_item_commits, moved nothing).
COMMITS_SQL = {
    "postgres": "SELECT x->>'product_id', e.type, sum(CAST(x->>'quantity' AS INTEGER)) "
                "FROM {events} e, jsonb_array_elements(e.payload::jsonb -> 'lines') x "
                "WHERE e.type = 'InventoryCommitted' AND NOT "
                "coalesce(CAST(e.payload::jsonb->>'per_item_commits' AS BOOLEAN), true) "
                "GROUP BY 1, 2",
    "sqlite": "SELECT json_extract(x.value, '$.product_id'), e.type, "
              "sum(json_extract(x.value, '$.quantity')) "
              "FROM {events} e, json_each(e.payload, '$.lines') x "
              "WHERE e.type = 'InventoryCommitted' "
              "AND NOT coalesce(json_extract(e.payload, '$.per_item_commits'), 1) GROUP BY 1, 2",
}
MOVES = {"StockAdded": (1, 0), "StockReserved": (0, 1), "StockReleased": (0, -1),
         "StockCommitted": (-1, -1), "InventoryCommitted": (-1, -1)}
LAG_SQL = (
    "SELECT (SELECT coalesce(max(global_position), 0) FROM {schema}.events) - "
    "coalesce((SELECT min(position) FROM {schema}.checkpoints WHERE name LIKE 'projection:%' "
    "AND name NOT LIKE '%:generation'), 0)"
)


def stock_of(rows: Iterable[tuple[str, str, int]]) -> dict[str, tuple[int, int]]:
    stock: dict[str, tuple[int, int]] = {}
    for product, kind, quantity in rows:
        on_hand, reserved = stock.get(product, (0, 0))
        d_on_hand, d_reserved = MOVES[kind]
        stock[product] = (on_hand + d_on_hand * quantity, reserved + d_reserved * quantity)
    return stock


async def postgres_effects(database_url: str) -> Evidence:
    """Effects from the payment and inventory schemas, the bank's ledger, the stock as
    the inventory's events say, dead letters and projection lag of every service."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = []
        for service, sql in EFFECTS_SQL.items():
            rows += await conn.fetch(sql.format(
                events=f'"magasin_{service}".events', sale="payload->>'transaction_id'"
            ))
        bank = await conn.fetch(
            "SELECT body FROM \"magasin_payment\".documents WHERE collection = 'bank.captured'"
        )
        stock = await conn.fetch(STOCK_SQL.format(
            events='"magasin_inventory".events', product="payload->>'product_id'",
            quantity="payload->>'quantity'",
        ))
        stock += await conn.fetch(COMMITS_SQL["postgres"].format(
            events='"magasin_inventory".events'))
        letters, lag = 0, {}
        for service in ("transaction", "payment", "inventory", "store"):
            schema = f'"magasin_{service}"'
            letters += await conn.fetchval(
                f"SELECT count(*) FROM {schema}.documents WHERE collection = 'bus.dead_letters'"
            )
            lag[service] = await conn.fetchval(LAG_SQL.format(schema=schema))
    finally:
        await conn.close()
    return Evidence([Effect(r[0], r[1], r[2], r[3]) for r in rows],
                    [json.loads(r["body"]) for r in bank],
                    stock_of((r[0], r[1], r[2]) for r in stock), letters, lag)


async def sqlite_effects(path: Path) -> Evidence:
    """The same from the embedded SQLite file (read once the process is stopped or live)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = []
        for sql in EFFECTS_SQL.values():
            rows += conn.execute(sql.format(
                events="events", sale="json_extract(payload, '$.transaction_id')"
            )).fetchall()
        bank = [json.loads(b) for (b,) in conn.execute(
            "SELECT body FROM documents WHERE collection = 'bank.captured'"
        )]
        stock = conn.execute(STOCK_SQL.format(
            events="events", product="json_extract(payload, '$.product_id')",
            quantity="json_extract(payload, '$.quantity')",
        )).fetchall()
        stock += conn.execute(COMMITS_SQL["sqlite"].format(events="events")).fetchall()
        (letters,) = conn.execute(
            "SELECT count(*) FROM documents WHERE collection = 'bus.dead_letters'"
        ).fetchone()
        (lag,) = conn.execute(LAG_SQL.format(schema="main")).fetchone()
    finally:
        conn.close()
    return Evidence([Effect(*r) for r in rows], bank, stock_of(stock), letters,
                    {"embedded": lag})


async def stock_mismatches(
    shop: Shop, shelf: Shelf, sold: Counter[str], settle_s: float
) -> list[str]:
    """Stock lines that differ from the initial stock minus what completed sales took,
    with nothing held, once the inventory had `settle_s` to hear of the last sales (it
    commits a completed sale's stock after the sale completes)."""
    deadline = time.monotonic() + settle_s
    while True:
        wrong = []
        for product, initial in shelf.stock.items():
            line = await shop.ok("GET", "inventory", f"/api/stock/{shelf.store_id}/{product}")
            expected = (initial - sold[product], 0, initial - sold[product])
            if (line["on_hand"], line["reserved"], line["available"]) != expected:
                wrong.append(f"stock of {product}: {line} instead of {expected}")
        if not wrong or time.monotonic() > deadline:
            return wrong
        await asyncio.sleep(0.5)


async def _stuck_at(shop: Shop, tid: str) -> str:
    """Where a sale that did not end stands, for the failure message: by id (its stream,
    when the list's read model lags) and its saga (what it waits for)."""
    sale = (await shop.call("GET", "transaction", f"/api/transactions/{tid}")).json()
    saga = (await shop.call("GET", "transaction", f"/api/sagas/{tid}")).json()
    return f"by id: {sale.get('status')} v{sale.get('version')}; saga: {saga}"


async def violations(
    shop: Shop, shelves: list[Shelf], evidence: Callable[[], Awaitable[Evidence]],
    timeout: float = 120.0, settle_s: float = 30.0,
) -> tuple[list[str], Counter[str], Evidence]:
    """Every broken invariant over these stores' sales once they have all ended (or at
    `timeout`), with `evidence` (the services' effects and the bank's ledger) read then;
    the bank check assumes they are all the sales of this magasin. Also the count of each
    outcome."""
    found: list[str] = []
    outcomes: Counter[str] = Counter()
    sold_of: Counter[str] = Counter()
    completed_total = 0
    for shelf in shelves:
        sales = await wait_terminal(shop, shelf, timeout)
        by_id = {s["transaction_id"]: s for s in sales}
        for tid in shelf.sales:
            sale = by_id.get(tid)
            if sale is None:
                found.append(f"sale {tid} was posted but is not listed")
            elif sale["status"] not in TERMINAL:
                found.append(f"sale {tid} is not terminal: {sale['status']}"
                             f" ({await _stuck_at(shop, tid)})")
        outcomes.update(s["reason"] or s["status"] for s in sales)
        completed = [s for s in sales if s["status"] == "COMPLETED"]
        completed_total += sum(s["total"] for s in completed)
        sold: Counter[str] = Counter()
        for sale in completed:
            for line in sale["lines"]:
                sold[line["product_id"]] += line["quantity"]
        sold_of.update(sold)
        found += await stock_mismatches(shop, shelf, sold, settle_s)
        payments = {p["transaction_id"]: p for p in await shop.every(
            "payment", "/api/payments", store_id=shelf.store_id)}
        for sale in sales:
            payment = payments.get(sale["transaction_id"])
            status = payment["status"] if payment else None
            if sale["status"] == "COMPLETED":
                if (status, payment and payment["amount"]) != ("CAPTURED", sale["total"]):
                    found.append(f"completed sale {sale['transaction_id']} paid {payment}")
            elif sale["status"] == "CANCELLED" and status not in ("FAILED", "REFUNDED"):
                found.append(f"cancelled sale {sale['transaction_id']} has payment {payment}")
    seen = await evidence()
    held = sum(doc["amount"] for doc in seen.bank if not doc.get("refunded"))
    if held != completed_total:
        found.append(f"the bank holds {held} cents; completed sales total {completed_total}")
    ours = {tid for shelf in shelves for tid in shelf.sales}
    found += [f"{e.kind} {e.count} times for sale {e.sale} on {e.stream}"
              for e in seen.effects if e.count > 1 and e.sale in ours]
    for shelf in shelves:  # the stock as the inventory's own events have it
        for product, initial in shelf.stock.items():
            on_hand, reserved = seen.stock.get(product, (0, 0))
            if (on_hand, reserved) != (initial - sold_of[product], 0):
                found.append(f"stock events of {product}: on hand {on_hand}, reserved "
                             f"{reserved}; expected {initial - sold_of[product]}, 0")
    return found, outcomes, seen


# -- servers of the machine: restarted in place, always brought back ----------------------

HEALTHY_WITHIN_S = 90.0
"""How long a restarted server may take to serve real requests again."""
PG_URL = os.environ.get("MAGASIN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("MAGASIN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


Probe = Callable[[], Coroutine[Any, Any, None]]
"""One attempt at a real request to a server."""


def _probe(attempt: Probe) -> None:
    """Run one async probe to its end from sync code, whether or not this thread runs an
    event loop (the restarts run in a worker thread, and from bench/soak.py)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, attempt()).result()


def wait_healthy(name: str, attempt: Probe,
                 within: float = HEALTHY_WITHIN_S) -> None:
    """Block until `attempt` (a real connection and request) succeeds; TimeoutError naming
    the server and its last error after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            _probe(attempt)
            return
        except Exception as exc:  # refused, starting up, too many clients, timeout, ...
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy {within:.0f} s after its restart: "
                                   f"{exc!r}") from exc
        time.sleep(0.2)


def postgres_answers(url: str) -> Probe:
    """A probe: a new connection to `url` runs a query."""
    async def attempt() -> None:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    return attempt


def rabbitmq_answers(url: str) -> Probe:
    """A probe: a new connection to `url` opens a channel and declares a queue."""
    async def attempt() -> None:
        import aio_pika

        connection = await aio_pika.connect(url, timeout=5)
        try:
            channel = await connection.channel()
            await channel.declare_queue(exclusive=True, auto_delete=True)
        finally:
            await connection.close()

    return attempt


def restart_rabbitmq(down_s: float = 2.0, url: str = AMQP_URL) -> None:
    """Stop the RabbitMQ application (connections drop), wait, start it again; returns once
    a new connection to `url` works again."""
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True,
                       timeout=60)
        time.sleep(down_s)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True,
                       timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], check=False, capture_output=True,
                       timeout=120)
        wait_healthy("RabbitMQ", rabbitmq_answers(url))


def restart_postgres(url: str = PG_URL) -> None:
    """Restart the PostgreSQL cluster (every connection drops); make sure it runs after,
    and return once a new connection to `url` answers a query."""
    version, name = PG_CLUSTER
    try:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name,
                        "restart", "-m", "fast"], check=True, capture_output=True, timeout=120)
    finally:
        status = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name,
                                 "status"], capture_output=True, timeout=30)
        if status.returncode != 0:
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name,
                            "start"], check=True, capture_output=True, timeout=120)
        wait_healthy("PostgreSQL", postgres_answers(url))
