"""Saga deadlines: the policy, the Transaction's abort decision, the saga index written with
the sale and the loop that aborts overdue sagas (with an injected clock), and payment's
reaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from magasin.eventstore.store import Causation, UnitOfWork
from magasin.inventory.commands import restock
from magasin.inventory.handlers import handlers as inventory_handlers
from magasin.messaging.dispatch import Outcome
from magasin.observability.sagas import STUCK
from magasin.payments.aborts import UNREACHED, ChargeDeadline, abort_handlers
from magasin.payments.domain import PaymentStatus
from magasin.payments.gateway import BankSimulator
from magasin.payments.handlers import charge, handlers, payments, refund_key
from magasin.shared.clock import utcnow
from magasin.shared.errors import Unavailable
from magasin.shared.events import (
    SCHEMAS,
    CompensationStalled,
    CompensationStarted,
    InventoryReleased,
    PaymentFailed,
    PaymentProcessed,
    PaymentRecorded,
    PaymentRefunded,
    ProductAdded,
    SagaAborted,
    SaleLine,
    StockLine,
    StoreRegistered,
    TransactionCancelled,
    TransactionCreated,
)
from magasin.shared.messages import NewEvent
from magasin.transactions import saga_index, sagas
from magasin.transactions.deadlines import Deadlines, due_key, due_of
from magasin.transactions.domain import Status, Transaction
from tests.unit.conftest import Harness

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DEADLINES = Deadlines(payment_s=60, reservation_s=30, fulfilment_s=30, order_s=120)
ORCHESTRATION = "orchestration"


def new_sale(ident: str = "tx-1") -> Transaction:
    """An orchestrated sale: it has a deadline per step (a choreographed one waits for its
    order, tests/unit/test_transactions_domain.py)."""
    sale = Transaction.create(ident, store_id="s-1", customer_id="c", currency="CAD",
                              payment_method="VISA", lines=[SaleLine("p-1", 2, 500)],
                              saga_mode=ORCHESTRATION)
    sale.pending.clear()
    return sale


def recorded(sale: Transaction) -> list[object]:
    events, sale.pending = sale.pending, []
    return events


# -- the policy ---------------------------------------------------------------------------


def test_each_step_is_due_once_its_deadline_has_passed_and_not_before() -> None:
    for step, seconds in (("order", 120), ("payment", 60), ("reservation", 30),
                          ("fulfilment", 30)):
        assert not DEADLINES.is_due(step, T0, T0 + timedelta(seconds=seconds - 0.001))
        assert DEADLINES.is_due(step, T0, T0 + timedelta(seconds=seconds))


def test_an_unknown_step_has_no_deadline() -> None:
    with pytest.raises(ValueError, match="unknown saga step"):
        DEADLINES.limit("delivery")


def test_deadline_index_keys_sort_by_due_time_and_give_it_back() -> None:
    early, late = T0, T0 + timedelta(microseconds=1)
    keys = [due_key(late, "a"), due_key(early, "z"), due_key(T0 - timedelta(days=1), "m")]
    assert [due_of(k) for k in sorted(keys)] == [T0 - timedelta(days=1), early, late]


# -- the Transaction's decision --------------------------------------------------------------


def test_a_sale_stuck_at_payment_compensates_and_takes_the_payments_reason() -> None:
    sale = new_sale()
    assert sale.step == "payment"
    assert sale.abort("deadline:payment", "payment")
    assert recorded(sale) == [
        SagaAborted("tx-1", "payment", "deadline:payment", "s-1", 1000, "CAD"),
        CompensationStarted("tx-1", "deadline:payment", needs_refund=True, needs_release=False),
    ]
    assert sale.status is Status.CANCELLING
    sale.payment_failed("bank_unavailable")  # the payment voids: nothing was taken
    assert sale.status is Status.CANCELLED
    assert sale.failure == "bank_unavailable"


def test_a_sale_whose_late_charge_was_captured_is_cancelled_only_once_refunded() -> None:
    sale = new_sale()
    sale.abort("deadline:payment", "payment")
    sale.payment_captured("pay-1", 1000)
    assert sale.status is Status.CANCELLING
    sale.payment_refunded(1000)
    assert (sale.status, sale.failure) == (Status.CANCELLED, "deadline:payment")


def test_a_sale_stuck_at_reservation_is_refunded_then_cancelled() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 1000)
    assert sale.abort("deadline:reservation")
    assert sale.aborted_step == "reservation"
    assert sale.status is Status.CANCELLING
    sale.payment_refunded(1000)
    assert (sale.status, sale.failure) == (Status.CANCELLED, "deadline:reservation")


def test_a_sale_stuck_at_fulfilment_needs_both_release_and_refund_to_cancel() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 1000)
    sale.inventory_reserved("res-1")
    assert sale.abort("deadline:fulfilment", "fulfilment")
    sale.payment_refunded(1000)
    assert sale.status is Status.CANCELLING
    sale.inventory_released()
    assert (sale.status, sale.failure) == (Status.CANCELLED, "deadline:fulfilment")


def test_a_sale_that_moved_on_compensates_or_ended_is_not_aborted() -> None:
    sale = new_sale()
    sale.payment_captured("pay-1", 1000)
    assert not sale.abort("deadline:payment", "payment")  # it waits for its stock now
    sale.inventory_unavailable()
    assert not sale.abort("forced")
    sale.payment_refunded(1000)
    assert sale.status is Status.CANCELLED
    assert not sale.abort("forced")
    assert [type(e) for e in recorded(sale)][-1] is TransactionCancelled


def test_a_compensation_is_retried_with_growing_delays_up_to_a_bound() -> None:
    policy = Deadlines(compensation_s=10, retry_multiplier=2, retry_max_delay_s=50)
    delays = [policy.limit("compensation", n).total_seconds() for n in range(5)]
    assert delays == [10, 20, 40, 50, 50]


def test_only_a_compensating_sale_has_its_compensation_asked_for_again() -> None:
    sale = new_sale()
    assert not sale.retry_compensation()  # waiting for its payment: nothing to retry
    sale.payment_captured("pay-1", 1000)
    sale.inventory_unavailable()
    assert sale.waits_for == "compensation"
    assert sale.retry_compensation(0)
    assert not sale.retry_compensation(0)  # a stale deadline entry: retried already
    retry = recorded(sale)[-1]
    assert retry == SagaAborted("tx-1", "compensation", "inventory_unavailable", "s-1", 1000,
                                "CAD", attempt=1)
    assert sale.aborted_step is None and sale.compensation_attempts == 1
    assert sale.stall(1) and not sale.stall(1)
    assert sale.stalled
    assert sale.retry_compensation()  # an operator forces it: no longer reported stuck
    assert not sale.stalled
    sale.payment_refunded(1000)
    assert sale.status is Status.CANCELLED
    assert not sale.retry_compensation() and not sale.stall(2)


# -- the index and the loop, with an injected clock -------------------------------------------


async def start_sale(
    harness: Harness, ident: str, deadlines: Deadlines = DEADLINES, mode: str = "choreography"
) -> Transaction:
    sale = Transaction.create(ident, store_id="s-1", customer_id="c", currency="CAD",
                              payment_method="VISA", lines=[SaleLine("p-1", 2, 500)],
                              saga_mode=mode)
    async with harness.store.transaction(Causation(correlation_id=ident)) as uow:
        await saga_index.save(uow, sale, deadlines)
    return sale


async def step(harness: Harness, ident: str, change: Callable[[Transaction], object],
               deadlines: Deadlines = DEADLINES) -> None:
    """A saga step as the transaction's handlers take it: load, change, save (and index)."""
    async with harness.store.transaction() as uow:
        sale = await sagas.sales.get(uow, ident)
        change(sale)
        await saga_index.save(uow, sale, deadlines)


