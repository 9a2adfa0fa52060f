"""End-to-end fixtures: a whole embedded magasin (every service, SQLite, in-process bus)
driven over HTTP through its ASGI app."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from magasin.api.app import create_app
from magasin.bootstrap import Runtime
from magasin.config import Settings
from tests.e2e.webhooks import Hook

API_KEY = "e2e-key"
TERMINAL = {"COMPLETED", "CANCELLED"}


def test_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir, bank_latency_ms=0, retry_initial_delay=0.05, api_keys=API_KEY,
        **overrides,
    )


class Shop:
    """An HTTP client of a running magasin with the steps a test needs."""

    def __init__(self, client: httpx.AsyncClient, runtime: Runtime) -> None:
        self.client = client
        self.runtime = runtime

    async def ok(self, method: str, url: str, **kw: Any) -> Any:
        response = await self.client.request(method, url, **kw)
        assert response.status_code < 300, (response.status_code, response.text)
        return response.json()

    async def open_store(self, name: str = "Centre") -> str:
        body = {"name": name, "district": "Ville-Marie", "address": "1 rue X"}
        store: str = (await self.ok("POST", "/api/stores", json=body))["store_id"]
        return store

    async def add_product(self, sku: str, unit_price: int) -> str:
        body = {"sku": sku, "name": sku, "unit_price": unit_price, "currency": "CAD"}
        product: str = (await self.ok("POST", "/api/products", json=body))["product_id"]
        return product

    async def restock(self, store_id: str, product_id: str, quantity: int) -> None:
        async def attempt() -> bool:  # inventory learns of new stores/products by events
            r = await self.client.post(
                f"/api/stock/{store_id}/{product_id}/restock", json={"quantity": quantity}
            )
            return r.status_code == 200

        await eventually(attempt)

    async def sell(self, store_id: str, items: list[tuple[str, int]],
                   payment_method: str = "VISA", **extra: Any) -> dict[str, Any]:
        body = {"store_id": store_id, "customer_id": "alice", "payment_method": payment_method,
                "items": [{"product_id": p, "quantity": q} for p, q in items], **extra}

        async def attempt() -> httpx.Response | None:  # the catalog replica may lag a bit
            r = await self.client.post("/api/transactions", json=body)
            return None if r.status_code == 422 and "unknown" in r.text else r

        response: httpx.Response = await eventually(attempt)
        assert response.status_code == 201, response.text
        assert response.headers["Location"].endswith(response.json()["transaction_id"])
        sale: dict[str, Any] = response.json()
        return sale

    async def final(self, transaction_id: str) -> dict[str, Any]:
        """The sale once terminal and its read model has caught up with it too (a GET by id
        replays a lagging read model; lists, filters and stats read the read model)."""

        async def done() -> dict[str, Any] | None:
            r = await self.client.get(f"/api/transactions/{transaction_id}")
            assert r.status_code == 200, r.text
            doc: dict[str, Any] = r.json()
            projected = r.headers["X-Magasin-Source"] == "read-model"
            return doc if doc["status"] in TERMINAL and projected else None

        result: dict[str, Any] = await eventually(done)
        return result

    async def stock(self, store_id: str, product_id: str) -> dict[str, Any]:
        line: dict[str, Any] = await self.ok("GET", f"/api/stock/{store_id}/{product_id}")
        return line


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.02)
        return result


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """`app` on a real HTTP server on a free local port (lifespan included); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    try:
        await eventually(started, timeout=10)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def serving(runtime: Runtime) -> AsyncIterator[Shop]:
    """Start `runtime`, hand out an HTTP client of its app (ASGI, no socket), stop it."""
    app = create_app(runtime, frozenset({API_KEY}))
    await runtime.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://magasin",
            headers={"X-API-Key": API_KEY},
        ) as client:
            yield Shop(client, runtime)
    finally:
        await runtime.stop()


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    async with serving(Runtime.embedded(test_settings(tmp_path))) as running:
        yield running


def handler_runs() -> Counter[str]:
    """Events each consumer handled so far in this process (its Prometheus registry)."""
    from magasin.observability.metrics import REGISTRY

    runs: Counter[str] = Counter()
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if (sample.name == "magasin_events_consumed_total"
                    and sample.labels.get("outcome") == "handled"):
                runs[sample.labels["consumer"]] += int(sample.value)
    return runs


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    endpoint = Hook()
    server = await asyncio.start_server(endpoint.serve_one, "127.0.0.1", 0)
    endpoint.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks/sales"
    async with server:
        yield endpoint
