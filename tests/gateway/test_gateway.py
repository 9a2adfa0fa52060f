"""The real gateway (nginx and its njs script, rendered as `magasin cluster up` renders it)
in front of stand-in services: every route of every service reaches that service, what
several services answer is merged as embedded mode answers it, errors made by the gateway
have the services' shape, Server-Sent Events pass as they are written, and a request that
cannot reach one process of a service goes to another unless it is a POST already sent."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from magasin.api.app import create_app
from magasin.bootstrap import Runtime
from magasin.config import Settings
from magasin.gateway.routes import SERVICES
from tests.deploy.test_gateway_config import nginx_binary
from tests.gateway.stubs import Stub, gateway

KEY = {"X-API-Key": "k"}


def service_apps() -> dict[str, Any]:
    """Each service's app as `magasin serve` builds it (not started: nothing connects)."""
    settings = Settings(api_keys="k")
    return {s: create_app(Runtime.distributed(settings, s), frozenset({"k"})) for s in SERVICES}


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    return service_apps()


@pytest.fixture(scope="module")
def stubs(apps: dict[str, Any]) -> Iterator[dict[str, Stub]]:
    """One stand-in per service, answering /openapi.json with the service's real document."""
    running = {s: Stub(s) for s in SERVICES}
    for service, stub in running.items():
        document = apps[service].openapi()
        health = {"status": "ok", "version": "0.1.0", "mode": "distributed",
                  "services": [service], "event_log_position": 7,
                  "checks": {service: {"fine": True}}}
        stub.answers["/openapi.json"] = lambda _s, _h, doc=document: (200, doc)
        stub.answers["/health"] = lambda _s, _h, doc=health: (200, doc)
    yield running
    for stub in running.values():
        stub.stop()


@pytest.fixture(scope="module")
def url(stubs: dict[str, Stub], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    nginx_binary()
    with gateway(tmp_path_factory.mktemp("gateway"), list(stubs.values())) as running:
        yield running.url


def sample(path: str, service: str) -> str:
    """A concrete path of a route template; a dead letter's id names a consumer of
    `service` (as the bus names them: `<consumer>:<message id>`)."""
    path = path.replace("{letter_id}", f"{service}.some-consumer:message-1")
    return re.sub(r"\{[^}]+\}", "x-1", path)


SHARED = {"/health", "/metrics", "/api/projections", "/api/dead-letters",
          "/api/dead-letters/requeue", "/api/dead-letters/live", "/api/auth/whoami",
          "/api/auth/stream-token"}
"""Paths every service serves: each has its own test below."""


def test_every_route_of_every_service_reaches_that_service(
    url: str, apps: dict[str, Any]
) -> None:
    checked = 0
    with httpx.Client(base_url=url, headers=KEY) as client:
        for service, app in apps.items():
            for path, operations in app.openapi()["paths"].items():
                if path in SHARED:
                    continue
                for method in operations:
                    answer = client.request(method, sample(path, service))
                    assert answer.status_code == 200, (path, answer.text)
                    assert answer.json()["service"] == service, (method, path)
                    checked += 1
    assert checked > 30


def test_an_unknown_path_gets_embedded_mode_s_answer(url: str) -> None:
    answer = httpx.get(f"{url}/api/nothing-here", headers=KEY)

    assert answer.status_code == 404
    assert answer.json() == {"error": "not_found", "detail": "Not Found"}


def test_each_service_s_health_and_metrics_have_a_path_of_their_own(url: str) -> None:
    for service in SERVICES:
        health = httpx.get(f"{url}/health/{service}").json()
        metrics = httpx.get(f"{url}/metrics/{service}").json()
        assert health["services"] == [service]
        assert (metrics["service"], metrics["path"]) == (service, "/metrics")
    assert httpx.get(f"{url}/metrics").status_code == 404


def letter(service: str, minute: int) -> dict[str, Any]:
    return {"id": f"{service}:m{minute}", "consumer": service,
            "dead_lettered_at": f"2026-12-01T10:{minute:02d}:00Z"}


def test_dead_letters_are_listed_from_every_service_oldest_first(
    url: str, stubs: dict[str, Stub]
) -> None:
    minutes = {"transaction": [30, 5], "payment": [12], "inventory": [], "store": [1, 50],
               "audit": [], "eventstore": [7]}
    for service, stub in stubs.items():
        items = [letter(service, m) for m in minutes[service]]
        stub.answers["/api/dead-letters"] = lambda _s, _h, items=items: (200, {"items": items})
    try:
        everything = httpx.get(f"{url}/api/dead-letters", headers=KEY).json()["items"]
        first_three = httpx.get(f"{url}/api/dead-letters", params={"limit": "3"},
                                headers=KEY).json()["items"]
        payments = httpx.get(f"{url}/api/dead-letters", params={"consumer": "payment"},
                             headers=KEY).json()["items"]
    finally:
        for stub in stubs.values():
            del stub.answers["/api/dead-letters"]

    assert [x["id"] for x in everything] == [
        "store:m1", "transaction:m5", "eventstore:m7", "payment:m12", "transaction:m30",
        "store:m50"]
    assert [x["id"] for x in first_three] == ["store:m1", "transaction:m5", "eventstore:m7"]
    assert [x["id"] for x in payments] == ["payment:m12"]


def test_a_dead_letter_is_operated_on_by_the_service_holding_it(url: str) -> None:
    with httpx.Client(base_url=url, headers=KEY) as client:
        def served(method: str, path: str, **params: str) -> str:
            service: str = client.request(method, path, params=params).json()["service"]
            return service

        assert served("GET", "/api/dead-letters/inventory:abc") == "inventory"
        assert served("POST", "/api/dead-letters/transaction.sagas:abc/requeue") == "transaction"
        assert served("POST", "/api/dead-letters/audit:abc/archive") == "audit"
        assert served("POST", "/api/dead-letters/requeue", consumer="store") == "store"
        assert served("POST", "/api/dead-letters/requeue",
                      consumer="transaction.notifier") == "transaction"
        # Unknown to every service: any one of them gives embedded mode's answer.
        assert served("GET", "/api/dead-letters/nobody:abc") == "transaction"
        assert served("POST", "/api/dead-letters/requeue", consumer="nobody") == "transaction"
        # The live listing streams from the service of `consumer` (transaction without one).
        assert served("GET", "/api/dead-letters/live", consumer="payment") == "payment"
        assert served("GET", "/api/dead-letters/live") == "transaction"


def test_projections_and_health_are_every_service_s_merged(url: str) -> None:
    projections = httpx.get(f"{url}/api/projections", headers=KEY)
    health = httpx.get(f"{url}/health")

    assert projections.status_code == 200
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["mode"]) == ("ok", "distributed")
    assert body["services"] == list(SERVICES)
    assert body["checks"] == {s: {"fine": True} for s in SERVICES}
    assert {p["event_log_position"] for p in body["processes"].values()} == {7}
    assert httpx.post(f"{url}/api/projections", headers=KEY).status_code == 405


