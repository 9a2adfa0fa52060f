"""One sale in distributed mode (each service its own process) is one trace: spans of every
service, exported over OTLP/HTTP to a receiver in the test, under a single trace id with
every parent link pointing at a span of that trace."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.e2e.conftest import eventually
from tests.e2e.processes import (
    SERVICES,
    Cluster,
    running_cluster,
)
from tests.e2e.test_distributed import API_KEY, GATEWAY_LIMITS, Magasin

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]
RETRY_ATTEMPTS = 3


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    request_id: str | None = None
    """The `http.request.header.x-request-id` attribute of a request's span."""


def request_id(span: Any) -> str | None:
    for attribute in span.attributes:
        if attribute.key == "http.request.header.x-request-id":
            return str(attribute.value.array_value.values[0].string_value)
    return None


class Receiver:
    """An OTLP/HTTP trace endpoint on a free local port that keeps every span it gets."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                received = []
                for resource in request.resource_spans:
                    service = next(a.value.string_value for a in resource.resource.attributes
                                   if a.key == "service.name")
                    for scope in resource.scope_spans:
                        received += [Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                          s.parent_span_id.hex(), request_id(s))
                                     for s in scope.spans]
                with lock:
                    spans.extend(received)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.thread.start()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def traced_cluster(
    pg_database: str, amqp_url: str, receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAGASIN_", "OTEL_"))}
    env.update(
        MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS), MAGASIN_RETRY_INITIAL_DELAY="0.05",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100",
        PYTHONUNBUFFERED="1",
    )
    with running_cluster(
        pg_database, amqp_url, tmp_path_factory.mktemp("traced"), kind="trace",
        services=(*SERVICES, "audit"), env=env, retry_attempts=RETRY_ATTEMPTS,
        gateway=GATEWAY_LIMITS,
    ) as running:
        yield running


async def test_one_sale_is_one_trace_across_every_service(
    traced_cluster: Cluster, receiver: Receiver
) -> None:
    request_ids: list[str] = []

    async def sale_request_id(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.url.path == "/api/transactions":
            request_ids.append(response.headers["X-Request-Id"])

    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0,
                                 event_hooks={"response": [sale_request_id]}) as client:
        magasin = Magasin(traced_cluster, client)
        store_id = await magasin.open_store("Traced")
        product_id = await magasin.add_product("SKU-OTLP", 500)
        await magasin.restock(store_id, product_id, 2)
        await magasin.sell(store_id, [(product_id, 1)])

    # The sale's request is the last POST: one before it may have been refused while the
    # catalog replica lagged (422), with a trace of its own.
    async def request_span() -> Span | None:
        return next((s for s in list(receiver.spans)
                     if s.name == "POST /api/transactions" and not s.parent_id
                     and s.request_id == request_ids[-1]), None)

    # The gateway made the request's id: the service's span carries it, and so does the
    # gateway's access log line of that request.
    try:
        request = await eventually(request_span, timeout=30)
    except TimeoutError:
        roots = [(s.name, s.request_id) for s in receiver.spans if not s.parent_id]
        pytest.fail(f"no request span carries the sale's id {request_ids[-1]}: {roots}")
    trace_id = request.trace_id
    access = [json.loads(line) for line in traced_cluster.gateway.access_log.read_text()
              .splitlines()]
    assert any(e["request_id"] == request.request_id and e["service"] == "transaction"
               for e in access)

    def whole() -> list[Span] | None:
        trace = receiver.trace(trace_id)
        ids = {s.span_id for s in trace}
        services = {s.service for s in trace}
        linked = all(s.parent_id in ids for s in trace if s.parent_id)
        done = {("inventory", "handle TransactionCompleted"),
                ("audit", "handle InventoryCommitted")}
        have = {(s.service, s.name) for s in trace}
        return trace if done <= have and linked and {*SERVICES, "audit"} <= services else None

    async def ready() -> list[Span] | None:
        return whole()

    try:
        trace = await eventually(ready, timeout=30)
    except TimeoutError:
        seen = sorted({(s.service, s.name) for s in receiver.trace(trace_id)})
        pytest.fail(f"incomplete trace: {seen}\n{traced_cluster.logs(30)}")
    by_id = {s.span_id: s for s in trace}
    [root] = [s for s in trace if not s.parent_id]
    assert root.service == "transaction"
    charge = next(s for s in trace if s.name == "bank charge")
    assert by_id[charge.parent_id].name == "handle TransactionCreated"
    assert by_id[charge.parent_id].service == "payment"
    # A handler's parent is the publish span of its event, sent by the emitting service.
    handled = next(s for s in trace if s.service == "inventory"
                   and s.name == "handle PaymentProcessed")
    publish = by_id[handled.parent_id]
    assert (publish.service, publish.name) == ("payment", "publish PaymentProcessed")
    assert by_id[publish.parent_id].name == "handle TransactionCreated"


async def test_the_audit_process_chains_every_service_s_events_and_verifies(
    traced_cluster: Cluster,
) -> None:
    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
        magasin = Magasin(traced_cluster, client)
        store_id = await magasin.open_store("Audited")
        product_id = await magasin.add_product("SKU-AUDITED", 700)
        await magasin.restock(store_id, product_id, 1)
        sale = await magasin.sell(store_id, [(product_id, 1)], payment_method="FAIL_CARD")

        async def cancelled() -> list[dict[str, Any]] | None:
            trail: list[dict[str, Any]] = await magasin.ok(
                "GET", f"/api/audit/trail/{sale['transaction_id']}")
            done = any(e["event_type"] == "TransactionCancelled" for e in trail)
            return trail if done else None

        trail = await eventually(cancelled, timeout=30)
        by_type = {e["event_type"]: e for e in trail}
        assert by_type["TransactionCreated"]["service"] == "transaction"
        assert by_type["PaymentFailed"]["service"] == "payment"
        assert by_type["PaymentFailed"]["scopes"] == ["PCI-DSS"]
        report = await magasin.ok("GET", "/api/audit/verify")
        assert report["ok"] is True, report
        assert report["checked"] == report["head"] >= len(trail)
