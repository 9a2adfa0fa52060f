"""What the operator console needs from the API, as any client gets it: who a key is, stream
tokens for browsers' EventSource, every sale live, rolling saga statistics, reservations by
store, dead letters live with their outcome, newest-first lists, figures in /health, and the
console's own files."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from magasin.api.app import create_app
from magasin.api.auth import mint_stream_token
from magasin.bootstrap import Runtime
from tests.e2e.conftest import API_KEY, Shop, eventually, served, serving
from tests.e2e.conftest import test_settings as settings_in
from tests.e2e.test_api import parse_sse
from tests.e2e.test_resilience_ops import Receiver, a_dead_notification

NOMINAL = ["PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED"]
ADMIN_KEY = "boss-key"


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """An embedded magasin with an admin key besides the ordinary one (ASGI, no socket)."""
    runtime = Runtime.embedded(settings_in(tmp_path, admin_api_keys=ADMIN_KEY))
    async with serving(runtime) as running:
        yield running


@pytest.fixture
async def live_shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """The same behind a real HTTP server: streams that never end can be read as they go."""
    runtime = Runtime.embedded(settings_in(tmp_path))
    async with served(create_app(runtime, frozenset({API_KEY}))) as url, httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": API_KEY}, timeout=20, trust_env=False
    ) as client:
        yield Shop(client, runtime)


async def a_shelf(shop: Shop, name: str = "Centre") -> tuple[str, str]:
    store = await shop.open_store(name)
    coffee = await shop.add_product(f"CAF-{name}", 1899)
    await shop.restock(store, coffee, 50)
    return store, coffee


async def messages(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) of each Server-Sent Event as it arrives."""
    name = "message"
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
            name = "message"


# -- keys and stream tokens -----------------------------------------------------------------


async def test_a_key_learns_whether_it_may_run_admin_operations(shop: Shop) -> None:
    plain = await shop.ok("GET", "/api/auth/whoami")
    admin = await shop.ok("GET", "/api/auth/whoami", headers={"X-API-Key": ADMIN_KEY})
    assert (plain["admin"], admin["admin"]) == (False, True)
    assert plain["key_id"] != admin["key_id"]
    assert API_KEY not in json.dumps(plain)
    refused = await shop.client.get("/api/auth/whoami", headers={"X-API-Key": "nobody"})
    assert refused.status_code == 401


async def test_a_stream_token_opens_an_event_stream_and_nothing_else(shop: Shop) -> None:
    store, coffee = await a_shelf(shop)
    sale = (await shop.sell(store, [(coffee, 1)]))["transaction_id"]
    await shop.final(sale)
    token = (await shop.ok("POST", "/api/auth/stream-token"))["token"]
    assert API_KEY not in token
    bare = httpx.AsyncClient(transport=shop.client._transport, base_url="http://magasin")

    async with bare:
        stream = await bare.get(f"/api/transactions/{sale}/events",
                                params={"access_token": token})
        assert stream.status_code == 200
        assert [d["status"] for _, d in parse_sse(stream.text)] == NOMINAL

        read = await bare.get(f"/api/transactions/{sale}", params={"access_token": token})
        assert (read.status_code, read.json()["detail"]) == (401, "missing X-API-Key header")
        expired = mint_stream_token(API_KEY, time.time() - 120)
        forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
        foreign = mint_stream_token("not-a-key", time.time())
        for bad in (expired, forged, foreign, "garbage"):
            refused = await bare.get(f"/api/transactions/{sale}/events",
                                     params={"access_token": bad})
            assert refused.status_code == 401, bad
            assert refused.json()["detail"] == "invalid or expired stream token"
        # A token cannot mint another: minting needs the key itself.
        again = await bare.post("/api/auth/stream-token", params={"access_token": token})
        assert again.status_code == 401


# -- every sale, live -----------------------------------------------------------------------


async def test_the_live_feed_pushes_every_change_of_a_new_sale_until_it_completes(
    live_shop: Shop,
) -> None:
    store, coffee = await a_shelf(live_shop)
    seen: list[str] = []
    async with live_shop.client.stream("GET", "/api/transactions/live") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        sale_id = None
        async with asyncio.timeout(30):
            async for name, data in messages(response):
                if name == "ready":
                    sale_id = (await live_shop.sell(store, [(coffee, 1)]))["transaction_id"]
                elif name == "sale" and data["transaction_id"] == sale_id:
                    seen.append(data["status"])
                    if data["status"] == "COMPLETED":
                        final = data
                        break
    assert seen[0] == "PENDING"
    assert seen == [s for s in NOMINAL if s in seen], "in order, none repeated"
    assert [h["status"] for h in final["history"]] == NOMINAL
    assert "callback_url" not in final