def test_the_merged_openapi_document_holds_every_path_embedded_mode_serves(
    url: str, tmp_path: Path
) -> None:
    embedded = create_app(Runtime.embedded(Settings(api_keys="k", data_dir=tmp_path)),
                          frozenset({"k"})).openapi()

    merged = httpx.get(f"{url}/openapi.json").json()

    for path, operations in embedded["paths"].items():
        if path == "/metrics":  # per process: /metrics/{service}
            assert "/metrics/{service}" in merged["paths"]
            continue
        assert path in merged["paths"], path
        assert set(merged["paths"][path]) == set(operations), path
        for method, operation in operations.items():
            assert merged["paths"][path][method]["operationId"] == operation["operationId"]
    assert set(embedded["components"]["schemas"]) <= set(merged["components"]["schemas"])
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_a_schema_name_two_services_define_differently_is_kept_apart(
    url: str, stubs: dict[str, Stub], apps: dict[str, Any]
) -> None:
    document = json.loads(json.dumps(apps["payment"].openapi()))
    document["components"]["schemas"]["HTTPValidationError"]["title"] = "payment's own"
    stubs["payment"].answers["/openapi.json"] = lambda _s, _h: (200, document)
    try:
        merged = httpx.get(f"{url}/openapi.json").json()
    finally:
        stubs["payment"].answers["/openapi.json"] = (
            lambda _s, _h: (200, apps["payment"].openapi()))

    schemas = merged["components"]["schemas"]
    assert schemas["payment__HTTPValidationError"]["title"] == "payment's own"
    assert schemas["HTTPValidationError"]["title"] != "payment's own"
    payments = json.dumps(merged["paths"]["/api/payments"])
    assert '"#/components/schemas/payment__HTTPValidationError"' in payments
    stores = json.dumps(merged["paths"]["/api/stores"])
    assert '"#/components/schemas/HTTPValidationError"' in stores


