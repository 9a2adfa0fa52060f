"""Reconciliation with the bank, embedded: `magasin up` (a real process) is killed (SIGKILL)
between the bank's approval of a charge and its commit, restarted after the payment
deadline passed, then two reconcilers (`magasin payments reconcile`, real processes) run at
once. Whichever way the restart resolved the race, the bank's books and ours agree and
nothing was settled twice."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.payments.gateway import CHARGES, REFUNDS, BankSimulator
from magasin.shared.events import ChargeReconciled
from tests.e2e.conftest import TERMINAL, eventually
from tests.e2e.processes import ServiceProcess, free_port

API_KEY = "e2e-embedded-reconcile"


def environment(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_DATA_DIR=str(data_dir), MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_BANK_ANSWER_LATENCY_MS="2000", MAGASIN_DEADLINE_PAYMENT_S="1",
        MAGASIN_DEADLINE_SWEEP_S="0.2", MAGASIN_RECONCILE_EVERY_S="3600",
        MAGASIN_RETRY_INITIAL_DELAY="0.05", PYTHONUNBUFFERED="1",
    )
    return env


async def reconcile_cli(env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "magasin", "payments", "reconcile", "--grace", "0", "--json",
        env={**env, "MAGASIN_BANK_ANSWER_LATENCY_MS": "0"}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def test_a_crash_between_approval_and_commit_leaves_the_books_agreeing_after_reconciling(
    tmp_path: Path,
) -> None:
    env = environment(tmp_path / "var")
    db = tmp_path / "var" / "magasin.db"
    process = ServiceProcess("embedded", free_port(), env, tmp_path / "magasin.log", tmp_path)
    process.command = ["up", "--no-demo-data"]
    process.start()
    try:
        await process.healthy()
        async with httpx.AsyncClient(base_url=process.url, headers={"X-API-Key": API_KEY},
                                     timeout=30.0) as client:
            async def ok(method: str, url: str, **kw: Any) -> Any:
                r = await client.request(method, url, **kw)
                assert r.status_code < 300, r.text
                return r.json()

            store = (await ok("POST", "/api/stores", json={
                "name": "Crash", "district": "D", "address": "A"}))["store_id"]
            tea = (await ok("POST", "/api/products", json={
                "sku": "THE", "name": "The", "unit_price": 700, "currency": "CAD"}))["product_id"]

            async def restocked() -> bool:
                r = await client.post(f"/api/stock/{store}/{tea}/restock", json={"quantity": 5})
                return r.status_code == 200

            await eventually(restocked)

            async def sold() -> str | None:
                r = await client.post("/api/transactions", json={
                    "store_id": store, "customer_id": "c", "payment_method": "VISA",
                    "items": [{"product_id": tea, "quantity": 2}]})
                return str(r.json()["transaction_id"]) if r.status_code == 201 else None

            tid = await eventually(sold)

            async def approved() -> bool:
                async with SqliteEventStore(db) as books:
                    return await books.get_document(CHARGES, tid) is not None

            try:
                await eventually(approved)
            except TimeoutError:  # say what the process did instead
                raise AssertionError(f"the bank never saw the charge of {tid}:\n"
                                     f"{process.tail(150)}") from None
            process.kill()  # the bank's answer is still on its way: nothing committed
            await asyncio.sleep(1.5)  # the payment deadline passes while it is down
            process.start()
            await process.healthy()

            async def ended() -> dict[str, Any] | None:
                r = await client.get(f"/api/transactions/{tid}")
                return r.json() if r.status_code == 200 and r.json()["status"] in TERMINAL \
                    else None

            await eventually(ended, timeout=30)
            runs = await asyncio.gather(reconcile_cli(env, tmp_path),
                                        reconcile_cli(env, tmp_path))
            found = [s for run in runs for s in run if s["action"] in ("refunded", "recorded")]
            assert len(found) <= 1, runs

            async def projected() -> dict[str, Any] | None:
                payment: dict[str, Any] = await ok("GET", f"/api/payments/{tid}")
                return payment if payment.get("reconciled") or not found else None

            ours = await eventually(projected)
    finally:
        process.terminate()

    async with SqliteEventStore(db) as books:
        bank = await BankSimulator(latency_s=0, ledger=books).lookup(tid)
        refunds = [r for _, r in await books.find_documents(REFUNDS)]
        reconciled = [e for e in await books.read_all(after=0, limit=100_000)
                      if e.type == ChargeReconciled.__name__]
    assert bank is not None and bank.approved
    assert len([r for r in refunds if r["charge_reference"] == bank.reference]) <= 1
    assert len(reconciled) == len(found) <= 1
    # The bank's books and ours agree, whichever way the restart resolved the race.
    if ours["status"] == "CAPTURED":
        assert bank.holds_money
    elif ours["status"] == "REFUNDED":
        assert bank.refund_reference == ours["refund_reference"]
    else:
        assert ours["status"] == "FAILED"
        assert not bank.holds_money
        assert ours["reconciled"]["refund_reference"] == bank.refund_reference