async def test_the_index_is_in_step_with_the_sale_as_soon_as_it_commits(
    harness: Harness,
) -> None:
    # No consumer runs here: the unit of work that saves the sale writes its index.
    await start_sale(harness, "tx-0")
    (created,) = await harness.store.read_all(after=0, limit=10)
    doc = await harness.store.get_document(sagas.SAGAS, "tx-0")
    assert doc is not None
    assert (doc["status"], doc["step"], doc["mode"], doc["created_at"]) == (
        "PENDING", "order", "choreography", created.occurred_at.isoformat())
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert (entry[1]["step"], due_of(entry[0])) == (
        "order", created.occurred_at + timedelta(seconds=120))
    await step(harness, "tx-0", lambda s: s.order_fulfilled("ord-1", "pay-1", "res-1"))
    doc = await harness.store.get_document(sagas.SAGAS, "tx-0")
    assert doc is not None and (doc["status"], doc["step"]) == ("COMPLETED", None)
    assert await harness.store.find_documents(sagas.DEADLINES) == []

    # An orchestrated sale has a deadline per step.
    await start_sale(harness, "tx-1", mode=ORCHESTRATION)
    created = (await harness.store.read_all(after=0, limit=10))[-1]
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert (entry[1]["step"], due_of(entry[0])) == (
        "payment", created.occurred_at + timedelta(seconds=60))

    await step(harness, "tx-1", lambda s: s.payment_captured("pay-1", 1000))
    paid = (await harness.store.read_all(after=created.global_position, limit=10))[-1]
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["step"], doc["version"]) == (
        "PAYMENT_PROCESSED", "reservation", 2)
    # The step is dated from the event that started it, as the log has it.
    assert doc["step_started_at"] == paid.occurred_at.isoformat()
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert (entry[1]["step"], due_of(entry[0])) == (
        "reservation", paid.occurred_at + timedelta(seconds=30))


