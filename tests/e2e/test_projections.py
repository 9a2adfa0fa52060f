"""The read models of a running embedded magasin as projections: their lag over HTTP, and
`magasin projections rebuild` swapping a rebuilt read model in while sales go on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from magasin.cli import app as cli
from magasin.eventstore.store import EventStore
from magasin.projections import Projection, ProjectionUnit
from magasin.projections.catalog import all_projections
from magasin.projections.projection import DocumentCache, project
from magasin.shared.messages import JsonDict
from magasin.transactions.projection import TRANSACTIONS
from tests.e2e.conftest import Shop, eventually

EVERY_PROJECTION = {
    "transaction.transactions", "payment.payments", "inventory.stock",
    "inventory.reservations", "store.stores", "store.products", "store.orders",
}


async def magasin(tmp_path: Path, *args: str) -> str:
    """Run the CLI against the shop's data dir, as another process would."""
    env = {"MAGASIN_DATA_DIR": str(tmp_path), "COLUMNS": "250"}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["projections", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def from_scratch(store: EventStore, projection: Projection) -> dict[str, JsonDict]:
    """The documents projecting the whole log once, in memory, gives."""
    unit = ProjectionUnit(store, {TRANSACTIONS: "expected"}, DocumentCache(complete=True))
    after = 0
    while page := await store.read_all(after=after, limit=1000):
        await project(projection, page, unit)
        after = page[-1].global_position
    return {key: body for (_, key), body in unit.changes.items() if body is not None}


async def a_shelf(shop: Shop) -> tuple[str, str]:
    store = await shop.open_store("Plateau")
    product = await shop.add_product("THE-1", 350)
    await shop.restock(store, product, 1000)
    return store, product


async def test_the_api_lists_every_read_model_with_its_lag(shop: Shop) -> None:
    store, product = await a_shelf(shop)
    await shop.final((await shop.sell(store, [(product, 1)]))["transaction_id"])

    async def caught_up() -> list[dict[str, Any]] | None:
        listed: list[dict[str, Any]] = await shop.ok("GET", "/api/projections")
        done = all((p["lag_events"], p["lag_seconds"], p["status"]) == (0, 0, "caught_up")
                   for p in listed)
        return listed if done else None

    listed = await eventually(caught_up)
    # Embedded, the audit chain is a projection of the log too (not rebuildable: no CLI).
    assert {p["name"] for p in listed} == EVERY_PROJECTION | {"audit.chain"}
    head = listed[0]["head"]
    assert head > 0 and all((p["checkpoint"], p["head"]) == (head, head) for p in listed)
    assert (await shop.client.get("/api/projections", headers={"X-API-Key": "no"})
            ).status_code == 401


async def test_a_rebuild_from_the_cli_swaps_in_while_sales_go_on(
    shop: Shop, tmp_path: Path
) -> None:
    store, product = await a_shelf(shop)
    before = [await shop.sell(store, [(product, 1)]) for _ in range(10)]

    async def selling() -> list[dict[str, Any]]:
        return [await shop.sell(store, [(product, 2)]) for _ in range(15)]

    during = asyncio.create_task(selling())
    rebuilt = await magasin(tmp_path, "rebuild", "transaction.transactions")
    sales = before + await during
    finals = [await shop.final(s["transaction_id"]) for s in sales]

    assert "rebuilt transaction.transactions" in rebuilt
    assert {f["status"] for f in finals} == {"COMPLETED"}
    assert all([h["status"] for h in f["history"]] == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ] for f in finals)
    projection = all_projections()["transaction.transactions"]
    live = dict(await shop.runtime.store.find_documents(TRANSACTIONS, limit=500))
    assert live == await from_scratch(shop.runtime.store, projection)

    listed = await magasin(tmp_path, "list")
    assert all(name in listed for name in EVERY_PROJECTION)
