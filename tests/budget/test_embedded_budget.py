"""A sale's cost in the embedded deployment, counted over 100 sales of the demo's mix.

Prints the table (run with `-s`); fails when a count is over its budget in budgets.py.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from magasin.bootstrap import Runtime
from magasin.demo import _sale
from tests.budget.budgets import EMBEDDED, SALES
from tests.e2e.conftest import Shop, handler_runs, serving
from tests.e2e.conftest import test_settings as settings_for

AUDIT = "AuditEntryRecorded"


class StatementCounter:
    """Counts the SQL statements run on every SQLite connection opened while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.counting = False
        self.kinds: Counter[str] = Counter()

    def _trace(self, _statement: str) -> None:
        if self.counting:
            self.count += 1
            self.kinds[" ".join(_statement.split()[:4])[:60]] += 1

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        connect = sqlite3.connect

        def counted(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn: sqlite3.Connection = connect(*args, **kwargs)
            conn.set_trace_callback(self._trace)
            return conn

        monkeypatch.setattr(sqlite3, "connect", counted)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> StatementCounter:
    counter = StatementCounter()
    counter.install(monkeypatch)
    return counter


async def events_by_type(shop: Shop) -> Counter[str]:
    kinds: Counter[str] = Counter()
    after = 0
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        kinds.update(e.type for e in page)
        after = page[-1].global_position
    return kinds


async def settled(shop: Shop) -> Counter[str]:
    """The log once the consumers stopped appending (same content twice, 0.3 s apart)."""
    before = await events_by_type(shop)
    while True:
        await asyncio.sleep(0.3)
        now = await events_by_type(shop)
        if now == before:
            return now
        before = now


def table(rows: dict[str, float], budgets: dict[str, float]) -> str:
    lines = [f"{'per completed sale (embedded)':40} {'count':>8} {'budget':>8}"]
    lines += [f"{k:40} {v:8.2f} {budgets.get(k, float('nan')):8.2f}" for k, v in rows.items()]
    return "\n".join(lines)


async def test_a_sale_of_the_demo_mix_stays_within_its_embedded_budget(
    tmp_path: Path, statements: StatementCounter
) -> None:
    async with serving(Runtime.embedded(settings_for(tmp_path))) as shop:
        store_ids = [await shop.open_store("Centre"), await shop.open_store("Gare")]
        catalog: list[dict[str, Any]] = []
        for sku, price in (("CAF-1", 1899), ("LAI-2", 649), ("PAIN-3", 129), ("TV-9", 1_099_999)):
            catalog.append({"product_id": await shop.add_product(sku, price), "unit_price": price})
        for store in store_ids:
            for product in catalog:
                await shop.restock(store, product["product_id"], 400)
        ordinary = [p for p in catalog if p["unit_price"] < 100_000]
        before = await settled(shop)

        runs_before = handler_runs()
        window = shop.runtime.bus.window  # type: ignore[attr-defined]
        woken_before = window.woken
        rng = random.Random(11)
        statements.counting = True
        for i in range(SALES):
            body = _sale(rng, i, store_ids, catalog, ordinary)
            items = [(item["product_id"], item["quantity"]) for item in body["items"]]
            sale = await shop.sell(body["store_id"], items, payment_method=body["payment_method"])
            await shop.final(sale["transaction_id"])
        after = await settled(shop)
        statements.counting = False
        runs = handler_runs() - runs_before
        woken = window.woken - woken_before

    appended = after - before
    rows = {
        "business events appended": sum(n for k, n in appended.items() if k != AUDIT) / SALES,
        "audit records in the business log": appended[AUDIT] / SALES,
        "handler runs": sum(runs.values()) / SALES,
        "followers woken by commits": woken / SALES,
        "SQLite write transactions": statements.kinds["BEGIN IMMEDIATE"] / SALES,
        "SQLite statements": statements.count / SALES,
    }
    print("\n" + table(rows, EMBEDDED))
    print("events appended by kind, per sale:",
          {k: round(n / SALES, 2) for k, n in sorted(appended.items())})
    print("handler runs by consumer, per sale:",
          {k: round(n / SALES, 2) for k, n in runs.most_common()})
    print("top SQLite statements:", statements.kinds.most_common(12))
    over = {k: v for k, v in rows.items() if v > EMBEDDED[k]}
    assert not over, f"over budget: {over}"