async def test_a_step_starts_from_the_index_this_process_wrote_and_reads_one_written_elsewhere(
    harness: Harness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []
    get_document = UnitOfWork.get_document

    async def counted(uow: UnitOfWork, collection: str, key: str) -> dict[str, Any] | None:
        if collection == sagas.SAGAS:
            reads.append(key)
        return await get_document(uow, collection, key)

    monkeypatch.setattr(UnitOfWork, "get_document", counted)
    # A new sale has no index document to read.
    await start_sale(harness, "tx-1", mode=ORCHESTRATION)
    await step(harness, "tx-1", lambda s: s.payment_captured("pay-1", 1000))
    assert reads == []  # it starts from the one it committed with the sale's version 1

    # Another process takes the next step: this one's document is one version behind.
    mine = saga_index._written[harness.store]
    saga_index._written[harness.store] = saga_index._Written()
    await step(harness, "tx-1", lambda s: s.inventory_reserved("res-1"))
    assert reads == ["tx-1"]  # that process had none: it read it
    saga_index._written[harness.store] = mine
    await step(harness, "tx-1", lambda s: s.inventory_unavailable())
    assert reads == ["tx-1", "tx-1"]  # this one's is stale: read, not trusted
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["step"], doc["version"]) == (
        "CANCELLING", "compensation", 4)
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert entry[1]["step"] == "compensation"


async def test_a_step_that_does_not_commit_leaves_the_index_as_it_was(harness: Harness) -> None:
    await start_sale(harness, "tx-1")
    with pytest.raises(RuntimeError):
        async with harness.store.transaction() as uow:
            sale = await sagas.sales.get(uow, "tx-1")
            sale.payment_captured("pay-1", 1000)
            await saga_index.save(uow, sale, DEADLINES)
            raise RuntimeError("the step's commit fails")
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["step"]) == ("PENDING", "order")
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert entry[1]["step"] == "order"


async def test_a_save_that_changes_nothing_writes_nothing(harness: Harness) -> None:
    await start_sale(harness, "tx-1")
    await step(harness, "tx-1", lambda s: s.payment_captured("pay-1", 1000))
    before = await harness.store.get_document(sagas.SAGAS, "tx-1")
    async with harness.store.transaction() as uow:
        sale = await sagas.sales.get(uow, "tx-1")
        sale.payment_captured("pay-1", 1000)  # a redelivered PaymentProcessed
        assert await saga_index.save(uow, sale, DEADLINES) == []
        assert uow.operations == []
    assert await harness.store.get_document(sagas.SAGAS, "tx-1") == before


async def test_the_loop_aborts_only_sagas_past_their_steps_deadline(harness: Harness) -> None:
    await start_sale(harness, "tx-1")
    await start_sale(harness, "tx-2")
    created = (await harness.store.read_all(after=0, limit=1))[0].occurred_at

    assert await sagas.abort_overdue(harness.store, created + timedelta(seconds=119),
                                     DEADLINES) == 0
    assert await sagas.abort_overdue(harness.store, created + timedelta(seconds=121),
                                     DEADLINES) == 2
    aborted = await harness.emitted(SagaAborted)
    assert sorted((a.transaction_id, a.step, a.reason) for a in aborted) == [
        ("tx-1", "order", "deadline:order"), ("tx-2", "order", "deadline:order"),
    ]
    # The abort saved the sagas with their index: they wait for the compensation now.
    entries = await harness.store.find_documents(sagas.DEADLINES)
    assert [(e["step"], e["attempt"]) for _, e in entries] == [("compensation", 0)] * 2
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None
    assert (doc["status"], doc["step"], doc["reason"]) == (
        "CANCELLING", "compensation", "deadline:order"
    )


