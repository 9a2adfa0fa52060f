"""Demo data for a first start, and a driver of realistic sales against a running API."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from magasin.eventstore.store import EventStore
from magasin.shared.errors import NotFound

STORES = (
    ("Magasin Centre-Ville", "Ville-Marie", "1200 rue Sainte-Catherine O, Montréal"),
    ("Magasin Plateau", "Le Plateau-Mont-Royal", "4300 boulevard Saint-Laurent, Montréal"),
    ("Magasin Rosemont", "Rosemont–La Petite-Patrie", "3100 rue Masson, Montréal"),
)
PRODUCTS = (
    ("CAF-001", "Café filtre 1 kg", 1899), ("LAI-002", "Lait 2 % 4 L", 649),
    ("PAI-003", "Pain de campagne", 499), ("FRO-004", "Fromage Oka 250 g", 1099),
    ("POM-005", "Pommes Cortland 3 lb", 599), ("SIR-006", "Sirop d'érable 540 ml", 1299),
    ("CHO-007", "Chocolat noir 70 %", 399), ("TV-008", "Téléviseur 65 po", 1_099_999),
)


def initial_stock(store_count: int, product_skus: list[str]) -> list[list[int]]:
    """The demo's opening quantity of each product (in `product_skus` order) in each store:
    the same whichever way the demo is seeded."""
    rng = random.Random(7)
    return [[5 if sku == "TV-008" else rng.randint(150, 400) for sku in product_skus]
            for _ in range(store_count)]


async def seed_if_empty(store: EventStore, currency: str, timeout: float = 30.0) -> bool:
    """Register the demo stores, catalog and stock unless some store exists already (one
    store holding every service's data: embedded mode)."""
    from magasin.inventory.commands import restock
    from magasin.stores.commands import add_product, register_store

    if await store.find_documents("store.stores", limit=1):
        return False
    stores = [await register_store(store, name, district, address)
              for name, district, address in STORES]
    products = [await add_product(store, sku, name, price, currency)
                for sku, name, price in PRODUCTS]
    stock = initial_stock(len(stores), [p["sku"] for p in products])
    deadline = time.monotonic() + timeout
    for s, quantities in zip(stores, stock, strict=True):
        for p, quantity in zip(products, quantities, strict=True):
            while True:  # inventory learns of new stores and products through events
                try:
                    await restock(store, s["store_id"], p["product_id"], quantity, "initial stock")
                    break
                except NotFound:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
    return True


async def seed_over_http(client: httpx.AsyncClient, currency: str, timeout: float = 60.0) -> None:
    """Register the demo stores, catalog and stock through the API (distributed mode, where
    each service keeps its own data): `client` has the base URL and the API key."""

    async def ok(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = (await client.request(method, path, json=body)).raise_for_status()
        doc: dict[str, Any] = answer.json()
        return doc

    stores = [await ok("POST", "/api/stores",
                       {"name": name, "district": district, "address": address})
              for name, district, address in STORES]
    products = [await ok("POST", "/api/products", {"sku": sku, "name": name,
                                                    "unit_price": price, "currency": currency})
                for sku, name, price in PRODUCTS]
    stock = initial_stock(len(stores), [p["sku"] for p in products])
    deadline = time.monotonic() + timeout
    for s, quantities in zip(stores, stock, strict=True):
        for p, quantity in zip(products, quantities, strict=True):
            path = f"/api/stock/{s['store_id']}/{p['product_id']}/restock"
            # 404 until the inventory service has the store and the product from events.
            body = {"quantity": quantity, "reason": "initial stock"}
            while (answer := await client.post(path, json=body)
                   ).status_code == 404 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            answer.raise_for_status()


@dataclass
class DemoStats:
    started: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    failed_calls: Counter[str] = field(default_factory=Counter)
    """Calls that failed (an HTTP error status, a timeout, a broken connection), by call
    and cause: counted, never fatal."""

    @property
    def failed(self) -> bool:
        return bool(self.failed_calls)

    def table(self, total: int) -> Table:
        table = Table(title=f"magasin demo — {self.started}/{total} sales sent")
        table.add_column("outcome")
        table.add_column("sales", justify="right")
        for outcome, n in sorted(self.outcomes.items()):
            colour = "green" if outcome == "COMPLETED" else "yellow"
            if outcome.startswith(UNFINISHED):
                colour = "red"
            table.add_row(f"[{colour}]{outcome}[/{colour}]", str(n))
        in_flight = self.started - sum(self.outcomes.values())
        table.add_row("[cyan]in flight[/cyan]", str(in_flight))
        if self.failed_calls:
            table.add_section()
            for call, n in sorted(self.failed_calls.items()):
                table.add_row(f"[red]failed call: {call}[/red]", str(n))
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = ordered[len(ordered) // 2] * 1000
            p95 = ordered[int(len(ordered) * 0.95)] * 1000
            table.caption = f"saga latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
        return table


UNFINISHED = "NOT FOLLOWED"
"""Outcome prefix of a sale whose end the demo could not see (its POST failed, or no final
state was read before the follow deadline)."""


class _Calls:
    """The demo's HTTP calls: a failed one is counted in the stats and answers None."""

    def __init__(self, client: httpx.AsyncClient, stats: DemoStats) -> None:
        self.client = client
        self.stats = stats

    async def json(self, method: str, path: str, label: str, **kw: Any) -> Any:
        try:
            answer = await self.client.request(method, path, **kw)
        except httpx.TimeoutException:
            cause = "timeout"
        except httpx.TransportError as exc:
            cause = type(exc).__name__
        else:
            if answer.is_success:
                try:
                    return answer.json()
                except ValueError:
                    cause = f"HTTP {answer.status_code}, not JSON"
            else:
                cause = f"HTTP {answer.status_code}"
        self.stats.failed_calls[f"{method} {label}: {cause}"] += 1
        return None


async def drive(url: str, api_key: str, count: int, concurrency: int, seed: int,
                console: Console, timeout: float = 30.0,
                follow_timeout: float = 120.0) -> DemoStats:
    """Send `count` sales: mostly ordinary, some declined cards, some too large for the
    stock, some over the bank's limit; follow each to its final state. A call that fails
    (error status, `timeout` seconds without an answer, connection lost) is counted in the
    stats and the run goes on; a sale not seen ending within `follow_timeout` seconds is
    counted as not followed."""
    rng = random.Random(seed)
    stats = DemoStats()
    headers = {"X-API-Key": api_key}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        calls = _Calls(client, stats)
        stores = await calls.json("GET", "/api/stores", "/api/stores", params={"limit": 100})
        products = await calls.json("GET", "/api/products", "/api/products",
                                    params={"limit": 100})
        if stores is None or products is None:
            console.print(stats.table(count))
            raise SystemExit(f"could not read the stores and products of {url}")
        store_ids = [s["store_id"] for s in stores["items"]]
        catalog = products["items"]
        if not store_ids or not catalog:
            raise SystemExit("the server has no stores or products: start it with demo data")
        ordinary = [p for p in catalog if p["unit_price"] < 100_000] or catalog
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                body = _sale(rng, i, store_ids, catalog, ordinary)
                started = time.perf_counter()
                stats.started += 1
                sale = await calls.json("POST", "/api/transactions", "/api/transactions",
                                        json=body)
                if sale is None:
                    stats.outcomes[f"{UNFINISHED} (not created)"] += 1
                    return
                final = await _follow(calls, sale["transaction_id"], sale["version"],
                                      follow_timeout)
                if final is None:
                    stats.outcomes[f"{UNFINISHED} (no final state read)"] += 1
                    return
                stats.latencies.append(time.perf_counter() - started)
                reason = final.get("reason") or ""
                label = final["status"] + (f" ({reason})" if reason else "")
                stats.outcomes[label] += 1

        with Live(stats.table(count), console=console, refresh_per_second=8) as live:
            tasks = [asyncio.create_task(one(i)) for i in range(count)]
            while not all(t.done() for t in tasks):
                live.update(stats.table(count))
                await asyncio.sleep(0.125)
            live.update(stats.table(count))
            for task in tasks:
                task.result()
    return stats


def _sale(rng: random.Random, i: int, store_ids: list[str], catalog: list[dict[str, Any]],
          ordinary: list[dict[str, Any]]) -> dict[str, Any]:
    roll = rng.random()
    method = "FAIL_CARD" if roll < 0.08 else rng.choice(["VISA", "MASTERCARD", "DEBIT"])
    picks = rng.sample(ordinary, k=min(len(ordinary), rng.randint(1, 3)))
    items = [{"product_id": p["product_id"], "quantity": rng.randint(1, 3)} for p in picks]
    if 0.08 <= roll < 0.14:  # more than any shelf holds: inventory unavailable, refund
        items[0]["quantity"] = 900
    elif 0.14 <= roll < 0.17:  # a pricey item: over the bank's limit
        items = [{"product_id": max(catalog, key=lambda p: p["unit_price"])["product_id"],
                  "quantity": 1}]
    return {"store_id": rng.choice(store_ids), "customer_id": f"customer-{rng.randint(1, 250)}",
            "items": items, "payment_method": method}


async def _follow(calls: _Calls, transaction_id: str, version: int,
                  follow_timeout: float) -> dict[str, Any] | None:
    """The sale once terminal; None if not read so within `follow_timeout` seconds (failed
    polls are counted and polled again)."""
    # min_version: read our own write, whatever the read model's lag.
    params = {"min_version": str(version)}
    deadline = time.monotonic() + follow_timeout
    while time.monotonic() < deadline:
        doc = await calls.json("GET", f"/api/transactions/{transaction_id}",
                               "/api/transactions/{id}", params=params)
        if doc is not None and doc["status"] in ("COMPLETED", "CANCELLED"):
            return dict(doc)
        await asyncio.sleep(0.05)
    return None
