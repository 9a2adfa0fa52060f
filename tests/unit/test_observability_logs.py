"""Log lines: JSON with the delivery's context in distributed mode, readable in embedded."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from magasin.observability import logging as logs
from magasin.observability.http import RequestObservability
from magasin.shared.messages import RecordedEvent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def event() -> RecordedEvent:
    return RecordedEvent(
        event_id="ev-1", type="PaymentFailed", schema_version=1, stream_id="payment-t1",
        stream_version=1, global_position=1, occurred_at=datetime.now(UTC),
        correlation_id="t1", causation_id=None, traceparent=f"00-{TRACE}-00f067aa0ba902b7-01",
        metadata={}, payload={},
    )


def emit(fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.setenv("MAGASIN_LOG_FORMAT", fmt)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        assert logs.configure("payment", "console") == fmt
        with logs.delivering(event(), "payment"):
            logging.getLogger("magasin.test").warning("bank said %s", "no")
        logging.getLogger("magasin.test").info("outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return capsys.readouterr().err


def test_json_lines_carry_service_trace_correlation_and_event(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inside, outside = (json.loads(line) for line in emit("json", monkeypatch, capsys).splitlines())
    assert inside["message"] == "bank said no"
    assert inside["level"] == "warning"
    assert inside["service"] == "payment"
    assert inside["trace_id"] == TRACE
    assert inside["correlation_id"] == "t1"
    assert inside["event_id"] == "ev-1"
    assert inside["consumer"] == "payment"
    assert outside == {"ts": outside["ts"], "level": "info", "logger": "magasin.test",
                       "message": "outside", "service": "payment"}


def test_console_lines_read_as_text_with_the_context_at_the_end(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inside, outside = emit("console", monkeypatch, capsys).splitlines()
    assert "WARNING magasin.test bank said no  [" in inside
    assert "correlation_id=t1" in inside and "event_id=ev-1" in inside
    assert outside.endswith("magasin.test outside")


def test_an_unknown_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGASIN_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit):
        logs.configure("payment")


async def test_lines_logged_while_serving_a_request_carry_its_correlation_id() -> None:
    seen: list[dict[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(logs.context())

    middleware = RequestObservability(app)
    scope = {"type": "http", "method": "POST", "path": "/api/transactions",
             "headers": [(b"x-correlation-id", b"order-42")]}
    await middleware(scope, None, None)
    assert seen[0]["correlation_id"] == "order-42"
    assert seen[0]["http_path"] == "/api/transactions"
    assert "correlation_id" not in logs.context()


async def test_a_request_s_lines_and_answer_carry_its_request_id() -> None:
    """The caller's X-Request-Id (the gateway's) when sane, else one made here: in every
    line logged while serving the request, and back in the answer."""
    seen: list[dict[str, str]] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(logs.context())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = RequestObservability(app)
    for given in (b"gw-7f3a", b"", b"bad id with spaces", b"x" * 300):
        scope = {"type": "http", "method": "GET", "path": "/api/stores",
                 "headers": [(b"x-request-id", given)]}
        await middleware(scope, None, send)

    kept, *made = (line["request_id"] for line in seen)
    assert kept == "gw-7f3a"
    assert all(len(rid) == 32 and rid not in ("", "bad id with spaces") for rid in made)
    assert len(set(made)) == 3
    answered = [dict(m["headers"])[b"x-request-id"].decode() for m in sent]
    assert answered == [line["request_id"] for line in seen]
    assert "request_id" not in logs.context()