async def test_a_deadline_entry_of_a_saga_that_moved_on_changes_nothing_and_goes(
    harness: Harness,
) -> None:
    policy = Deadlines(order_s=60, compensation_s=600)
    await start_sale(harness, "tx-1", policy)
    (stale,) = await harness.store.find_documents(sagas.DEADLINES)
    await step(harness, "tx-1", lambda s: s.inventory_unavailable(), policy)
    # An entry read just before the shortage landed (another process's sweep, say): the
    # sale, which waits for its refund now, refuses the abort and the entry is dropped.
    async with harness.store.transaction() as uow:
        uow.put_document(sagas.DEADLINES, stale[0], stale[1])
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert await sagas.abort_overdue(harness.store, later, policy) == 0
    assert await harness.emitted(SagaAborted) == []
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert entry[1]["step"] == "compensation"
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["step"]) == ("CANCELLING", "compensation")


async def test_an_index_left_behind_by_the_old_consumer_is_brought_in_step_by_the_loop(
    harness: Harness,
) -> None:
    sale = await start_sale(harness, "tx-1")
    # Paid, then given up 5 s later (a shortage), both stored without their index (as the
    # consumer that kept it before issue 11 may have left them): the index says "order".
    created = (await harness.store.read_all(after=0, limit=1))[0].occurred_at
    paid_at, failed_at = created + timedelta(seconds=1), created + timedelta(seconds=6)
    await harness.store.append(sagas.sales.stream(sale.id), [
        NewEvent("PaymentRecorded", SCHEMAS.dump(PaymentRecorded(sale.id, "pay-1", 1000)),
                 occurred_at=paid_at),
        NewEvent("CompensationStarted", SCHEMAS.dump(CompensationStarted(
            sale.id, "inventory_unavailable", needs_refund=True, needs_release=False)),
                 occurred_at=failed_at),
    ])
    # The order's deadline passes: the sale refuses, and the loop re-indexes it.
    assert await sagas.abort_overdue(harness.store, created + timedelta(seconds=120),
                                     DEADLINES) == 0
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    # The compensation's 30 s run from its start, not from the payment before it.
    assert (entry[1]["step"], due_of(entry[0])) == ("compensation",
                                                    failed_at + timedelta(seconds=30))
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["version"]) == ("CANCELLING", 3)
    assert await sagas.abort_overdue(harness.store, failed_at + timedelta(seconds=30),
                                     DEADLINES) == 1


async def test_several_steps_in_one_save_date_the_deadline_from_the_last_one(
    harness: Harness,
) -> None:
    await start_sale(harness, "tx-1")
    # An operator gives the sale up: SagaAborted, then CompensationStarted, in one save.
    await step(harness, "tx-1", lambda s: s.abort("forced"))
    started = (await harness.store.read_all(after=0, limit=10))[-1]
    assert started.type == "CompensationStarted"
    (entry,) = await harness.store.find_documents(sagas.DEADLINES)
    assert (entry[1]["step"], due_of(entry[0])) == (
        "compensation", started.occurred_at + timedelta(seconds=30))
    assert await sagas.abort_overdue(
        harness.store, started.occurred_at + timedelta(seconds=29), DEADLINES) == 0
    assert await sagas.abort_overdue(
        harness.store, started.occurred_at + timedelta(seconds=30), DEADLINES) == 1


async def test_a_sale_begun_before_the_index_existed_keeps_its_creation_time(
    harness: Harness,
) -> None:
    sale = new_sale()
    created_at = T0
    await harness.store.append(sagas.sales.stream(sale.id), [NewEvent(
        "TransactionCreated", SCHEMAS.dump(created_event()), occurred_at=created_at)])
    await step(harness, "tx-1", lambda s: s.payment_captured("pay-1", 1000))
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None
    assert (doc["created_at"], doc["status"]) == (created_at.isoformat(), "PAYMENT_PROCESSED")


# -- payment's side ------------------------------------------------------------------------


def created_event(ident: str = "tx-1") -> TransactionCreated:
    return TransactionCreated(ident, "s-1", "c", (SaleLine("p-1", 2, 500),), 1000, "CAD", "VISA")


def aborted_event(ident: str = "tx-1", step: str = "payment") -> SagaAborted:
    return SagaAborted(ident, step, f"deadline:{step}", "s-1", 1000, "CAD")


