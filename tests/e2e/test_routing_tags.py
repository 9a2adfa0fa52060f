"""A consumer only receives the events meant for it (issue 11), end to end in embedded mode:
the orchestrator handles the orchestrated sales only, the notifier the sales with a
callback_url only."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from magasin.bootstrap import Runtime
from magasin.transactions.orchestrator.handlers import CONSUMER as ORCHESTRATOR
from magasin.transactions.orchestrator.handlers import STATE
from tests.e2e import conftest
from tests.e2e.conftest import Shop, eventually, serving
from tests.e2e.conftest import handler_runs as handled
from tests.e2e.webhooks import Hook

NOTIFIER = "transaction.notifier"


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """Choreographed by default; card `AMEX` sales orchestrated by the hybrid rule."""
    settings = conftest.test_settings(tmp_path, saga_orchestrate="method:AMEX")
    async with serving(Runtime.embedded(settings)) as running:
        yield running


async def test_the_orchestrator_and_the_notifier_handle_only_the_sales_meant_for_them(
    shop: Shop, hook: Hook
) -> None:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF-1", 1899)
    await shop.restock(store, coffee, 10)
    before = handled()

    # One customer, so one partition: had the first sales' events been dispatched to the
    # orchestrator or the notifier, they would have been handled before the last sale's.
    plain = await shop.sell(store, [(coffee, 1)])
    declined = await shop.sell(store, [(coffee, 1)], payment_method="FAIL_CARD")
    for sale in (plain, declined):
        await shop.final(sale["transaction_id"])
    orchestrated = await shop.sell(store, [(coffee, 1)], payment_method="AMEX",
                                   callback_url=hook.url)
    tid = orchestrated["transaction_id"]
    assert (await shop.final(tid))["status"] == "COMPLETED"

    async def ended() -> bool:
        doc = await shop.runtime.store.get_document(STATE, tid)
        return doc is not None and doc["outcome"] == "COMPLETED"

    await eventually(ended)
    await eventually(hook.arrived(1))
    await eventually(lambda: _at_least(NOTIFIER, before, 1))
    runs = handled() - before
    # Its TransactionCreated and the replies to its three commands; nothing of the others.
    assert runs[ORCHESTRATOR] == 4
    assert runs[NOTIFIER] == 1
    assert [r.body["transaction_id"] for r in hook.requests] == [tid]
    for sale in (plain, declined):
        for event in await _events_of(shop, sale["transaction_id"]):
            assert not await shop.runtime.store.is_processed(ORCHESTRATOR, event)
            assert not await shop.runtime.store.is_processed(NOTIFIER, event)


async def _at_least(consumer: str, before: Counter[str], n: int) -> bool:
    return (handled() - before)[consumer] >= n


async def _events_of(shop: Shop, transaction_id: str) -> list[str]:
    found: list[str] = []
    after = 0
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        found += [e.event_id for e in page if e.correlation_id == transaction_id]
        after = page[-1].global_position
    return found
