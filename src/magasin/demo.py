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

    def table(self, total: int) -> Table:
        table = Table(title=f"magasin demo — {self.started}/{total} sales sent")
        table.add_column("outcome")
        table.add_column("sales", justify="right")
        for outcome, n in sorted(self.outcomes.items()):
            colour = "green" if outcome == "COMPLETED" else "yellow"
            table.add_row(f"[{colour}]{outcome}[/{colour}]", str(n))
        in_flight = self.started - sum(self.outcomes.values())
        table.add_row("[cyan]in flight[/cyan]", str(in_flight))
        if self.latencies:
            ordered = sorted(self.latencies)
            p50 = ordered[len(ordered) // 2] * 1000
            p95 = ordered[int(len(ordered) * 0.95)] * 1000
            table.caption = f"saga latency p50 {p50:.0f} ms, p95 {p95:.0f} ms"
        return table


async def drive(url: str, api_key: str, count: int, concurrency: int, seed: int,
                console: Console) -> DemoStats:
    """Send `count` sales: mostly ordinary, some declined cards, some too large for the
    stock, some over the bank's limit; follow each to its final state."""
    rng = random.Random(seed)
    stats = DemoStats()
    headers = {"X-API-Key": api_key}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        stores = (await client.get("/api/stores", params={"limit": 100})).raise_for_status()
        products = (await client.get("/api/products", params={"limit": 100})).raise_for_status()
        store_ids = [s["store_id"] for s in stores.json()["items"]]
        catalog = products.json()["items"]
        if not store_ids or not catalog:
            raise SystemExit("the server has no stores or products: start it with demo data")
        ordinary = [p for p in catalog if p["unit_price"] < 100_000] or catalog
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                body = _sale(rng, i, store_ids, catalog, ordinary)
                started = time.perf_counter()
                stats.started += 1
                created = (await client.post("/api/transactions", json=body)).raise_for_status()
                sale = created.json()
                final = await _follow(client, sale["transaction_id"], sale["version"])
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


async def _follow(client: httpx.AsyncClient, transaction_id: str,
                  version: int) -> dict[str, Any]:
    # min_version: read our own write even while the read model is behind it (distributed
    # mode's projection may not have the sale yet when the POST answers).
    params = {"min_version": str(version)}
    while True:
        doc: dict[str, Any] = (
            await client.get(f"/api/transactions/{transaction_id}", params=params)
        ).raise_for_status().json()
        if doc["status"] in ("COMPLETED", "CANCELLED"):
            return doc
        await asyncio.sleep(0.05)