async def test_an_unreachable_bank_fails_the_payment_once_its_deadline_has_passed(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    bank.reachable = False
    (created,) = await harness.given("transaction", "tx-1", created_event())
    now = [created.occurred_at + timedelta(seconds=10)]
    deadline = ChargeDeadline(60, clock=lambda: now[0])

    async def attempt() -> None:
        async with harness.store.transaction() as uow:
            await charge(bank, created, uow, deadline)

    with pytest.raises(Unavailable):  # before the deadline: retried by the bus
        await attempt()
    assert await harness.store.get_document(UNREACHED, "tx-1") is not None
    now[0] = created.occurred_at + timedelta(seconds=60)
    await attempt()
    (failed,) = await harness.emitted(PaymentFailed)
    assert failed.reason == "bank_unavailable"
    assert bank.charges == []


async def test_an_aborted_sale_never_charged_is_voided_and_a_late_charge_takes_nothing(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    deadline = ChargeDeadline(60)
    consumer = handlers(bank, deadline)
    (aborted,) = await harness.given("transaction", "tx-1", aborted_event())
    assert (await harness.deliver("payment", consumer, aborted)).outcome is Outcome.HANDLED
    (created,) = await harness.given("transaction", "tx-1", created_event())
    assert (await harness.deliver("payment", consumer, created)).outcome is Outcome.HANDLED
    (failed,) = await harness.emitted(PaymentFailed)
    assert failed.reason == "deadline:payment"
    assert bank.charges == []


async def test_an_aborted_sale_whose_bank_was_unreachable_fails_as_bank_unavailable(
    harness: Harness,
) -> None:
    async with harness.store.transaction() as uow:
        uow.put_document(UNREACHED, "tx-1", {"at": T0.isoformat(), "error": "down"})
    consumer = abort_handlers(BankSimulator(latency_s=0), ChargeDeadline(60), refund_key)
    (aborted,) = await harness.given("transaction", "tx-1", aborted_event())
    await harness.deliver("payment", consumer, aborted)
    (failed,) = await harness.emitted(PaymentFailed)
    assert failed.reason == "bank_unavailable"


async def test_an_aborted_sale_that_was_charged_is_refunded_once(harness: Harness) -> None:
    bank = BankSimulator(latency_s=0)
    consumer = handlers(bank, ChargeDeadline(60))
    (created,) = await harness.given("transaction", "tx-1", created_event())
    await harness.deliver("payment", consumer, created)
    (aborted,) = await harness.given("transaction", "tx-1", aborted_event(step="fulfilment"))
    for _ in range(2):
        await harness.deliver("payment", consumer, aborted)
    (refunded,) = await harness.emitted(PaymentRefunded)
    assert refunded.reason == "deadline:fulfilment"
    assert bank.captured_total == 0


async def test_a_charge_whose_capture_lost_to_a_void_gives_the_money_back(
    harness: Harness,
) -> None:
    bank = BankSimulator(latency_s=0)
    deadline = ChargeDeadline(60)
    consumer = handlers(bank, deadline)
    (created,) = await harness.given("transaction", "tx-1", created_event())
    # The bank approves, then a void commits before the capture does (a version race):
    # the dispatcher redoes the charge on fresh state, which finds the voided payment.
    with pytest.raises(RuntimeError):
        async with harness.store.transaction() as uow:
            await charge(bank, created, uow, deadline)
            raise RuntimeError("the capture lost the race")
    (aborted,) = await harness.given("transaction", "tx-1", aborted_event())
    deadline_free = ChargeDeadline(60)  # the void was handled by another consumer instance
    await harness.deliver("payment", handlers(bank, deadline_free), aborted)
    await harness.deliver("payment", consumer, created)
    async with harness.store.transaction() as uow:
        payment = await payments.get(uow, "tx-1")
    assert payment.status is PaymentStatus.FAILED
    assert bank.captured_total == 0 and len(bank.refunds) == 1


async def test_a_compensation_not_confirmed_in_time_is_retried_then_reported_stuck(
    harness: Harness,
) -> None:
    policy = Deadlines(compensation_s=10, retry_multiplier=2, retry_attempts=2)
    await start_sale(harness, "tx-1", policy)

    def unavailable(sale: Transaction) -> None:
        sale.payment_captured("pay-1", 1000)
        sale.inventory_unavailable()  # the refund it needs never comes

    await step(harness, "tx-1", unavailable, policy)

    async def sweep(at: datetime) -> int:
        return await sagas.abort_overdue(harness.store, at, policy)

    started = (await harness.emitted(CompensationStarted))[0]
    t0 = (await harness.store.read_all(after=0, limit=1000))[-1].occurred_at
    assert started.reason == "inventory_unavailable"
    assert await sweep(t0 + timedelta(seconds=9)) == 0
    assert await sweep(t0 + timedelta(seconds=11)) == 1  # retry 1 after 10 s
    retry_1 = (await harness.emitted(SagaAborted))[-1]
    assert (retry_1.step, retry_1.attempt) == ("compensation", 1)
    t1 = (await harness.store.read_all(after=0, limit=1000))[-1].occurred_at
    assert await sweep(t1 + timedelta(seconds=19)) == 0  # retry 2 waits twice as long
    assert await sweep(t1 + timedelta(seconds=21)) == 1
    t2 = (await harness.store.read_all(after=0, limit=1000))[-1].occurred_at
    assert await sweep(t2 + timedelta(seconds=41)) == 1  # retries spent: reported stuck
    (stalled,) = await harness.emitted(CompensationStalled)
    assert stalled.attempts == 2
    assert await sweep(t2 + timedelta(days=1)) == 0  # stuck sagas leave the deadline index
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["stuck"], doc["attempts"], doc["due_key"]) == (True, 2, None)
    assert await harness.store.find_documents(STUCK) != []
    # An operator forces it: asked again, no longer stuck, and the refund then ends it.
    _, retried = await sagas.force(harness.store, "tx-1", policy)
    assert retried
    assert await harness.store.find_documents(STUCK) == []
    await step(harness, "tx-1", lambda s: s.payment_refunded(1000), policy)
    assert await harness.store.find_documents(sagas.DEADLINES) == []
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["stuck"]) == ("CANCELLED", False)


