"""Tracing in embedded mode with the SDK's in-memory exporter: one sale is one trace, from
the HTTP request through every handler and the bank call; with tracing off, no span."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from magasin.bootstrap import Runtime
from magasin.observability import tracing
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Shop, eventually, serving

SAGA = ("transaction", "payment", "inventory", "store")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    runtime = Runtime.embedded(e2e.test_settings(tmp_path), services=SAGA)
    async with serving(runtime) as running:
        yield running


def trace_of(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id]


async def test_one_sale_is_one_trace_from_the_request_to_the_bank(
    shop: Shop, spans: InMemorySpanExporter
) -> None:
    store_id = await shop.open_store()
    product_id = await shop.add_product("SKU-TRACE", 990)
    await shop.restock(store_id, product_id, 3)
    spans.clear()
    sale = await shop.sell(store_id, [(product_id, 1)])

    (request,) = [s for s in spans.get_finished_spans()
                  if s.name == "POST /api/transactions" and s.parent is None
                  and s.attributes and s.attributes.get("http.response.status_code") == 201]
    assert request.context is not None
    trace_id = request.context.trace_id

    def completed() -> bool:
        return any(s.name == "handle TransactionCompleted" for s in trace_of(spans, trace_id))

    await eventually(lambda: _true(completed()))
    trace = trace_of(spans, trace_id)
    by_id = {s.context.span_id: s for s in trace if s.context is not None}
    names = {s.name for s in trace}
    assert {"handle TransactionCreated", "handle PaymentProcessed", "handle InventoryReserved",
            "handle OrderFulfilled", "bank charge"} <= names
    # Every span but the request hangs under another span of the same trace.
    for span in trace:
        if span is not request:
            assert span.parent is not None and span.parent.span_id in by_id, span.name
    (charge,) = [s for s in trace if s.name == "bank charge"]
    assert charge.parent is not None
    payer = by_id[charge.parent.span_id]
    assert payer.name == "handle TransactionCreated"
    assert payer.attributes is not None
    assert payer.attributes["messaging.consumer.group.name"] == "payment"
    assert payer.attributes["magasin.correlation_id"] == sale["transaction_id"]
    # The stored event carries the trace too, so a retry after a restart continues it.
    created = (await shop.runtime.store.read_stream(f"transaction-{sale['transaction_id']}"))[0]
    assert created.traceparent is not None
    assert created.traceparent.split("-")[1] == f"{trace_id:032x}"


async def test_with_tracing_off_events_carry_no_trace_and_no_span_is_made(shop: Shop) -> None:
    assert not tracing.enabled()
    store_id = await shop.open_store()
    product_id = await shop.add_product("SKU-QUIET", 990)
    await shop.restock(store_id, product_id, 3)
    sale = await shop.sell(store_id, [(product_id, 1)])
    created = (await shop.runtime.store.read_stream(f"transaction-{sale['transaction_id']}"))[0]
    assert created.traceparent is None


def test_tracing_is_wanted_only_when_an_otel_variable_asks_for_it() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none",
                               "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


async def _true(value: bool) -> bool:
    return value


async def test_each_handler_span_says_which_coordination_runs_the_sale(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """`magasin.saga.mode` on the spans of a sale: a dashboard splits the two apart."""
    runtime = Runtime.embedded(e2e.test_settings(tmp_path),
                               services=SAGA)
    async with serving(runtime) as shop:
        store_id = await shop.open_store()
        product_id = await shop.add_product("SKU-MODE", 990)
        await shop.restock(store_id, product_id, 3)
        spans.clear()
        choreographed = await shop.sell(store_id, [(product_id, 1)])
        await shop.final(choreographed["transaction_id"])
    orchestrated_settings = e2e.test_settings(tmp_path, saga_mode="orchestration")
    async with serving(Runtime.embedded(orchestrated_settings, services=SAGA)) as shop:
        orchestrated = await shop.sell(store_id, [(product_id, 1)])
        await shop.final(orchestrated["transaction_id"])

    def modes(transaction_id: str) -> set[object]:
        return {s.attributes.get(tracing.SAGA_MODE) for s in spans.get_finished_spans()
                if s.attributes and s.attributes.get("magasin.correlation_id") == transaction_id}

    assert modes(choreographed["transaction_id"]) == {"choreography"}
    assert modes(orchestrated["transaction_id"]) == {"orchestration"}