def test_a_request_id_is_made_when_missing_and_passed_on_when_given(url: str) -> None:
    made = httpx.get(f"{url}/api/stores", headers=KEY)
    given = httpx.get(f"{url}/api/stores", headers={**KEY, "X-Request-Id": "abc-123"})
    refused = httpx.post(f"{url}/api/nothing-here", headers={**KEY, "X-Request-Id": "r-9"})

    assert re.fullmatch(r"[0-9a-f]{32}", made.json()["request_id"])
    assert given.json()["request_id"] == "abc-123"
    assert refused.headers["X-Request-Id"] == "r-9"  # on the gateway's own answers too


@pytest.fixture
def strict(tmp_path: Path) -> Iterator[tuple[str, dict[str, Stub]]]:
    """A gateway with small limits in front of fresh stand-ins, the audit service absent
    and the transaction service in two processes."""
    nginx_binary()
    running = [Stub(s) for s in SERVICES if s != "audit"] + [Stub("transaction")]
    try:
        with gateway(tmp_path, running, gateway_max_body="1k", gateway_timeout_s=1) as gw:
            yield gw.url, {f"{s.service}{i}": s for i, s in enumerate(running)}
    finally:
        for stub in running:
            stub.stop()


def test_errors_made_by_the_gateway_have_the_services_shape(
    strict: tuple[str, dict[str, Stub]],
) -> None:
    url, stubs = strict
    hang = threading.Event()

    def never(_stub: Stub, _handler: BaseHTTPRequestHandler) -> None:
        hang.wait(30)  # past the gateway's timeout: it gives up first

    stubs["eventstore4"].answers["/api/state"] = never
    try:
        too_large = httpx.post(f"{url}/api/products", content=b"x" * 4096, headers=KEY)
        no_process = httpx.get(f"{url}/api/audit", headers=KEY)
        too_slow = httpx.get(f"{url}/api/state", headers=KEY, timeout=30)
    finally:
        hang.set()

    assert (too_large.status_code, too_large.json()["error"]) == (413, "payload_too_large")
    assert (no_process.status_code, no_process.json()["error"]) == (502, "bad_gateway")
    assert "audit" in no_process.json()["detail"]
    assert (too_slow.status_code, too_slow.json()["error"]) == (504, "gateway_timeout")
    assert all(r.headers["X-Request-Id"] for r in (too_large, no_process, too_slow))
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503
    assert health.json()["processes"]["audit"]["status"] == "unreachable"
    merged = httpx.get(f"{url}/api/projections", headers=KEY)
    assert (merged.status_code, merged.json()["error"]) == (503, "unavailable")
    assert "audit" in merged.json()["detail"]


def test_a_request_a_process_cannot_take_goes_to_another_but_a_post_is_never_sent_twice(
    strict: tuple[str, dict[str, Stub]],
) -> None:
    url, stubs = strict
    first, second = stubs["transaction0"], stubs["transaction5"]

    def vanish(_stub: Stub, handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True  # drop the connection without a word, as a crash
        handler.connection.close()

    for stub in (first, second):
        stub.answers["/api/transactions/x-1"] = vanish
        stub.answers["/api/transactions"] = vanish
    second.answers.pop("/api/transactions/x-1")

    with httpx.Client(base_url=url, headers=KEY) as client:
        reads = [client.get("/api/transactions/x-1") for _ in range(10)]
        post = client.post("/api/transactions", json={})

    assert [r.status_code for r in reads] == [200] * 10  # a GET went on to the other one
    assert {r.json()["service"] for r in reads} == {"transaction"}
    assert (post.status_code, post.json()["error"]) == (502, "bad_gateway")
    posts = [p for s in (first, second) for p in s.received if p[0] == "POST"]
    assert len(posts) == 1, posts  # the client retries it with its Idempotency-Key


def test_server_sent_events_pass_through_as_they_are_written(
    url: str, stubs: dict[str, Stub]
) -> None:
    release = threading.Event()

    def stream(_stub: Stub, handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in (b"event: status\ndata: 1\n\n", b"event: status\ndata: 2\n\n"):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            handler.wfile.flush()
            release.wait(30)  # the second waits until the client has the first
        handler.wfile.write(b"0\r\n\r\n")

    stubs["transaction"].answers["/api/transactions/s-1/events"] = stream
    try:
        with httpx.stream("GET", f"{url}/api/transactions/s-1/events", headers=KEY,
                          timeout=30) as answer:
            lines = answer.iter_lines()
            first = [next(lines), next(lines)]
            release.set()
            rest = list(lines)
    finally:
        release.set()
        del stubs["transaction"].answers["/api/transactions/s-1/events"]

    assert first == ["event: status", "data: 1"]
    assert "data: 2" in rest
