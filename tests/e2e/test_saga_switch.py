"""Changing the coordination on a running system strands no sale (embedded): sales in flight
when the deployment stops finish under the coordination they started with after it is
restarted, over the same store, in the other mode; sales created after the restart run in
the new one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from magasin.bootstrap import Runtime
from magasin.payments.gateway import BankSimulator
from magasin.shared.errors import Unavailable
from tests.e2e.conftest import Shop, eventually, serving
from tests.e2e.conftest import test_settings as settings_for
from tests.e2e.test_saga_deadlines import final_state

COMMANDS = {"ChargePayment", "ReserveStock", "PrepareOrder", "RefundPayment", "ReleaseStock",
            "VoidPayment"}


@pytest.fixture
def bank(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The simulated bank cannot be reached while `down` is True: sales wait at payment."""
    state = {"down": True}
    original = BankSimulator._call

    async def call(self: BankSimulator) -> None:
        if state["down"]:
            raise Unavailable("the bank cannot be reached")
        await original(self)

    monkeypatch.setattr(BankSimulator, "_call", call)
    return state


def runtime(tmp_path: Path, saga_mode: str) -> Runtime:
    # The charge is retried until the restart (no deadline, no breaker in the way).
    return Runtime.embedded(settings_for(
        tmp_path, saga_mode=saga_mode, retry_attempts=1000, retry_multiplier=1.0,
        deadline_payment_s=3600.0, breaker_min_calls=1000, breaker_window=1000,
    ))


async def commands_of(shop: Shop) -> dict[str, list[str]]:
    """The orchestrator's commands per sale, in the order it sent them."""
    sent: dict[str, list[str]] = {}
    after = 0
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        for event in page:
            if event.type in COMMANDS and event.correlation_id is not None:
                sent.setdefault(event.correlation_id, []).append(event.type)
        after = page[-1].global_position
    return sent


@pytest.mark.parametrize(("before", "after"), [
    ("choreography", "orchestration"), ("orchestration", "choreography"),
])
async def test_sales_in_flight_finish_under_their_coordination_after_a_switch(
    tmp_path: Path, bank: dict[str, bool], before: str, after: str
) -> None:
    async with serving(runtime(tmp_path, before)) as shop:
        store = await shop.open_store()
        coffee = await shop.add_product("CAF-1", 1899)
        await shop.restock(store, coffee, 10)
        in_flight = [
            await shop.sell(store, [(coffee, 2)]),
            await shop.sell(store, [(coffee, 1)], payment_method="FAIL_CARD"),
            await shop.sell(store, [(coffee, 11)]),  # more than the stock: refund, cancel
        ]

        async def all_waiting_for_the_bank() -> bool:
            page = await shop.ok("GET", "/api/sagas", params={"state": "PENDING"})
            return len(page["items"]) == len(in_flight)

        await eventually(all_waiting_for_the_bank)
    # The deployment stopped with every sale waiting at its payment step.

    bank["down"] = False
    async with serving(runtime(tmp_path, after)) as shop:
        later = await shop.sell(store, [(coffee, 3)])
        finals = {s["transaction_id"]: await final_state(shop, s["transaction_id"])
                  for s in [*in_flight, later]}
        outcomes = [(f["status"], f["reason"]) for f in finals.values()]
        assert outcomes == [("COMPLETED", None), ("CANCELLED", "declined"),
                            ("CANCELLED", "inventory_unavailable"), ("COMPLETED", None)]

        # The books: stock left for the completed sales only; money kept for them only.
        async def settled() -> bool:
            line = await shop.stock(store, coffee)
            return bool((line["on_hand"], line["reserved"]) == (5, 0))

        await eventually(settled)
        payments = {tid: await shop.ok("GET", f"/api/payments/{tid}") for tid in finals}
        assert Counter(p["status"] for p in payments.values()) == Counter(
            {"CAPTURED": 2, "FAILED": 1, "REFUNDED": 1})

        # Each sale ran under the coordination it was created with, across the restart.
        sent = await commands_of(shop)
        for sale in in_flight:
            assert bool(sent.get(sale["transaction_id"])) == (before == "orchestration"), sale
        assert bool(sent.get(later["transaction_id"])) == (after == "orchestration")
        paid, declined, unavailable = (s["transaction_id"] for s in in_flight)
        nominal = ["ChargePayment", "ReserveStock", "PrepareOrder"]
        if before == "orchestration":
            assert (sent[paid], sent[declined], sent[unavailable]) == (
                nominal, ["ChargePayment"], ["ChargePayment", "ReserveStock", "RefundPayment"])
        else:
            assert sent[later["transaction_id"]] == nominal
