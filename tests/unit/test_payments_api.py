"""The payment queries over HTTP: list, filter, page and read one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from magasin.api import errors
from magasin.config import Settings
from magasin.messaging.dispatch import Outcome
from magasin.payments.api import router
from magasin.payments.gateway import BankSimulator
from magasin.payments.handlers import handlers
from magasin.service import ServiceContext
from magasin.shared.events import InventoryUnavailable, MissingLine, SaleLine, TransactionCreated
from tests.unit.conftest import Harness, ProjectingTransport


async def sale(harness: Harness, bank: BankSimulator, tx: str, store: str, method: str) -> None:
    created = TransactionCreated(
        transaction_id=tx, store_id=store, customer_id="c-1",
        lines=(SaleLine("p-1", 1, 1500),), total=1500, currency="CAD", payment_method=method,
    )
    [event] = await harness.given("transaction", tx, created, correlation_id=tx)
    result = await harness.deliver("payment", handlers(bank), event)
    assert result.outcome is Outcome.HANDLED


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    bank = BankSimulator(latency_s=0)
    await sale(harness, bank, "tx-1", "store-a", "VISA")
    await sale(harness, bank, "tx-2", "store-a", "FAIL_CARD")
    await sale(harness, bank, "tx-3", "store-b", "VISA")
    await sale(harness, bank, "tx-4", "store-b", "VISA")
    [unavailable] = await harness.given(
        "inventory", "tx-4", InventoryUnavailable("tx-4", "store-b", (MissingLine("p-1", 1, 0),))
    )
    await harness.deliver("payment", handlers(bank), unavailable)

    app = FastAPI()
    errors.install(app)
    app.include_router(router(ServiceContext(harness.store, Settings())))
    transport = ProjectingTransport(app, harness.store)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


def ids(body: dict[str, list[dict[str, str]]]) -> list[str]:
    return [item["transaction_id"] for item in body["items"]]


async def test_payments_are_listed_in_transaction_order(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/payments")
    assert response.status_code == 200
    body = response.json()
    assert ids(body) == ["tx-1", "tx-2", "tx-3", "tx-4"]
    assert [item["status"] for item in body["items"]] == [
        "CAPTURED", "FAILED", "CAPTURED", "REFUNDED"
    ]
    assert body["next_cursor"] is None


async def test_payments_are_filtered_by_status_store_and_transaction(
    client: httpx.AsyncClient,
) -> None:
    captured = (await client.get("/api/payments", params={"status": "CAPTURED"})).json()
    assert ids(captured) == ["tx-1", "tx-3"]
    in_store = (await client.get("/api/payments", params={"store_id": "store-b"})).json()
    assert ids(in_store) == ["tx-3", "tx-4"]
    both = (
        await client.get("/api/payments", params={"store_id": "store-a", "status": "FAILED"})
    ).json()
    assert ids(both) == ["tx-2"]
    one = (await client.get("/api/payments", params={"transaction_id": "tx-3"})).json()
    assert ids(one) == ["tx-3"]


async def test_payments_are_paged_with_a_cursor(client: httpx.AsyncClient) -> None:
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        body = (await client.get("/api/payments", params=params)).json()
        seen += ids(body)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["tx-1", "tx-2", "tx-3", "tx-4"]
    assert pages == 2


async def test_one_payment_is_read_by_its_transaction(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/payments/tx-4")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "REFUNDED"
    assert body["reason"] == "inventory_unavailable"
    assert (body["amount"], body["currency"], body["store_id"]) == (1500, "CAD", "store-b")
    assert body["bank_reference"]
    assert body["refund_reference"]


async def test_an_unknown_payment_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/payments/tx-404")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "params", [{"status": "PENDING"}, {"limit": 0}, {"limit": 501}, {"store_id": ""}]
)
async def test_bad_query_parameters_are_refused(
    client: httpx.AsyncClient, params: dict[str, str | int]
) -> None:
    response = await client.get("/api/payments", params=params)
    assert response.status_code == 422


async def test_one_payment_reads_as_its_stream_has_it_while_the_read_model_lags(
    harness: Harness,
) -> None:
    """Seed 6.2.2: a client told a sale's outcome reads the payment behind it at once — a
    payment not projected yet, or projected before its refund, is replayed from its events
    (no projection runs here); once projected, the read model answers the same."""
    bank = BankSimulator(latency_s=0)
    app = FastAPI()
    errors.install(app)
    app.include_router(router(ServiceContext(harness.store, Settings())))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        await sale(harness, bank, "tx-1", "store-a", "VISA")
        fresh = await http.get("/api/payments/tx-1")
        assert fresh.status_code == 200, fresh.text
        assert (fresh.json()["status"], fresh.json()["reason"]) == ("CAPTURED", None)

        await harness.read_model("payment.payments", "tx-1")  # projected as CAPTURED
        [unavailable] = await harness.given(
            "inventory", "tx-1",
            InventoryUnavailable("tx-1", "store-a", (MissingLine("p-1", 1, 0),)))
        await harness.deliver("payment", handlers(bank), unavailable)
        refunded = (await http.get("/api/payments/tx-1")).json()
        assert (refunded["status"], refunded["reason"]) == ("REFUNDED", "inventory_unavailable")
        assert refunded["refund_reference"] == bank.refunds[0]

        assert await harness.read_model("payment.payments", "tx-1") is not None
        assert (await http.get("/api/payments/tx-1")).json() == refunded
        assert (await http.get("/api/payments/tx-9")).status_code == 404
