"""Stuck sagas end to end (embedded): a sale the bank cannot charge, a sale the store never
prepares, the list of sagas and their forced compensation by an administrator; under both
coordinations (orchestrated, the deadline goes to the orchestrator, which compensates)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from magasin.bootstrap import Runtime
from magasin.payments.gateway import BankSimulator
from magasin.shared.errors import Unavailable
from magasin.shared.messages import RecordedEvent
from magasin.stores import handlers as store_handlers
from tests.e2e.conftest import TERMINAL, Shop, eventually, serving
from tests.e2e.conftest import test_settings as settings_for

ADMIN_KEY = "e2e-admin-key"
AppFactory = Callable[..., Any]
MODES = ("choreography", "orchestration")
AT_FULFILMENT = {"choreography": ("PENDING", "order"),
                 "orchestration": ("INVENTORY_RESERVED", "fulfilment")}
"""A sale reserved and waiting for the store, as /api/sagas shows it: a choreographed sale
waits for its order (it hears nothing of its payment and reservation before it), an
orchestrated one for its fulfilment step."""


@pytest.fixture(params=MODES)
def saga_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@asynccontextmanager
async def running_shop(tmp_path: Path, **settings: Any) -> AsyncIterator[Shop]:
    runtime = Runtime.embedded(
        settings_for(tmp_path, admin_api_keys=ADMIN_KEY, deadline_sweep_s=0.1, **settings)
    )
    async with serving(runtime) as running:
        yield running


async def final_state(shop: Shop, transaction_id: str) -> dict[str, Any]:
    """The sale once terminal (its read model is a projection: it may lag the POST)."""

    async def done() -> dict[str, Any] | None:
        r = await shop.client.get(f"/api/transactions/{transaction_id}")
        return r.json() if r.status_code == 200 and r.json()["status"] in TERMINAL else None

    result: dict[str, Any] = await eventually(done)
    return result


async def shelf(shop: Shop) -> tuple[str, str]:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF", 1899)
    await shop.restock(store, coffee, 10)
    return store, coffee


@pytest.fixture
def bank_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated bank cannot be reached (the circuit breaker opens in front of it)."""

    async def unreachable(self: BankSimulator) -> None:
        raise Unavailable("the bank cannot be reached")

    monkeypatch.setattr(BankSimulator, "_call", unreachable)


