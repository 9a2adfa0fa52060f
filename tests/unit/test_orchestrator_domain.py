"""The saga orchestrator's state machine, and both coordination modes compared on one sale."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from magasin.eventstore.repository import Repository
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.shared.events import CommandIssued, CompensationStarted, SagaAborted, SaleLine
from magasin.transactions.domain import Status, Transaction
from magasin.transactions.orchestrator.domain import (
    Command,
    Orchestration,
    Outcome,
)
from tests.unit.conftest import Harness

LINES = (SaleLine("p1", 2, 250),)


def issued(saga: Orchestration) -> list[str]:
    return [e.command for e in saga.pending if isinstance(e, CommandIssued)]


def test_happy_path_sends_charge_reserve_prepare_then_completes() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    assert (saga.pending_command, saga.step, saga.command_id) == (
        Command.CHARGE_PAYMENT, "payment", "t1:1")
    assert saga.reply("PaymentProcessed", "pay-1")
    assert (saga.pending_command, saga.step) == (Command.RESERVE_STOCK, "reservation")
    assert saga.reply("InventoryReserved", "res-1")
    assert (saga.pending_command, saga.step) == (Command.PREPARE_ORDER, "fulfilment")
    assert saga.reply("OrderFulfilled", "ord-1")
    assert saga.outcome is Outcome.COMPLETED and saga.pending_command is None
    assert (saga.payment_id, saga.reservation_id, saga.order_id) == ("pay-1", "res-1", "ord-1")
    assert issued(saga) == ["ChargePayment", "ReserveStock", "PrepareOrder"]


def test_declined_payment_cancels_without_compensation() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.reply("PaymentFailed", reason="declined")
    assert (saga.outcome, saga.reason) == (Outcome.CANCELLED, "declined")
    assert issued(saga) == ["ChargePayment"]


def test_out_of_stock_refunds_then_cancels() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.reply("PaymentProcessed", "pay-1")
    saga.reply("InventoryUnavailable")
    assert saga.pending_command is Command.REFUND_PAYMENT and saga.step is None
    assert saga.outcome is None
    saga.reply("PaymentRefunded")
    assert (saga.outcome, saga.reason) == (Outcome.CANCELLED, "inventory_unavailable")


def test_fulfilment_failure_compensates_refund_then_release_then_cancel() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.reply("PaymentProcessed", "pay-1")
    saga.reply("InventoryReserved", "res-1")
    saga.reply("OrderFulfillmentFailed", reason="printer_on_fire")
    assert saga.pending_command is Command.REFUND_PAYMENT
    assert not saga.reply("InventoryReleased"), "release is not asked before the refund"
    saga.reply("PaymentRefunded")
    assert saga.pending_command is Command.RELEASE_STOCK
    saga.reply("InventoryReleased")
    assert (saga.outcome, saga.reason) == (Outcome.CANCELLED, "fulfillment_failed:printer_on_fire")
    assert issued(saga)[-2:] == ["RefundPayment", "ReleaseStock"]


def test_duplicate_late_or_foreign_replies_change_nothing() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    assert saga.reply("PaymentProcessed", "pay-1")
    before = len(saga.pending)
    assert not saga.reply("PaymentProcessed", "pay-1")
    assert not saga.reply("OrderFulfilled", "ord-1")
    assert len(saga.pending) == before and saga.pending_command is Command.RESERVE_STOCK


def test_deadline_at_payment_voids_and_a_late_charge_is_given_back() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    assert not saga.abort("deadline:reservation", "reservation")
    assert saga.abort("deadline:payment", "payment")
    assert saga.pending_command is Command.VOID_PAYMENT and saga.command_id == "t1:2"
    saga.reply("PaymentRefunded")
    assert (saga.outcome, saga.reason) == (Outcome.CANCELLED, "deadline:payment")


def test_deadline_at_payment_then_refused_charge_keeps_the_payment_reason() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.abort("deadline:payment")
    saga.reply("PaymentFailed", reason="bank_unavailable")
    assert (saga.outcome, saga.reason) == (Outcome.CANCELLED, "bank_unavailable")


def test_deadline_at_fulfilment_refunds_and_releases_and_nothing_to_abort_after() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.reply("PaymentProcessed", "pay-1")
    saga.reply("InventoryReserved", "res-1")
    assert saga.abort("deadline:fulfilment")
    assert not saga.abort("again"), "compensating: no forward step to abort"
    saga.reply("PaymentRefunded")
    saga.reply("InventoryReleased")
    assert saga.outcome is Outcome.CANCELLED


def test_decisions_replay_to_the_same_state() -> None:
    saga = Orchestration.start("t1", 500, "EUR")
    saga.reply("PaymentProcessed", "pay-1")
    saga.reply("InventoryUnavailable")
    replayed = Orchestration("t1")
    replayed.replay_more(saga.pending, len(saga.pending))
    assert replayed.state() == {**saga.state(), "version": len(saga.pending)}


# -- both modes on the same sale, with the same failures injected ---------------------------


@dataclass
class Faults:
    declined: bool
    out_of_stock: bool
    fulfilment_failure: str | None
    silent_step: str | None
    """A service that never answers (its message is lost): the step's deadline fires."""


