"""Saga commands travel like events: they round-trip through the schemas as stored."""

from __future__ import annotations

from magasin.shared.commands import (
    ALL_COMMANDS,
    TARGETS,
    ChargePayment,
    PrepareOrder,
    ReleaseStock,
)
from magasin.shared.events import SCHEMAS, SaleLine
from magasin.shared.ids import stream_id
from magasin.shared.messages import NewEvent
from magasin.transactions.orchestrator.domain import Command
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
