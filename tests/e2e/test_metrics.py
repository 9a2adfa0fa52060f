"""/metrics of the embedded app: what a sale, a declined card and an unknown URL leave in it."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from magasin.observability.sampler import sample_once
from tests.e2e.conftest import Shop, eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics", headers={"X-API-Key": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def counted_once_finished(shop: Shop, before: Samples, outcome: str) -> Samples:
    """The metrics once the sale's end has committed: counters move in after-commit hooks,
    beside the read model, so a sale can read as ended a moment before it is counted."""
    finished = ("magasin_sagas_finished_total", frozenset(
        {"saga": "transaction", "outcome": outcome, "mode": "choreography"}.items()))

    async def counted() -> Samples | None:
        after = await scrape(shop.client)
        return after if after.get(finished, 0) > before.get(finished, 0) else None

    result: Samples = await eventually(counted)
    return result


async def test_metrics_need_no_api_key_unlike_the_business_routes(shop: Shop) -> None:
    no_key = {"X-API-Key": ""}
    assert (await shop.client.get("/api/stores", headers=no_key)).status_code == 401
    samples = await scrape(shop.client)  # sends no key either
    assert any(name.startswith("magasin_") for name, _ in samples)


async def test_a_completed_sale_is_counted_as_a_saga_and_as_events(shop: Shop) -> None:
    store = await shop.open_store()
    product = await shop.add_product("METRIC-1", 250)
    await shop.restock(store, product, 5)
    before = await scrape(shop.client)

    sale = await shop.sell(store, [(product, 2)])
    assert (await shop.final(sale["transaction_id"]))["status"] == "COMPLETED"
    after = await counted_once_finished(shop, before, "completed")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("magasin_sagas_started_total", saga="transaction", mode="choreography") == 1
    assert grew("magasin_sagas_finished_total", saga="transaction", mode="choreography",
                outcome="completed") == 1
    assert grew("magasin_saga_duration_seconds_count", saga="transaction",
                mode="choreography", outcome="completed") == 1
    assert grew("magasin_events_published_total", event_type="TransactionCreated",
                service="transaction", outcome="ok") == 1
    assert grew("magasin_events_consumed_total", event_type="TransactionCreated",
                consumer="payment", service="payment", outcome="handled") == 1
    assert grew("magasin_events_published_total", event_type="PaymentProcessed",
                service="payment", outcome="ok") == 1
    assert grew("magasin_http_requests_total", method="POST", route="/api/transactions",
                status="201") >= 1
    assert grew("magasin_http_request_duration_seconds_count", method="POST",
                route="/api/transactions") >= 1


async def test_a_declined_card_is_counted_as_a_compensated_saga(shop: Shop) -> None:
    store = await shop.open_store()
    product = await shop.add_product("METRIC-2", 250)
    await shop.restock(store, product, 5)
    before = await scrape(shop.client)

    sale = await shop.sell(store, [(product, 1)], payment_method="FAIL_CARD")
    assert (await shop.final(sale["transaction_id"]))["status"] == "CANCELLED"
    after = await counted_once_finished(shop, before, "compensated")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("magasin_sagas_finished_total", saga="transaction", mode="choreography",
                outcome="compensated") == 1
    assert grew("magasin_sagas_finished_total", saga="transaction", mode="choreography",
                outcome="completed") == 0
    assert grew("magasin_events_published_total", event_type="PaymentFailed",
                service="payment", outcome="ok") == 1


async def test_no_saga_is_reported_in_flight_once_every_sale_has_ended(shop: Shop) -> None:
    store = await shop.open_store()
    product = await shop.add_product("METRIC-3", 100)
    await shop.restock(store, product, 5)
    sale = await shop.sell(store, [(product, 1)])
    await shop.final(sale["transaction_id"])

    async def settled() -> bool:  # the metrics consumer may trail the read model a little
        await sample_once(shop.runtime)
        samples = await scrape(shop.client)
        steps = [v for (name, _), v in samples.items() if name == "magasin_sagas_active"]
        return bool(steps) and not any(steps)

    assert await eventually(settled)


async def test_requests_to_unknown_urls_share_one_route_label(shop: Shop) -> None:
    before = await scrape(shop.client)
    for path in ("/nope/1", "/nope/2"):
        assert (await shop.client.get(path)).status_code == 404
    after = await scrape(shop.client)
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert value(after, "magasin_http_requests_total", **labels) - value(
        before, "magasin_http_requests_total", **labels) == 2
    assert not any("/nope" in dict(lab).get("route", "") for _, lab in after)
