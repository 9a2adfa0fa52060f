"""Reconciliation with the bank: a charge approved for a payment recorded as failed is
refunded (or recorded as refunded) exactly once, also by two reconcilers at once."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from magasin.cli import app as cli
from magasin.config import Settings
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.observability.metrics import REGISTRY
from magasin.payments.aborts import UNSETTLED, ChargeDeadline
from magasin.payments.gateway import REFUNDS, BankSimulator, Charge
from magasin.payments.handlers import charge, handlers, payments
from magasin.payments.reconcile import reconcile, settle
from magasin.shared.clock import utcnow
from magasin.shared.errors import ConcurrencyError
from magasin.shared.events import ChargeReconciled, SagaAborted, SaleLine, TransactionCreated
from tests.unit.conftest import Harness

TX = "tx-1"
NOW_ENOUGH = timedelta(0)


def counted(action: str) -> float:
    return REGISTRY.get_sample_value("magasin_bank_reconciled_total", {"action": action}) or 0.0


def created_event() -> TransactionCreated:
    return TransactionCreated(TX, "s-1", "c", (SaleLine("p-1", 2, 500),), 1000, "CAD", "VISA")


def aborted_event() -> SagaAborted:
    return SagaAborted(TX, "payment", "deadline:payment", "s-1", 1000, "CAD")


async def approval_lost_then_voided(harness: Harness, bank: BankSimulator) -> None:
    """The bank approves the charge, the payment process dies before its commit, and the
    saga's deadline voids the payment meanwhile (the void handled by another process)."""
    (created,) = await harness.given("transaction", TX, created_event())
    with pytest.raises(RuntimeError):
        async with harness.store.transaction() as uow:
            await charge(bank, created, uow, ChargeDeadline(60))
            raise RuntimeError("kill -9 between the bank's approval and the commit")
    (aborted,) = await harness.given("transaction", TX, aborted_event())
    await harness.deliver("payment", handlers(bank, ChargeDeadline(60)), aborted)
    # The redelivered charge (a fresh process: no approval in memory) finds it voided.
    await harness.deliver("payment", handlers(bank, ChargeDeadline(60)), created)


async def test_a_charge_stranded_by_a_crash_and_a_void_is_refunded_once(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    await approval_lost_then_voided(harness, bank)
    assert bank.captured_total == 1000  # the money is at the bank, our payment is FAILED
    before = counted("refunded")

    (done,) = await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH)
    assert counted("refunded") == before + 1
    assert (done.action, done.amount) == ("refunded", 1000)
    assert bank.captured_total == 0 and bank.refunds == [done.refund_reference]
    (event,) = await harness.emitted(ChargeReconciled)
    assert (event.action, event.refund_reference) == ("refunded", done.refund_reference)
    assert await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH) == []
    view = await harness.read_model("payment.payments", TX)
    assert view is not None and view["status"] == "FAILED"
    assert view["reconciled"]["refund_reference"] == done.refund_reference


async def test_a_charge_refunded_by_the_racing_process_is_recorded_not_refunded_again(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    deadline = ChargeDeadline(60)
    (created,) = await harness.given("transaction", TX, created_event())
    with pytest.raises(RuntimeError):
        async with harness.store.transaction() as uow:
            await charge(bank, created, uow, deadline)
            raise RuntimeError("the capture lost the race to a void")
    (aborted,) = await harness.given("transaction", TX, aborted_event())
    await harness.deliver("payment", handlers(bank, ChargeDeadline(60)), aborted)
    await harness.deliver("payment", handlers(bank, deadline), created)  # refunds in memory
    assert bank.captured_total == 0 and len(bank.refunds) == 1

    (done,) = await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH)
    assert (done.action, done.refund_reference) == ("recorded", bank.refunds[0])
    assert len(bank.refunds) == 1


async def test_a_void_with_nothing_at_the_bank_settles_nothing(harness: Harness) -> None:
    bank = BankSimulator(latency_s=0)
    (aborted,) = await harness.given("transaction", TX, aborted_event())
    await harness.deliver("payment", handlers(bank, ChargeDeadline(60)), aborted)
    (done,) = await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH)
    assert done.action == "none"
    assert await harness.store.find_documents(UNSETTLED) == []
    assert await harness.emitted(ChargeReconciled) == []