async def test_a_status_filter_sends_matching_sales_and_says_when_one_leaves(
    live_shop: Shop,
) -> None:
    store, coffee = await a_shelf(live_shop, "Nord")
    other, tea = await a_shelf(live_shop, "Sud")
    events: list[tuple[str, str]] = []
    query = {"status": "PENDING", "store_id": store}
    async with live_shop.client.stream("GET", "/api/transactions/live", params=query) as resp:
        sale_id = None
        async with asyncio.timeout(30):
            async for name, data in messages(resp):
                if name == "ready":
                    await live_shop.sell(other, [(tea, 1)])  # another store: never sent
                    sale_id = (await live_shop.sell(store, [(coffee, 1)]))["transaction_id"]
                elif name in ("sale", "gone"):
                    events.append((name, data["status"]))
                    assert data["transaction_id"] == sale_id
                    if name == "gone":
                        break
    assert events[0] == ("sale", "PENDING")
    assert events[-1][0] == "gone" and events[-1][1] != "PENDING"
    assert all(status == "PENDING" for name, status in events if name == "sale")


async def test_the_live_feed_first_sends_the_newest_sales_when_asked(shop: Shop) -> None:
    store, coffee = await a_shelf(shop)
    sales = [(await shop.sell(store, [(coffee, 1)]))["transaction_id"] for _ in range(3)]
    for sale in sales:
        await shop.final(sale)

    body = (await shop.client.get("/api/transactions/live",
                                  params={"recent": 2, "timeout": 0.1})).text
    sent = parse_sse(body)
    assert [name for name, _ in sent] == ["sale", "sale", "ready", "timeout"]
    assert [d["transaction_id"] for _, d in sent[:2]] == sales[:0:-1]  # newest first
    assert all(d["status"] == "COMPLETED" for _, d in sent[:2])


# -- rolling statistics -----------------------------------------------------------------------


async def test_stats_say_how_recent_sagas_ended_and_how_long_they_took(shop: Shop) -> None:
    store, coffee = await a_shelf(shop)
    other, _ = await a_shelf(shop, "Est")
    sales = [await shop.sell(store, [(coffee, 1)]) for _ in range(2)]
    sales.append(await shop.sell(store, [(coffee, 1)], payment_method="FAIL_CARD"))
    for sale in sales:
        await shop.final(sale["transaction_id"])

    async def ended() -> dict[str, Any] | None:
        stats: dict[str, Any] = await shop.ok("GET", "/api/transactions/stats",
                                              params={"window": 120, "bucket": 10})
        return stats if stats["finished"] == 3 else None

    stats = await eventually(ended)
    assert (stats["completed"], stats["cancelled"]) == (2, 1)
    assert stats["cancelled_by_reason"] == {"declined": 1}
    assert stats["per_s"] == round(3 / 120, 3)
    assert 0 <= stats["p50_ms"] <= stats["p95_ms"]
    assert len(stats["buckets"]) == 12
    assert sum(b["completed"] + b["cancelled"] for b in stats["buckets"]) == 3
    assert set(stats["in_flight"]) == {"PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED",
                                       "FULFILLED", "CANCELLING"}

    elsewhere = await shop.ok("GET", "/api/transactions/stats", params={"store_id": other})
    assert (elsewhere["finished"], elsewhere["p50_ms"]) == (0, None)
    too_fine = await shop.client.get("/api/transactions/stats",
                                     params={"window": 3600, "bucket": 1})
    assert too_fine.status_code == 422


# -- lists -------------------------------------------------------------------------------------