@dataclass
class World:
    """What the services did, as a customer and the books would see it."""

    faults: Faults
    charged: int = 0
    held: bool = False
    order: bool = False
    log: list[str] = field(default_factory=list)

    def charge(self, total: int) -> tuple[str, str | None, str | None]:
        if self.faults.silent_step == "payment":
            return ("", None, None)
        if self.faults.declined:
            return ("PaymentFailed", None, "declined")
        self.charged = total
        return ("PaymentProcessed", "pay-1", None)

    def reserve(self) -> tuple[str, str | None, str | None]:
        if self.faults.silent_step == "reservation":
            return ("", None, None)
        if self.faults.out_of_stock:
            return ("InventoryUnavailable", None, None)
        self.held = True
        return ("InventoryReserved", "res-1", None)

    def prepare(self) -> tuple[str, str | None, str | None]:
        if self.faults.silent_step == "fulfilment":
            return ("", None, None)
        if self.faults.fulfilment_failure:
            return ("OrderFulfillmentFailed", None, self.faults.fulfilment_failure)
        self.order = True
        return ("OrderFulfilled", "ord-1", None)

    def refund(self) -> tuple[str, str | None, str | None]:
        self.charged = 0
        return ("PaymentRefunded", None, None)

    def release(self) -> tuple[str, str | None, str | None]:
        self.held = False
        return ("InventoryReleased", None, None)

    def books(self) -> tuple[int, bool, bool]:
        return (self.charged, self.held, self.order)


def feed(sale: Transaction, reply: str, ref: str | None, reason: str | None) -> None:
    """The transaction aggregate's reactions (the choreographed saga's steps)."""
    match reply:
        case "PaymentProcessed":
            sale.payment_captured(ref or "", sale.total)
        case "PaymentFailed":
            sale.payment_failed(reason or "")
        case "InventoryReserved":
            sale.inventory_reserved(ref or "")
        case "InventoryUnavailable":
            sale.inventory_unavailable()
        case "OrderFulfilled":
            # As the store passes them on in a choreographed chain (an orchestrated sale
            # recorded both already).
            sale.order_fulfilled(ref or "", "pay-1", "res-1")
        case "OrderFulfillmentFailed":
            sale.fulfillment_failed(reason or "")
        case "PaymentRefunded":
            sale.payment_refunded(sale.total)
        case "InventoryReleased":
            sale.inventory_released()


def choreographed(faults: Faults) -> tuple[tuple[str, str | None], tuple[int, bool, bool]]:
    world = World(faults)
    sale = Transaction.create("t1", store_id="s1", customer_id="c1", lines=LINES,
                              currency="EUR", payment_method="card")
    # The services pass the sale on among themselves (payment, inventory, store): the
    # transaction hears the failures and the prepared order, or gives up at its deadline.
    for act in (lambda: world.charge(sale.total), world.reserve, world.prepare):
        reply, ref, reason = act()
        if not reply:
            assert sale.step == "order"
            sale.abort("deadline:order", "order")
            break
        if reply not in ("PaymentProcessed", "InventoryReserved"):
            feed(sale, reply, ref, reason)
            break
    seen = 0
    while seen < len(sale.pending):
        fresh, seen = sale.pending[seen:], len(sale.pending)
        for event in fresh:
            # The payment and inventory services react to the compensation: a given-up sale
            # never charged is voided, one never reserved has its reservation voided.
            if isinstance(event, SagaAborted) and not world.charged:
                sale.payment_failed(event.reason)
            if isinstance(event, SagaAborted) and not world.held:
                sale.nothing_reserved()
            if isinstance(event, CompensationStarted):
                if event.needs_refund and world.charged:
                    feed(sale, *world.refund())
                if event.needs_release and world.held:
                    feed(sale, *world.release())
    assert sale.status.terminal
    return (sale.status.value, sale.failure), world.books()


