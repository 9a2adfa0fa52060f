"""Operating an embedded magasin through trouble: dead letters over HTTP and the CLI
(seed 6.6.1), and the bank's circuit breaker seen in /health (seed 6.6.2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from magasin.bootstrap import Runtime, build_service
from magasin.cli import app as cli
from magasin.payments.breaker import CircuitBreaker
from magasin.payments.gateway import BankSimulator
from magasin.payments.service import build as build_payment
from magasin.payments.service import default_gateway
from magasin.service import ServiceContext
from magasin.shared.messages import NewEvent
from tests.e2e.conftest import Shop, eventually, serving
from tests.e2e.conftest import test_settings as settings_in

NOTIFIER = "transaction.notifier"


@dataclass
class Receiver:
    """A sale's callback endpoint that answers 500 while `broken`, then 200."""

    broken: bool = True
    answered: list[int] = field(default_factory=list)
    url: str = ""

    async def serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = next(
                int(line.split(":", 1)[1]) for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
            status = 500 if self.broken else 200
            self.answered.append(status)
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def got(self, status: int, times: int = 1) -> Any:
        async def check() -> bool:
            return self.answered.count(status) >= times

        return check


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    endpoint = Receiver()
    server = await asyncio.start_server(endpoint.serve_one, "127.0.0.1", 0)
    endpoint.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/sales"
    async with server:
        yield endpoint


async def a_sale(shop: Shop, callback_url: str | None = None) -> str:
    store = await shop.open_store()
    tea = await shop.add_product("THE-1", 500)
    await shop.restock(store, tea, 5)
    extra = {"callback_url": callback_url} if callback_url else {}
    sale: str = (await shop.sell(store, [(tea, 1)], **extra))["transaction_id"]
    return sale


async def dead_letters(shop: Shop, **query: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await shop.ok("GET", "/api/dead-letters", params=query))[
        "items"
    ]
    return items


async def a_dead_notification(shop: Shop, receiver: Receiver) -> dict[str, Any]:
    """A completed sale whose callback failed every attempt: one dead letter."""
    sale = await a_sale(shop, receiver.url)

    async def letter() -> dict[str, Any] | None:
        found = await dead_letters(shop, consumer=NOTIFIER)
        return found[0] if found else None

    found: dict[str, Any] = await eventually(letter)
    assert found["event_id"] and found["correlation_id"] == sale
    return found


async def a_malformed_sale(shop: Shop) -> None:
    """A TransactionCreated nobody can read, as a buggy producer would write it."""
    await shop.runtime.store.append("transaction-bad", [NewEvent("TransactionCreated", {})])


async def test_a_dead_letter_is_listed_and_read_with_its_reason_and_message(
    shop: Shop, receiver: Receiver
) -> None:
    letter = await a_dead_notification(shop, receiver)
    assert letter["consumer"] == NOTIFIER
    assert letter["type"] == "TransactionCompleted"
    assert letter["attempts"] == shop.runtime.settings.retry_attempts
    assert letter["status"] == "pending"
    assert "500" in letter["reason"]

    full = await shop.ok("GET", f"/api/dead-letters/{letter['id']}")
    assert full["event"]["payload"]["transaction_id"] == letter["correlation_id"]
    assert full["routing_key"] == "transaction.TransactionCompleted"
    assert json.loads(full["body"])["event_id"] == letter["event_id"]
    missing = await shop.client.get("/api/dead-letters/nobody:nothing")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")


async def test_requeued_after_the_fix_the_notification_is_delivered_once(
    shop: Shop, receiver: Receiver
) -> None:
    letter = await a_dead_notification(shop, receiver)
    tries = len(receiver.answered)
    receiver.broken = False  # the fix

    response = await shop.client.post(f"/api/dead-letters/{letter['id']}/requeue")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "requeued"
    again = await shop.client.post(f"/api/dead-letters/{letter['id']}/requeue")
    assert (again.status_code, again.json()["error"]) == (409, "conflict")

    await eventually(receiver.got(200))
    await asyncio.sleep(0.3)
    assert receiver.answered[tries:] == [200]
    assert await dead_letters(shop) == []
    assert (await shop.ok("GET", f"/api/dead-letters/{letter['id']}"))["status"] == "requeued"


async def test_bulk_requeue_sends_back_one_consumers_letters_only(
    shop: Shop, receiver: Receiver
) -> None:
    letter = await a_dead_notification(shop, receiver)
    await a_malformed_sale(shop)
    await eventually(lambda: dead_letters(shop, consumer="payment"))
    receiver.broken = False

    body = await shop.ok("POST", "/api/dead-letters/requeue", params={"consumer": NOTIFIER})
    assert body == {"consumer": NOTIFIER, "requeued": [letter["id"]]}
    await eventually(receiver.got(200))
    assert await dead_letters(shop, consumer=NOTIFIER) == []
    assert await dead_letters(shop, consumer="payment") != []
    no_consumer = await shop.client.post("/api/dead-letters/requeue")
    assert no_consumer.status_code == 422


async def test_dead_letters_are_filtered_by_consumer_type_and_reason(
    shop: Shop, receiver: Receiver
) -> None:
    await a_dead_notification(shop, receiver)
    await a_malformed_sale(shop)
    await eventually(lambda: dead_letters(shop, consumer="payment"))

    assert {x["type"] for x in await dead_letters(shop, type="TransactionCreated")} == {
        "TransactionCreated"
    }
    failed_hook = await dead_letters(shop, reason="500 x")
    assert [(x["consumer"], x["reason_kind"]) for x in failed_hook] == [
        (NOTIFIER, "HTTPStatusError")
    ]
    malformed = await dead_letters(shop, reason="INVALID PAYLOAD")
    assert malformed and all(x["type"] == "TransactionCreated" for x in malformed)
    assert all(x["reason_kind"] == "malformed" for x in malformed)
    assert await dead_letters(shop, consumer=NOTIFIER, type="TransactionCreated") == []


async def test_an_archived_letter_leaves_the_default_listing_but_is_kept(
    shop: Shop, receiver: Receiver
) -> None:
    letter = await a_dead_notification(shop, receiver)

    archived = await shop.ok("POST", f"/api/dead-letters/{letter['id']}/archive")
    assert archived["status"] == "archived"
    assert await dead_letters(shop) == []
    assert [x["id"] for x in await dead_letters(shop, archived="true")] == [letter["id"]]
    assert (await shop.ok("GET", f"/api/dead-letters/{letter['id']}"))["status"] == "archived"


async def test_dead_letter_routes_need_an_api_key(shop: Shop) -> None:
    response = await shop.client.get("/api/dead-letters", headers={"X-API-Key": "wrong"})
    assert response.status_code == 401


# -- the CLI -----------------------------------------------------------------------------


async def magasin(tmp_path: Path, *args: str) -> str:
    """Run the CLI against the embedded store the shop uses, as another process would."""
    runner = CliRunner()
    env = {"MAGASIN_DATA_DIR": str(tmp_path), "COLUMNS": "250"}
    result = await asyncio.to_thread(runner.invoke, cli, ["dead-letters", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def test_the_cli_lists_shows_requeues_and_archives_dead_letters(
    shop: Shop, receiver: Receiver, tmp_path: Path
) -> None:
    letter = await a_dead_notification(shop, receiver)
    await a_malformed_sale(shop)
    await eventually(lambda: dead_letters(shop, consumer="payment"))
    [malformed] = await dead_letters(shop, consumer="payment")

    listed = await magasin(tmp_path, "list", "--consumer", NOTIFIER)
    assert letter["id"] in listed and malformed["id"] not in listed
    shown = await magasin(tmp_path, "show", letter["id"])
    assert "TransactionCompleted" in shown and letter["correlation_id"] in shown

    receiver.broken = False
    assert "requeued" in await magasin(tmp_path, "requeue", letter["id"])
    await eventually(receiver.got(200))  # the running magasin delivered it

    assert "archived" in await magasin(tmp_path, "archive", malformed["id"])
    assert malformed["id"] not in await magasin(tmp_path, "list")
    assert malformed["id"] in await magasin(tmp_path, "list", "--archived")


def test_the_cli_says_so_when_a_dead_letter_does_not_exist(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["dead-letters", "show", "nobody:nothing"], env={"MAGASIN_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert "no dead letter" in result.output


# -- the bank's circuit breaker ------------------------------------------------------------


@pytest.fixture
async def flaky_bank(tmp_path: Path) -> AsyncIterator[tuple[Shop, BankSimulator]]:
    """An embedded magasin whose bank breaker opens on one failure for half a second."""
    settings = settings_in(
        tmp_path, breaker_min_calls=1, breaker_window=1, breaker_open_s=0.5,
        breaker_half_open_calls=1,
    )
    bare = Runtime.embedded(settings, services=())
    ctx = ServiceContext(bare.store, settings)
    gateway = default_gateway(ctx)
    assert isinstance(gateway, CircuitBreaker) and isinstance(gateway.gateway, BankSimulator)
    services = [build_service(name, ctx) for name in ("transaction", "inventory", "store")]
    services.append(build_payment(ctx, gateway=gateway))
    runtime = Runtime("embedded", settings, bare.store, bare.bus, services)
    async with serving(runtime) as running:
        yield running, gateway.gateway


async def breaker_state(shop: Shop) -> str:
    health = (await shop.client.get("/health")).json()
    state: str = health["checks"]["payment"]["bank_circuit_breaker"]["state"]
    return state


async def test_health_shows_the_bank_breaker_and_a_sale_waits_out_the_outage(
    flaky_bank: tuple[Shop, BankSimulator],
) -> None:
    shop, bank = flaky_bank
    assert await breaker_state(shop) == "closed"
    bank.reachable = False
    sale = await a_sale(shop)

    async def opened() -> bool:
        return await breaker_state(shop) in ("open", "half_open")

    await eventually(opened)
    health = await shop.client.get("/health")
    assert health.status_code == 200, "an open breaker is an outage handled, not a sick process"

    async def recorded() -> dict[str, Any] | None:  # the read model may lag a little
        response = await shop.client.get(f"/api/transactions/{sale}")
        return response.json() if response.status_code == 200 else None

    await asyncio.sleep(0.2)
    status = (await eventually(recorded))["status"]
    assert status == "PENDING", "a payment is not declined while the bank is unreachable"

    bank.reachable = True
    assert (await shop.final(sale))["status"] == "COMPLETED"
    assert await breaker_state(shop) == "closed"
    assert len(bank.charges) == 1, "the sale was charged once, after the outage"
