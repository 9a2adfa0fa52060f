"""A compensation that does not finish (embedded): the refund never answers. It is asked for
again with backoff, then reported stuck (listing, metric) and an administrator can force it;
the money is given back once. Under both coordinations (orchestrated, asking again is the
orchestrator sending its pending RefundPayment once more)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from magasin.bootstrap import Runtime
from magasin.payments.gateway import REFUNDS, BankSimulator
from magasin.shared.errors import Unavailable
from tests.e2e.conftest import Shop, eventually, serving
from tests.e2e.conftest import test_settings as settings_for
from tests.e2e.test_saga_deadlines import ADMIN_KEY, final_state, saga_mode, shelf

__all__ = ["saga_mode"]  # the fixture: every test runs under both coordinations

FAST = {
    "admin_api_keys": ADMIN_KEY, "deadline_sweep_s": 0.1, "metrics_sample_s": 0.1,
    # The payment consumer gives a refund the bank cannot take ~1 s before dead-lettering it.
    "deadline_payment_s": 0.5, "breaker_open_s": 0.2,
    "deadline_compensation_s": 0.3, "compensation_retry_multiplier": 1.0,
}


@asynccontextmanager
async def running_shop(tmp_path: Path, **settings: Any) -> AsyncIterator[Shop]:
    runtime = Runtime.embedded(settings_for(tmp_path, **{**FAST, **settings}))
    async with serving(runtime) as running:
        yield running


@pytest.fixture
def refunds(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The bank takes charges but its refunds cannot be reached while `down` is True."""
    state = {"down": True}
    original = BankSimulator.refund

    async def refund(self: BankSimulator, key: str, reference: str, amount: int) -> str:
        if state["down"]:
            raise Unavailable("the bank's refund service cannot be reached")
        return await original(self, key, reference, amount)

    monkeypatch.setattr(BankSimulator, "refund", refund)
    return state


async def an_unavailable_sale(shop: Shop) -> str:
    """A paid sale the stock cannot serve: it must be refunded before it is cancelled."""
    store, coffee = await shelf(shop)
    sale: str = (await shop.sell(store, [(coffee, 11)]))["transaction_id"]
    return sale


async def bank_refunds(shop: Shop, transaction_id: str) -> int:
    return sum(1 for key, _ in await shop.runtime.store.find_documents(REFUNDS)
               if key.startswith(transaction_id))


async def stuck_gauge(shop: Shop) -> float:
    text = (await shop.client.get("/metrics")).text
    found = re.search(
        r'^magasin_sagas_stuck\{saga="transaction",state="CANCELLING"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else -1.0


async def test_a_refund_that_failed_until_dead_lettered_is_asked_for_again_and_ends_the_sale(
    tmp_path: Path, refunds: dict[str, bool], saga_mode: str
) -> None:
    async with running_shop(tmp_path, compensation_max_attempts=1000,
                            saga_mode=saga_mode) as shop:
        tid = await an_unavailable_sale(shop)

        async def dead_lettered() -> bool:
            page = await shop.ok("GET", "/api/dead-letters", params={"consumer": "payment"})
            return any(letter["correlation_id"] == tid for letter in page["items"])

        await eventually(dead_lettered)  # the bus gave up on the refund: only a retry helps
        saga = await shop.ok("GET", f"/api/sagas/{tid}")
        assert (saga["status"], saga["step"]) == ("CANCELLING", "compensation")
        refunds["down"] = False

        final = await final_state(shop, tid)
        assert (final["status"], final["reason"]) == ("CANCELLED", "inventory_unavailable")
        payment = await shop.ok("GET", f"/api/payments/{tid}")
        assert payment["status"] == "REFUNDED"
        assert await bank_refunds(shop, tid) == 1
        assert (await shop.ok("GET", f"/api/sagas/{tid}"))["attempts"] >= 1


async def test_a_compensation_that_never_finishes_is_reported_stuck_and_can_be_forced(
    tmp_path: Path, refunds: dict[str, bool], saga_mode: str
) -> None:
    async with running_shop(tmp_path, compensation_max_attempts=2, saga_mode=saga_mode) as shop:
        tid = await an_unavailable_sale(shop)

        async def stuck() -> list[dict[str, Any]] | None:
            page = await shop.ok("GET", "/api/sagas", params={"state": "CANCELLING"})
            return [s for s in page["items"] if s["stuck"]] or None

        (saga,) = await eventually(stuck)
        assert (saga["transaction_id"], saga["attempts"], saga["due_at"]) == (tid, 2, None)
        only_stuck = await shop.ok("GET", "/api/sagas", params={"stuck": "true"})
        assert [s["transaction_id"] for s in only_stuck["items"]] == [tid]

        async def gauge_is(value: float) -> bool:
            return await stuck_gauge(shop) == value

        await eventually(lambda: gauge_is(1.0))

        url = f"/api/sagas/{tid}/compensate"
        assert (await shop.client.post(url)).status_code == 403
        refunds["down"] = False
        forced = await shop.client.post(url, headers={"X-API-Key": ADMIN_KEY})
        assert forced.status_code == 202, forced.text
        assert (forced.json()["aborted_step"], forced.json()["attempt"]) == ("compensation", 3)

        final = await final_state(shop, tid)
        assert (final["status"], final["reason"]) == ("CANCELLED", "inventory_unavailable")
        assert await bank_refunds(shop, tid) == 1
        await eventually(lambda: gauge_is(0.0))
        assert (await shop.ok("GET", "/api/sagas", params={"stuck": "true"}))["items"] == []
        again = await shop.client.post(url, headers={"X-API-Key": ADMIN_KEY})
        assert again.status_code == 409
