"""Per-partition owner and depth, as /health and `magasin partitions` show them (issue 12)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from magasin.bootstrap import Runtime
from magasin.cli import app as cli
from magasin.messaging.partitioning import configured_partitions
from tests.e2e import conftest
from tests.e2e.conftest import Shop, eventually, serving


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    settings = conftest.test_settings(tmp_path, metrics_sample_s=0.1)
    async with serving(Runtime.embedded(settings)) as running:
        yield running


async def test_health_and_the_cli_show_every_partition_its_owner_and_what_waits(
    shop: Shop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF-1", 1899)
    await shop.restock(store, coffee, 5)
    sale = await shop.sell(store, [(coffee, 1)])
    await shop.final(sale["transaction_id"])
    n = configured_partitions()

    async def drained() -> list[dict[str, object]] | None:
        parts = (await shop.client.get("/health")).json().get("partitions", [])
        payment = [p for p in parts if p["consumer"] == "payment"]
        done = len(payment) == n and all(p["depth"] == 0 for p in parts)
        return parts if done else None

    parts = await eventually(drained)
    assert [p["partition"] for p in parts if p["consumer"] == "payment"] == list(range(n))
    assert {p["owner"] for p in parts} == {f"embedded:{os.getpid()}"}

    monkeypatch.setenv("MAGASIN_DATA_DIR", str(tmp_path))

    async def listed() -> list[dict[str, object]]:
        result = await asyncio.to_thread(CliRunner().invoke, cli, ["partitions", "--json"])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.output.splitlines()]

    rows = await listed()
    assert {(r["consumer"], r["partition"]) for r in rows} == {
        (p["consumer"], p["partition"]) for p in parts}

    async def drained_in_cli() -> bool:
        # A lane moves its checkpoint over events it ignores once the log is quiet (lazily),
        # so the stored depth reaches 0 a poll interval after the last event.
        return all(r["depth"] == 0 for r in await listed())

    await eventually(drained_in_cli)