def orchestrated(faults: Faults) -> tuple[tuple[str, str | None], tuple[int, bool, bool]]:
    world = World(faults)
    sale = Transaction.create("t1", store_id="s1", customer_id="c1", lines=LINES,
                              currency="EUR", payment_method="card", saga_mode="orchestration")
    saga = Orchestration.start("t1", sale.total, "EUR")
    act = {
        Command.CHARGE_PAYMENT: lambda: world.charge(sale.total),
        Command.RESERVE_STOCK: world.reserve, Command.PREPARE_ORDER: world.prepare,
        Command.REFUND_PAYMENT: world.refund, Command.RELEASE_STOCK: world.release,
    }
    for _ in range(20):
        command = saga.pending_command
        if command is None:
            break
        reply, ref, reason = act[command]()
        if not reply:
            # The sale records the abort too (the sagas API and the books read the sale).
            step = saga.step
            saga.abort(f"deadline:{step}", step)
            sale.abort(f"deadline:{step}", step)
            continue
        saga.reply(reply, ref, reason)
        feed(sale, reply, ref, reason)
    assert saga.outcome is not None
    assert (sale.status.value, sale.failure) == (saga.outcome.value, saga.reason), (
        "the sale records what the orchestrator decided")
    return (saga.outcome.value, saga.reason), world.books()


faults = st.builds(
    Faults,
    declined=st.booleans(),
    out_of_stock=st.booleans(),
    fulfilment_failure=st.sampled_from([None, "no_staff", "store_closed"]),
    silent_step=st.sampled_from([None, "reservation", "fulfilment"]),
)


def _deadline_as_one(
    result: tuple[tuple[str, str | None], tuple[int, bool, bool]],
) -> tuple[tuple[str, str | None], tuple[int, bool, bool]]:
    (status, reason), books = result
    if reason is not None and reason.startswith("deadline:"):
        reason = "deadline"
    return (status, reason), books


@given(faults)
def test_both_modes_reach_the_same_terminal_state_and_books(injected: Faults) -> None:
    # A choreographed sale has one deadline (`order`), an orchestrated one one per step:
    # the same silence ends both, under their own step's name.
    assert _deadline_as_one(choreographed(injected)) == _deadline_as_one(orchestrated(injected))


@given(faults)
def test_a_cancelled_sale_keeps_no_money_and_no_stock(injected: Faults) -> None:
    (status, _), books = orchestrated(injected)
    if status == Status.CANCELLED:
        assert books == (0, False, False)
    else:
        assert books == (500, True, True)


async def test_decisions_survive_a_restart_through_the_event_store(harness: Harness) -> None:
    """The orchestrator's stream is stored like any aggregate's: a fresh process (no cache)
    reloads the saga at its pending command, and its decisions are in the shared log."""
    sagas = Repository(Orchestration)
    async with harness.store.transaction() as uow:
        saga = Orchestration.start("t1", 500, "EUR")
        saga.reply("PaymentProcessed", "pay-1")
        saga.reply("InventoryUnavailable")
        sagas.save(uow, saga)
    async with SqliteEventStore(harness.store.path) as reopened:
        async with reopened.transaction() as uow:
            loaded = await sagas.get(uow, "t1")
        assert (loaded.pending_command, loaded.command_id, loaded.reason) == (
            Command.REFUND_PAYMENT, "t1:3", "inventory_unavailable")
        types = [e.type for e in await reopened.read_all(after=0, limit=100)]
        assert types == ["OrchestrationStarted", "CommandIssued", "ReplyAccepted",
                         "CommandIssued", "ReplyAccepted", "CompensationDecided",
                         "CommandIssued"]