async def test_a_fresh_void_waits_for_the_charge_that_may_still_be_on_its_way(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    await approval_lost_then_voided(harness, bank)
    assert await reconcile(harness.store, bank, utcnow(), timedelta(minutes=1)) == []
    assert bank.captured_total == 1000
    later = utcnow() + timedelta(minutes=2)
    assert [s.action for s in await reconcile(harness.store, bank, later,
                                              timedelta(minutes=1))] == ["refunded"]


async def test_two_reconcilers_at_once_refund_and_record_it_once(harness: Harness) -> None:
    # Two processes, each its own client of one bank (books in the store they share).
    one = BankSimulator(latency_s=0.01, ledger=harness.store)
    two = BankSimulator(latency_s=0.01, ledger=harness.store)
    await approval_lost_then_voided(harness, one)
    first, second = await asyncio.gather(settle(harness.store, one, TX),
                                         settle(harness.store, two, TX))
    found = await one.lookup(TX)
    assert found is not None and not found.holds_money
    assert {first.refund_reference, second.refund_reference} - {None} == {
        found.refund_reference
    }
    assert len(await harness.store.find_documents(REFUNDS)) == 1
    (event,) = await harness.emitted(ChargeReconciled)
    assert event.refund_reference == found.refund_reference
    async with harness.store.transaction() as uow:
        payment = await payments.get(uow, TX)
    assert payment.reconciled == event


async def test_the_cli_reconciles_the_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAGASIN_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAGASIN_BANK_LATENCY_MS", "0")
    settings = Settings()
    settings.data_dir.mkdir()
    async with SqliteEventStore(settings.sqlite_path) as store:
        harness = Harness(store)
        bank = BankSimulator(latency_s=0, ledger=store)  # the service's bank: its books there
        await approval_lost_then_voided(harness, bank)

    def run() -> Result:
        return CliRunner().invoke(cli, ["payments", "reconcile", "--grace", "0", "--json"])

    first = await asyncio.to_thread(run)
    assert first.exit_code == 0, first.output
    (line,) = first.output.splitlines()
    assert json.loads(line)["action"] == "refunded"
    again = await asyncio.to_thread(run)
    assert (again.exit_code, again.output) == (0, "")
    async with SqliteEventStore(settings.sqlite_path) as store:
        found = await BankSimulator(latency_s=0, ledger=store).lookup(TX)
        assert found is not None and not found.holds_money
        assert len(await Harness(store).emitted(ChargeReconciled)) == 1


class SlowBank(BankSimulator):
    """A bank that decides on a charge only once the test lets it."""

    def __init__(self) -> None:
        super().__init__(latency_s=0)
        self.gate = asyncio.Event()

    async def charge(self, idempotency_key: str, amount: int, currency: str,
                     method: str) -> Charge:
        await self.gate.wait()
        return await super().charge(idempotency_key, amount, currency, method)


async def test_a_charge_approved_after_a_reconciler_looked_is_still_settled(
    harness: Harness,
) -> None:
    bank = SlowBank()
    deadline = ChargeDeadline(60)
    (created,) = await harness.given("transaction", TX, created_event())

    async def first_attempt() -> None:
        async with harness.store.transaction() as uow:
            await charge(bank, created, uow, deadline)

    charging = asyncio.create_task(first_attempt())
    await asyncio.sleep(0.05)  # the charge is on its way to the bank
    (aborted,) = await harness.given("transaction", TX, aborted_event())
    await harness.deliver("payment", handlers(bank, ChargeDeadline(60)), aborted)  # the void
    assert [s.action for s in await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH)] == [
        "none"  # the bank has not decided yet
    ]
    bank.gate.set()  # it approves now; the capture loses to the void
    with pytest.raises(ConcurrencyError):
        await charging
    # The dispatcher redoes the charge: it finds the payment voided and gives the money back.
    await harness.deliver("payment", handlers(bank, deadline), created)
    assert bank.captured_total == 0
    (done,) = await reconcile(harness.store, bank, utcnow(), NOW_ENOUGH)
    assert (done.action, done.refund_reference) == ("recorded", bank.refunds[0])