async def test_lists_read_newest_first_and_reservations_by_store(shop: Shop) -> None:
    store, coffee = await a_shelf(shop)
    other, tea = await a_shelf(shop, "Ouest")
    sales = [(await shop.sell(store, [(coffee, 1)]))["transaction_id"] for _ in range(3)]
    elsewhere = (await shop.sell(other, [(tea, 2)]))["transaction_id"]
    for sale in [*sales, elsewhere]:
        await shop.final(sale)

    newest = await shop.ok("GET", "/api/transactions",
                           params={"order": "desc", "limit": 2, "store_id": store})
    assert [t["transaction_id"] for t in newest["items"]] == sales[:0:-1]
    rest = await shop.ok("GET", "/api/transactions", params={
        "order": "desc", "limit": 2, "store_id": store, "cursor": newest["next_cursor"]})
    assert [t["transaction_id"] for t in rest["items"]] == sales[:1]

    created = await shop.ok("GET", "/api/events",
                            params={"type": "TransactionCreated", "order": "desc", "limit": 3})
    assert [e["payload"]["transaction_id"] for e in created["items"]] == [
        elsewhere, sales[2], sales[1]]
    older = await shop.ok("GET", "/api/events", params={
        "type": "TransactionCreated", "order": "desc", "cursor": created["next_cursor"]})
    assert [e["payload"]["transaction_id"] for e in older["items"]] == [sales[0]]

    async def committed() -> list[dict[str, Any]] | None:
        page = await shop.ok("GET", "/api/reservations",
                             params={"store_id": store, "status": "COMMITTED"})
        return page["items"] if len(page["items"]) == 3 else None

    held = await eventually(committed)
    assert {r["transaction_id"] for r in held} == set(sales)
    assert all(r["store_id"] == store for r in held)
    assert (await shop.ok("GET", "/api/reservations",
                          params={"store_id": store, "status": "RESERVED"}))["items"] == []


# -- dead letters, live ----------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    endpoint = Receiver()
    server = await asyncio.start_server(endpoint.serve_one, "127.0.0.1", 0)
    endpoint.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/sales"
    async with server:
        yield endpoint


async def test_the_live_listing_shows_a_requeued_letter_handled_by_its_consumer(
    live_shop: Shop, receiver: Receiver,
) -> None:
    letter = await a_dead_notification(live_shop, receiver)
    outcomes: list[tuple[str, bool | None]] = []
    async with live_shop.client.stream("GET", "/api/dead-letters/live",
                                       params={"status": "all"}) as response:
        async with asyncio.timeout(30):
            async for name, data in messages(response):
                assert name == "letters"
                (item,) = data["items"]
                assert item["id"] == letter["id"]
                outcomes.append((item["status"], item["handled"]))
                if len(outcomes) == 1:
                    receiver.broken = False  # the fix, then the requeue
                    await live_shop.ok("POST", f"/api/dead-letters/{letter['id']}/requeue")
                if item["handled"]:
                    break
    assert outcomes[0] == ("pending", None)
    assert outcomes[-1] == ("requeued", True)
    assert set(outcomes[1:-1]) <= {("requeued", False)}
    assert receiver.answered[-1] == 200
    full = await live_shop.ok("GET", f"/api/dead-letters/{letter['id']}")
    assert (full["status"], full["handled"]) == ("requeued", True)


# -- /health and the console's files --------------------------------------------------------


async def test_health_shows_sampled_projection_lag_and_pending_dead_letters(shop: Shop) -> None:
    async def sampled() -> dict[str, Any] | None:
        body: dict[str, Any] = (await shop.client.get("/health")).json()
        return body if "sampled_at" in body else None

    health = await eventually(sampled)
    names = {p["name"] for p in health["projections"]}
    assert {"transaction.transactions", "inventory.stock", "store.orders"} <= names
    assert all({"lag_events", "lag_seconds", "status"} <= set(p) for p in health["projections"])
    assert health["dead_letters_pending"]["payment"] == 0
    assert "outbox_backlog" not in health, "embedded: the log is the bus, no outbox"


async def test_the_console_and_its_libraries_are_served_without_a_key(
    shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare = httpx.AsyncClient(transport=shop.client._transport, base_url="http://magasin")
    async with bare:
        root = await bare.get("/console")
        assert (root.status_code, root.headers["location"]) == (308, "/console/")
        page = await bare.get("/console/")
        assert page.status_code == 200
        assert "<title>magasin console</title>" in page.text
        for name, kind in (("alpine.js", "javascript"), ("uplot.js", "javascript"),
                           ("pico.css", "css"), ("uplot.css", "css")):
            library = await bare.get(f"/console/vendor/{name}")
            assert library.status_code == 200, (name, library.text)
            assert kind in library.headers["content-type"]
        assert (await bare.get("/console/static/console.js")).status_code == 200
        assert (await bare.get("/console/vendor/package.json")).status_code == 404
        assert (await bare.get("/console/static/..%2Froutes.py")).status_code == 404
        assert (await bare.get("/console/config.json")).json() == {"trace_url": None}

    monkeypatch.setenv("MAGASIN_CONSOLE_MODULES", str(tmp_path / "empty"))
    runtime = Runtime.embedded(settings_in(tmp_path / "other", trace_url="http://t/{trace_id}"))
    async with serving(runtime) as other:
        missing = await other.client.get("/console/")
        assert missing.status_code == 503
        assert "make install" in missing.text
        config = await other.client.get("/console/config.json")
        assert config.json() == {"trace_url": "http://t/{trace_id}"}