@pytest.fixture
def store_never_prepares(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store service fails every order preparation (retried, then dead-lettered)."""

    async def broken(event: RecordedEvent, uow: object) -> None:
        raise RuntimeError("the order preparation is broken")

    monkeypatch.setattr(store_handlers, "prepare_order", broken)
    monkeypatch.setattr(store_handlers, "on_prepare_order", broken)


async def commands_sent(shop: Shop, transaction_id: str) -> list[str]:
    """The orchestrator's commands for the sale, in the order it sent them."""
    after, sent = 0, []
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        sent += [e.type for e in page if e.correlation_id == transaction_id
                 and e.stream_id.startswith("saga_command-")]
        after = page[-1].global_position
    return sent


@pytest.mark.usefixtures("bank_down")
async def test_a_saga_is_indexed_with_its_deadline_by_the_commit_that_creates_the_sale(
    tmp_path: Path, saga_mode: str
) -> None:
    async with running_shop(tmp_path, saga_mode=saga_mode) as shop:
        # No consumer follows the transaction's own events to keep the index any more.
        consumers = {c for service in shop.runtime.services for c in service.consumers}
        assert "transaction.sagas" not in consumers
        store, coffee = await shelf(shop)
        tid = (await shop.sell(store, [(coffee, 1)]))["transaction_id"]
        saga = await shop.ok("GET", f"/api/sagas/{tid}")  # at once: no wait, no retry
        first = "order" if saga_mode == "choreography" else "payment"
        assert (saga["status"], saga["step"], saga["mode"]) == ("PENDING", first, saga_mode)
        assert saga["due_at"] is not None and saga["created_at"] == saga["step_started_at"]


@pytest.mark.usefixtures("bank_down")
async def test_a_sale_the_bank_cannot_charge_is_cancelled_as_bank_unavailable(
    tmp_path: Path, saga_mode: str
) -> None:
    async with running_shop(tmp_path, deadline_payment_s=1.0, saga_mode=saga_mode) as shop:
        store, coffee = await shelf(shop)
        sale = await shop.sell(store, [(coffee, 2)])
        final = await final_state(shop, sale["transaction_id"])
        assert (final["status"], final["reason"]) == ("CANCELLED", "bank_unavailable")
        payment = await shop.ok("GET", f"/api/payments/{sale['transaction_id']}")
        assert (payment["status"], payment["reason"]) == ("FAILED", "bank_unavailable")
        assert (await shop.stock(store, coffee))["available"] == 10
        if saga_mode == "orchestration":
            # Whichever deadline fires first gives the sale up: the orchestrator's (it voids
            # the charge) or the payment service's own (the retried charge fails). Either
            # way nothing is taken, and nothing but a void ever follows the charge.
            first, *then = await commands_sent(shop, sale["transaction_id"])
            assert first == "ChargePayment" and then in ([], ["VoidPayment"])


@pytest.mark.usefixtures("store_never_prepares")
async def test_a_sale_stuck_at_fulfilment_is_released_refunded_and_cancelled(
    tmp_path: Path, saga_mode: str
) -> None:
    async with running_shop(tmp_path, deadline_fulfilment_s=1.0, deadline_order_s=1.0,
                            saga_mode=saga_mode) as shop:
        store, coffee = await shelf(shop)
        sale = await shop.sell(store, [(coffee, 3)])
        tid = sale["transaction_id"]
        final = await final_state(shop, tid)
        reason = f"deadline:{AT_FULFILMENT[saga_mode][1]}"
        assert (final["status"], final["reason"]) == ("CANCELLED", reason)
        assert [h["status"] for h in final["history"]][-2:] == ["CANCELLING", "CANCELLED"]
        payment = await shop.ok("GET", f"/api/payments/{tid}")
        assert (payment["status"], payment["reason"]) == ("REFUNDED", reason)
        line = await shop.stock(store, coffee)
        assert (line["on_hand"], line["reserved"], line["available"]) == (10, 0, 10)
        reservation = await shop.ok("GET", f"/api/reservations/{tid}")
        assert reservation["status"] == "RELEASED"
        if saga_mode == "orchestration":  # the compensation's order is the orchestrator's
            assert await commands_sent(shop, tid) == [
                "ChargePayment", "ReserveStock", "PrepareOrder", "RefundPayment",
                "ReleaseStock"]


@pytest.mark.usefixtures("store_never_prepares")
async def test_stuck_sagas_are_listed_and_an_admin_can_force_their_compensation(
    tmp_path: Path, saga_mode: str
) -> None:
    # Default deadlines: nothing aborts by itself.
    async with running_shop(tmp_path, saga_mode=saga_mode) as shop:
        store, coffee = await shelf(shop)
        tid = (await shop.sell(store, [(coffee, 1)]))["transaction_id"]
        declined = (await shop.sell(store, [(coffee, 1)], "FAIL_CARD"))["transaction_id"]
        assert (await final_state(shop, declined))["status"] == "CANCELLED"

        status, step = AT_FULFILMENT[saga_mode]

        async def waiting_for_fulfilment() -> list[dict[str, Any]] | None:
            # Orchestrated, the sale and the orchestrator hear InventoryReserved in two
            # consumers: wait for the orchestrator to have asked for the order too.
            # Choreographed, the sale hears nothing before its order: its reservation says.
            page = await shop.ok("GET", "/api/sagas", params={"state": status})
            asked = all((s["orchestrator"] or {}).get("pending_command") == "PrepareOrder"
                        for s in page["items"]) or saga_mode != "orchestration"
            held = await shop.client.get(f"/api/reservations/{tid}")
            reserved = held.status_code == 200 and held.json()["status"] == "RESERVED"
            return page["items"] if page["items"] and asked and reserved else None

        (saga,) = await eventually(waiting_for_fulfilment)
        assert (saga["transaction_id"], saga["step"]) == (tid, step)
        assert saga["mode"] == saga_mode
        if saga_mode == "orchestration":  # where the orchestrator stands, and on what
            assert saga["orchestrator"] == {
                "step": "fulfilment", "pending_command": "PrepareOrder",
                "command_id": f"{tid}:3", "outcome": None}
        else:
            assert saga["orchestrator"] is None
        assert saga["age_s"] >= 0
        older = await shop.ok("GET", "/api/sagas", params={"older_than": 3600})
        assert older["items"] == []
        every = await shop.ok("GET", "/api/sagas", params={"limit": 1})
        assert len(every["items"]) == 1 and every["next_cursor"] is not None
        rest = await shop.ok("GET", "/api/sagas", params={"cursor": every["next_cursor"]})
        assert {s["transaction_id"] for s in every["items"] + rest["items"]} == {tid, declined}
        ended = await shop.ok("GET", "/api/sagas", params={"state": "CANCELLED"})
        assert [(s["transaction_id"], s["step"], s["reason"]) for s in ended["items"]] == [
            (declined, None, "declined")
        ]

        url = f"/api/sagas/{tid}/compensate"
        no_key = await shop.client.post(url, headers={"X-API-Key": ""})
        assert no_key.status_code == 401
        not_admin = await shop.client.post(url)
        assert not_admin.status_code == 403
        assert not_admin.json()["error"] == "http_error" or not_admin.json()["detail"]
        admin = {"X-API-Key": ADMIN_KEY}
        forced = await shop.client.post(url, headers=admin)
        assert forced.status_code == 202, forced.text
        assert forced.json()["aborted_step"] == step

        final = await final_state(shop, tid)
        assert (final["status"], final["reason"]) == ("CANCELLED", "forced")
        again = await shop.client.post(url, headers=admin)
        assert again.status_code == 409  # it ended: nothing left to compensate
        assert (await shop.stock(store, coffee))["available"] == 10
        if saga_mode == "orchestration":
            assert (await commands_sent(shop, tid))[-2:] == ["RefundPayment", "ReleaseStock"]
        unknown = await shop.client.post("/api/sagas/nope/compensate", headers=admin)
        assert unknown.status_code == 404
