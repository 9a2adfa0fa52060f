"""The routing tags a sale's events carry (issue 11): what the orchestrator's and the
notifier's consumers require, stamped from the sale whoever records its events."""

from __future__ import annotations

from magasin.config import Settings
from magasin.eventstore.store import EventStore
from magasin.messaging.tags import tags_of
from magasin.service import ServiceContext
from magasin.shared.events import InventoryUnavailable, PaymentRefunded
from magasin.shared.messages import RecordedEvent
from magasin.transactions import api, readmodel, sagas, tags
from magasin.transactions.handlers import saga_handlers, sales
from magasin.transactions.orchestrator.handlers import CONSUMER
from magasin.transactions.orchestrator.routing import Routing
from magasin.transactions.service import STEP_CONSUMER, build
from tests.unit.conftest import Harness

HOOK = "https://shop.example/hooks/sales"


async def sell(store: EventStore, callback: str | None = None, method: str = "VISA",
               routing: Routing = api.CHOREOGRAPHY) -> str:
    async with store.transaction() as uow:
        uow.put_document(readmodel.STORES, "s-1", {"store_id": "s-1", "name": "Centre",
                                                   "version": 1})
        uow.put_document(readmodel.PRODUCTS, "p-1", {"product_id": "p-1", "name": "Café",
                                                     "unit_price": 500, "currency": "CAD",
                                                     "version": 1})
    body = api.NewTransaction.model_validate({
        "store_id": "s-1", "customer_id": "alice", "payment_method": method,
        "items": [{"product_id": "p-1", "quantity": 2}], "callback_url": callback,
    })
    view, _ = await api.create(store, body, None, routing)
    return str(view["transaction_id"])


async def sale_events(store: EventStore, tid: str) -> list[RecordedEvent]:
    return await store.read_stream(sales.stream(tid))


async def test_an_orchestrated_sales_transaction_created_carries_the_orchestrators_tag(
    harness: Harness,
) -> None:
    """Chosen by the hybrid rule in a choreographed deployment, with a callback."""
    routing = Routing.from_settings("choreography", "method:AMEX")
    tid = await sell(harness.store, HOOK, method="AMEX", routing=routing)
    [created] = await sale_events(harness.store, tid)
    assert created.type == "TransactionCreated"
    assert tags_of(created.metadata) == (tags.WEBHOOK, tags.ORCHESTRATED)


async def test_a_choreographed_sale_without_a_callback_carries_no_tag(harness: Harness) -> None:
    tid = await sell(harness.store)
    [created] = await sale_events(harness.store, tid)
    assert "baggage" not in created.metadata


async def test_the_final_event_of_a_sale_with_a_callback_carries_the_notifiers_tag(
    harness: Harness,
) -> None:
    """Even when the events that led to it lost the baggage (a sweep's fresh unit of work,
    say): the transaction service stamps it from the sale."""
    tid = await sell(harness.store, HOOK)
    handlers = saga_handlers()
    for aggregate, payload in (
        ("reservation", InventoryUnavailable(tid, "s-1", ())),
        ("payment", PaymentRefunded("pay-1", tid, 1000, "CAD", "inventory_unavailable", "RF")),
    ):
        (event,) = await harness.given(aggregate, tid, payload, correlation_id=tid)
        assert tags_of(event.metadata) == ()
        await harness.deliver("transaction", handlers, event)
    events = await sale_events(harness.store, tid)
    assert events[-1].type == "TransactionCancelled"
    assert all(tags_of(e.metadata) == (tags.WEBHOOK,) for e in events)


async def test_an_operators_cancellation_of_a_sale_with_a_callback_carries_the_tag(
    harness: Harness,
) -> None:
    tid = await sell(harness.store, HOOK)
    await sagas.abort(harness.store, tid, "operator", actor="admin")
    last = (await sale_events(harness.store, tid))[-1]
    assert tags.WEBHOOK in tags_of(last.metadata)


async def test_the_orchestrator_and_the_notifier_require_their_tags(harness: Harness) -> None:
    service = build(ServiceContext(harness.store, Settings()))
    assert service.requires == {CONSUMER: tags.ORCHESTRATED, STEP_CONSUMER: tags.ORCHESTRATED,
                                "transaction.notifier": tags.WEBHOOK}
    for close in service.on_stop:
        await close()
