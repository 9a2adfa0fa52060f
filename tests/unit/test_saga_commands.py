"""Saga commands travel like events: they round-trip through the schemas as stored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from magasin.shared.commands import (
    ALL_COMMANDS,
    TARGETS,
    ChargePayment,
    PrepareOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
)
from magasin.shared.events import SCHEMAS, SaleLine
from magasin.shared.ids import stream_id
from magasin.shared.messages import NewEvent
from magasin.transactions.domain import Transaction
from magasin.transactions.orchestrator.commands import pending_envelope
from magasin.transactions.orchestrator.domain import Command, Orchestration
from tests.unit.conftest import Harness


def test_every_orchestrator_command_has_an_envelope_and_a_target_service() -> None:
    assert {c.__name__ for c in ALL_COMMANDS} == {c.value for c in Command}
    assert set(TARGETS.values()) == {"payment", "inventory", "store"}


async def test_a_command_is_stored_and_read_back_like_an_event(harness: Harness) -> None:
    lines = (SaleLine("p1", 2, 250),)
    sent = [
        ChargePayment("t1:1", "transaction", "t1", "s1", lines, 500, "EUR", "card"),
        PrepareOrder("t1:3", "transaction", "t1", "s1", "res-1", lines),
        ReleaseStock("t1:5", "transaction", "t1", "fulfillment_failed:no_staff"),
    ]
    store = harness.store
    await store.append(stream_id("saga_orchestration", "t1"), [
        NewEvent(type(c).__name__, SCHEMAS.dump(c), correlation_id="t1") for c in sent
    ])
    stored = await store.read_all(after=0, limit=10)
    assert [SCHEMAS.validate(e) for e in stored] == sent
    assert {e.correlation_id for e in stored} == {"t1"}


async def test_the_sale_records_its_coordination_and_old_sales_are_choreographed(
    harness: Harness,
) -> None:
    sale = Transaction.create("t1", store_id="s1", customer_id="c1",
                              lines=(SaleLine("p1", 1, 100),), currency="EUR",
                              payment_method="card", saga_mode="orchestration")
    created = sale.pending[0]
    assert SCHEMAS.dump(created)["saga_mode"] == "orchestration"
    old = {k: v for k, v in SCHEMAS.dump(created).items() if k != "saga_mode"}
    [stored] = await harness.store.append(
        stream_id("transaction", "t1"), [NewEvent("TransactionCreated", old)])
    replayed = Transaction("t1")
    replayed.apply(SCHEMAS.validate(stored))
    assert (sale.saga_mode, replayed.saga_mode) == ("orchestration", "choreography")


def test_the_orchestrator_sends_each_step_as_the_command_of_its_target() -> None:
    lines = (SaleLine("p1", 2, 250),)
    sale = Transaction.create("t1", store_id="s1", customer_id="c1", lines=lines,
                              currency="EUR", payment_method="card",
                              saga_mode="orchestration")
    saga = Orchestration.start("t1", sale.total, sale.currency)
    sent = [pending_envelope(saga, sale)]
    saga.reply("PaymentProcessed", "pay-1")
    sent.append(pending_envelope(saga, sale))
    saga.reply("InventoryReserved", "res-1")
    sent.append(pending_envelope(saga, sale))
    saga.reply("OrderFulfillmentFailed", reason="no_staff")
    sent.append(pending_envelope(saga, sale))
    saga.reply("PaymentRefunded")
    sent.append(pending_envelope(saga, sale))
    assert sent == [
        ChargePayment("t1:1", "transaction", "t1", "s1", lines, 500, "EUR", "card"),
        ReserveStock("t1:2", "transaction", "t1", "s1", lines),
        PrepareOrder("t1:3", "transaction", "t1", "s1", "res-1", lines),
        RefundPayment("t1:4", "transaction", "t1", "fulfillment_failed:no_staff"),
        ReleaseStock("t1:5", "transaction", "t1", "fulfillment_failed:no_staff"),
    ]
    assert [TARGETS[type(c)] for c in sent] == [
        "payment", "inventory", "store", "payment", "inventory"]
    saga.reply("InventoryReleased")
    with pytest.raises(ValueError, match="waits on no command"):
        pending_envelope(saga, sale)


def test_the_audit_and_event_store_processes_handle_the_orchestrator_s_messages() -> None:
    """In distributed mode those processes import no transaction code: what they handle
    comes from the shared registry alone (a fresh interpreter proves nothing else loaded)."""
    probe = (
        "import json; from magasin.audit import log; "
        "from magasin.eventstore_service import archive; "
        "print(json.dumps([sorted(log.Chainer().handlers(lambda k, e: None)), "
        "sorted(archive.handlers())]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    audit, archived = json.loads(out)
    expected = {c.value for c in Command} | {
        "OrchestrationStarted", "CommandIssued", "ReplyAccepted", "CompensationDecided",
        "OrchestrationEnded",
    }
    assert expected <= set(audit)
    assert expected <= set(archived)
