"""What a crash leaves behind is settled, distributed (each service its own process):

- reconciliation with the bank: the payment process is killed (SIGKILL) between the bank's
  approval and its commit, the sale is given up meanwhile, and two reconcilers (`magasin
  payments reconcile`, real processes) run at once: the bank's books and ours agree,
  nothing is settled twice;
- late fulfilment: the store process is down while a sale's reservation expires; when it
  comes back it fulfils the order anyway, and that fulfilment is refused;
- a compensation that does not finish: the payment process is killed while the bank's
  refund answer is on its way; the compensation is asked for again, reported stuck, and
  ends once the payment process is back, refunded once."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from magasin.payments.gateway import CAPTURED, CHARGES, REFUNDS
from tests.e2e.conftest import eventually
from tests.e2e.processes import SERVICES, Cluster, running_cluster
from tests.e2e.test_distributed import API_KEY, GATEWAY_LIMITS, Magasin, query

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

ANSWER_S = 1.0
"""How long the bank's answer takes to come back after it recorded the charge: the window
the payment process is killed in."""


@pytest.fixture(scope="module")
def cluster(
    pg_database: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_BANK_ANSWER_LATENCY_MS=str(int(ANSWER_S * 1000)),
        MAGASIN_DEADLINE_PAYMENT_S="2", MAGASIN_DEADLINE_SWEEP_S="0.2",
        # A sale is given up 4 s after its creation if its order is not prepared: long
        # after the reservations' expiry (1 s), which must decide first when the store is
        # down, and soon enough for a sale whose payment process was killed.
        MAGASIN_DEADLINE_ORDER_S="4",
        MAGASIN_RECONCILE_EVERY_S="3600",  # the reconcilers under test are the CLI's
        MAGASIN_RESERVATION_TTL_S="1", MAGASIN_RESERVATION_SWEEP_S="0.1",
        MAGASIN_DEADLINE_FULFILMENT_S="600",  # the reservation's expiry decides first
        MAGASIN_DEADLINE_COMPENSATION_S="0.5", MAGASIN_COMPENSATION_RETRY_MULTIPLIER="1",
        MAGASIN_COMPENSATION_MAX_ATTEMPTS="2", MAGASIN_METRICS_SAMPLE_S="0.2",
        MAGASIN_RETRY_ATTEMPTS="3", MAGASIN_RETRY_INITIAL_DELAY="0.05", PYTHONUNBUFFERED="1",
    )
    with running_cluster(
        pg_database, amqp_url, tmp_path_factory.mktemp("reconcile"), kind="settle",
        services=SERVICES, env=env, retry_attempts=3, gateway=GATEWAY_LIMITS,
    ) as running:
        yield running


@pytest.fixture
async def magasin(cluster: Cluster, request: pytest.FixtureRequest) -> AsyncIterator[Magasin]:
    failed_before = request.session.testsfailed
    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
        yield Magasin(cluster, client)
    if request.session.testsfailed > failed_before:
        print(cluster.logs())


async def ledger(cluster: Cluster, collection: str) -> dict[str, dict[str, Any]]:
    """The simulated bank's books (kept in the payment service's schema), by key."""
    rows = await query(cluster, 'SELECT key, body FROM "magasin_payment".documents '
                       "WHERE collection = $1", collection)
    return {row["key"]: json.loads(row["body"]) for row in rows}


async def reconcile_cli(cluster: Cluster) -> list[dict[str, Any]]:
    """`magasin payments reconcile --distributed` as its own process; what it settled."""
    env = {**cluster.env, "MAGASIN_BANK_ANSWER_LATENCY_MS": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "magasin", "payments", "reconcile", "--distributed",
        "--grace", "0", "--json", env=env, cwd=cluster.workdir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def test_a_charge_stranded_by_a_killed_payment_process_is_reconciled_exactly_once(
    magasin: Magasin, cluster: Cluster
) -> None:
    store = await magasin.open_store("Reconciliation")
    tea = await magasin.add_product("THE", 1250)
    await magasin.restock(store, tea, 5)
    sale = await magasin.sell(store, [(tea, 2)])
    tid = sale["transaction_id"]

    async def approved() -> dict[str, Any] | None:
        return (await ledger(cluster, CHARGES)).get(tid)

    charge = await eventually(approved)  # the bank took the money; its answer is on its way
    assert charge["approved"]
    payment = cluster.first("payment")
    payment.kill()  # before the answer arrives: nothing of it is committed on our side
    try:
        async def given_up() -> bool:  # the order's deadline passes while payment is down
            r = await magasin.client.get(f"{magasin.url}/api/sagas/{tid}")
            return r.status_code == 200 and r.json()["status"] == "CANCELLING"

        await eventually(given_up)
    finally:
        payment.start()
        await payment.healthy()

    final = await magasin.final(tid)
    assert final["status"] == "CANCELLED"
    # Two orders are possible and both settle the money once. The payment's partition
    # hands back the unacked TransactionCreated first, so its charge is usually asked again
    # (the bank answers the same approval) and captured, then the abort refunds it. The void
    # wins only when the abort is handled first (a retried delivery does not hold its key):
    # then the approval is stranded and the reconciler gives it back.
    async def settled_view() -> dict[str, Any] | None:
        doc = await magasin.payment(tid)
        return doc if doc["status"] in ("FAILED", "REFUNDED") else None

    ours = await eventually(settled_view)
    runs = [*await asyncio.gather(reconcile_cli(cluster), reconcile_cli(cluster))]
    found = [s for run in runs for s in run if s["action"] in ("refunded", "recorded")]
    refunds = [r for r in (await ledger(cluster, REFUNDS)).values()
               if r["charge_reference"] == charge["reference"]]
    # The bank's books and ours agree: the charge was given back once, and we say so.
    assert len(refunds) == 1, refunds
    assert (await ledger(cluster, CAPTURED))[charge["reference"]]["refunded"]
    if ours["status"] == "REFUNDED":  # captured on redelivery, refunded by the compensation
        assert found == [], runs  # nothing stranded: the reconcilers find it settled
        assert ours["bank_reference"] == charge["reference"]
    else:  # the void won: no sale will use the bank's approval; two reconcilers, one settlement
        assert len(found) == 1, runs
        (settlement,) = found
        assert (settlement["transaction_id"], settlement["amount"]) == (tid, 2500)
        assert settlement["bank_reference"] == charge["reference"]
        assert [r["reference"] for r in refunds] == [settlement["refund_reference"]]

        async def recorded() -> dict[str, Any] | None:
            doc = await magasin.payment(tid)
            return doc if doc.get("reconciled") else None

        view = await eventually(recorded)
        assert view["status"] == "FAILED"
        assert view["reconciled"]["refund_reference"] == settlement["refund_reference"]
        events = await query(cluster, 'SELECT type FROM "magasin_payment".events '
                             "WHERE stream_id = $1 ORDER BY stream_version", f"payment-{tid}")
        assert [e["type"] for e in events].count("ChargeReconciled") == 1
    # Nothing left to settle. A compensation retried meanwhile (the payment process was down
    # past the compensation's deadline) may note the payment again: it is found settled.
    again = await reconcile_cli(cluster)
    assert all(s["action"] == "settled" for s in again), again


async def test_a_store_back_from_a_crash_fulfils_late_and_is_refused(
    magasin: Magasin, cluster: Cluster
) -> None:
    store = await magasin.open_store("Late fulfilment")
    tea = await magasin.add_product("THE", 800)
    await magasin.restock(store, tea, 5)
    shop = cluster.first("store")
    shop.kill()  # down while the sale waits for it: its InventoryReserved waits in its queue
    try:
        tid = (await magasin.sell(store, [(tea, 2)]))["transaction_id"]
        final = await magasin.final(tid)
        assert (final["status"], final["reason"]) == ("CANCELLED", "reservation_expired")
    finally:
        shop.start()
        await shop.healthy()

    async def refused() -> bool:  # the store prepares the order it was sent, late
        rows = await query(cluster, 'SELECT type FROM "magasin_transaction".events '
                           "WHERE correlation_id = $1", tid)
        return "FulfilmentRefused" in [r["type"] for r in rows]

    await eventually(refused)
    assert (await magasin.read(f"/api/transactions/{tid}"))["status"] == "CANCELLED"
    payment = await magasin.payment(tid)
    assert (payment["status"], payment["reason"]) == ("REFUNDED", "reservation_expired")
    line = await magasin.stock(store, tea)
    assert (line["on_hand"], line["reserved"], line["available"]) == (5, 0, 5)


async def test_a_compensation_cut_short_by_a_crash_is_retried_reported_stuck_then_ends(
    magasin: Magasin, cluster: Cluster
) -> None:
    store = await magasin.open_store("Stuck compensation")
    tea = await magasin.add_product("THE", 900)
    await magasin.restock(store, tea, 1)
    tid = (await magasin.sell(store, [(tea, 2)]))["transaction_id"]  # paid, then no stock

    async def refunding() -> bool:  # the bank gave the money back; its answer is on its way
        return f"{tid}:refund" in await ledger(cluster, REFUNDS)

    await eventually(refunding)
    payment = cluster.first("payment")
    payment.kill()
    transaction = cluster.url("transaction")
    try:
        async def stuck() -> list[dict[str, Any]] | None:
            page = await magasin.ok("GET", "/api/sagas", params={"stuck": "true"})
            return [s for s in page["items"] if s["transaction_id"] == tid] or None

        (saga,) = await eventually(stuck)
        assert (saga["status"], saga["step"], saga["attempts"]) == (
            "CANCELLING", "compensation", 2
        )

        async def gauge(value: float) -> bool:
            text = (await magasin.client.get(f"{transaction}/metrics")).text
            line = f'magasin_sagas_stuck{{saga="transaction",state="CANCELLING"}} {value}'
            return line in text.splitlines()

        await eventually(lambda: gauge(1.0))
    finally:
        payment.start()
        await payment.healthy()

    final = await magasin.final(tid)
    assert (final["status"], final["reason"]) == ("CANCELLED", "inventory_unavailable")

    async def refunded() -> bool:  # the payments view follows the payment's log
        return bool((await magasin.payment(tid))["status"] == "REFUNDED")

    await eventually(refunded)
    refunds = [r for r in (await ledger(cluster, REFUNDS)).values()]
    charge = (await ledger(cluster, CHARGES))[tid]
    assert [r["charge_reference"] for r in refunds].count(charge["reference"]) == 1
    events = await query(cluster, 'SELECT type FROM "magasin_payment".events '
                         "WHERE stream_id = $1", f"payment-{tid}")
    assert [e["type"] for e in events].count("PaymentRefunded") == 1
    await eventually(lambda: gauge(0.0))
    assert (await magasin.ok("GET", "/api/sagas", params={"stuck": "true"}))["items"] == []