async def test_retried_compensations_refund_and_release_once(harness: Harness) -> None:
    bank = BankSimulator(latency_s=0)
    pay = handlers(bank, ChargeDeadline(60))
    stock = inventory_handlers(1800)
    for catalog in (StoreRegistered("s-1", "S", "D", "A"), ProductAdded("p-1", "SKU", "P", 500,
                                                                          "CAD")):
        (event,) = await harness.given("store", type(catalog).__name__, catalog)
        await harness.deliver("inventory", stock, event)
    await restock(harness.store, "s-1", "p-1", 5)
    (created,) = await harness.given("transaction", "tx-1", created_event())
    await harness.deliver("payment", pay, created)
    (processed,) = await harness.emitted(PaymentProcessed)
    (paid,) = await harness.given("payment", "tx-1-copy", processed)
    await harness.deliver("inventory", stock, paid)

    first = aborted_event(step="fulfilment")
    retries = [SagaAborted("tx-1", "compensation", "deadline:fulfilment", "s-1", 1000, "CAD",
                           attempt=n) for n in (1, 2)]
    for payload in (first, *retries):
        (event,) = await harness.given("transaction", "tx-1", payload)
        for consumer, table in (("payment", pay), ("inventory", stock)):
            assert (await harness.deliver(consumer, table, event)).outcome is Outcome.HANDLED
    assert len(await harness.emitted(PaymentRefunded)) == 1 and len(bank.refunds) == 1
    assert len(await harness.emitted(InventoryReleased)) == 1
    assert bank.captured_total == 0
    assert StockLine("p-1", 2) in processed.lines


async def test_a_stuck_saga_that_ends_after_all_is_no_longer_reported_stuck(
    harness: Harness,
) -> None:
    policy = Deadlines(compensation_s=10, retry_attempts=0)
    await start_sale(harness, "tx-1", policy)

    def unavailable(sale: Transaction) -> None:
        sale.payment_captured("pay-1", 1000)
        sale.inventory_unavailable()

    await step(harness, "tx-1", unavailable, policy)
    assert await sagas.abort_overdue(harness.store, utcnow() + timedelta(days=1), policy) == 1
    assert [key for key, _ in await harness.store.find_documents(STUCK)] == ["tx-1"]
    # Its refund's dead letter was requeued.
    await step(harness, "tx-1", lambda s: s.payment_refunded(1000), policy)
    assert await harness.store.find_documents(STUCK) == []
    doc = await harness.store.get_document(sagas.SAGAS, "tx-1")
    assert doc is not None and (doc["status"], doc["stuck"]) == ("CANCELLED", False)
