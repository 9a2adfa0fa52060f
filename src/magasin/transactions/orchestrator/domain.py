"""The saga orchestrator's state machine (seed 6.3.1 happy path, 6.3.2 compensation).

Pure domain: an event-sourced process manager per sale. Each reply a service sends (the
usual domain event, correlated by transaction id) is a `reply_*` call; the orchestrator
answers with the next command (recorded as `CommandIssued`, so its decisions are events in
its own stream and survive a restart) or ends the saga. Compensation is explicit and
sequential: refund, then release, then cancel. Replies that do not match the pending
command (late, duplicated, out of order) change nothing.
"""

from __future__ import annotations

from enum import StrEnum

from magasin.shared.aggregate import Aggregate
from magasin.shared.events import (
    CommandIssued,
    CompensationDecided,
    OrchestrationEnded,
    OrchestrationStarted,
    ReplyAccepted,
)


class Command(StrEnum):
    CHARGE_PAYMENT = "ChargePayment"
    RESERVE_STOCK = "ReserveStock"
    PREPARE_ORDER = "PrepareOrder"
    REFUND_PAYMENT = "RefundPayment"
    RELEASE_STOCK = "ReleaseStock"
    VOID_PAYMENT = "VoidPayment"


REPLIES: dict[Command, tuple[str, ...]] = {
    Command.CHARGE_PAYMENT: ("PaymentProcessed", "PaymentFailed"),
    Command.RESERVE_STOCK: ("InventoryReserved", "InventoryUnavailable"),
    Command.PREPARE_ORDER: ("OrderFulfilled", "OrderFulfillmentFailed"),
    Command.REFUND_PAYMENT: ("PaymentRefunded",),
    Command.RELEASE_STOCK: ("InventoryReleased",),
    Command.VOID_PAYMENT: ("PaymentRefunded", "PaymentFailed"),
}
"""The replies that answer each command (the events the services publish anyway)."""

STEPS = {
    Command.CHARGE_PAYMENT: "payment",
    Command.RESERVE_STOCK: "reservation",
    Command.PREPARE_ORDER: "fulfilment",
}
"""Forward steps (each has a deadline, like the choreographed saga's)."""


class Outcome(StrEnum):
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


class Orchestration(Aggregate):
    stream_type = "saga_orchestration"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.total = 0
        self.currency = ""
        self.pending_command: Command | None = None
        self.sequence = 0
        self.payment_id: str | None = None
        self.reservation_id: str | None = None
        self.order_id: str | None = None
        self.reason: str | None = None
        self.to_refund = False
        self.to_release = False
        self.outcome: Outcome | None = None

    # -- decisions ------------------------------------------------------------------------

    @classmethod
    def start(cls, transaction_id: str, total: int, currency: str) -> Orchestration:
        saga = cls(transaction_id)
        saga._record(OrchestrationStarted(transaction_id, total, currency))
        saga._issue(Command.CHARGE_PAYMENT)
        return saga

    def reply(self, reply: str, reference: str | None = None, reason: str | None = None) -> bool:
        """Advance on a service's reply; False (and nothing recorded) when it answers no
        pending command: a duplicate, a late reply, or one meant for the other mode."""
        command = self.pending_command
        if command is None or reply not in REPLIES[command]:
            return False
        self._record(ReplyAccepted(self.id, reply, reference))
        match reply:
            case "PaymentProcessed":
                self._issue(Command.RESERVE_STOCK)
            case "InventoryReserved":
                self._issue(Command.PREPARE_ORDER)
            case "OrderFulfilled":
                self._record(OrchestrationEnded(self.id, Outcome.COMPLETED))
            case "PaymentFailed":
                # Nothing was taken (a charge refused, or voided before it was taken): the
                # payment's reason is the better account of what happened.
                self._compensate(reason or self.reason or "payment_failed", False, False)
            case "InventoryUnavailable":
                self._compensate("inventory_unavailable", True, False)
            case "OrderFulfillmentFailed":
                self._compensate(f"fulfillment_failed:{reason}", True, True)
            case "PaymentRefunded":
                self._next_compensation()
            case "InventoryReleased":
                self._next_compensation()
        return True

    def abort(self, reason: str, step: str | None = None) -> bool:
        """The current forward step passed its deadline (or an admin gave up): compensate
        what may have happened. At the payment step a charge may be in flight: void it."""
        current = self.step
        if current is None or (step is not None and step != current):
            return False
        if self.pending_command is Command.CHARGE_PAYMENT:
            self._record(CompensationDecided(self.id, reason, False, False))
            self._issue(Command.VOID_PAYMENT)
        else:
            self._compensate(reason, True, current == "fulfilment")
        return True

    def _compensate(self, reason: str, refund: bool, release: bool) -> None:
        self._record(CompensationDecided(self.id, reason, refund, release))
        self._next_compensation()

    def _next_compensation(self) -> None:
        if self.to_refund:
            self._issue(Command.REFUND_PAYMENT)
        elif self.to_release:
            self._issue(Command.RELEASE_STOCK)
        else:
            self._record(OrchestrationEnded(self.id, Outcome.CANCELLED, self.reason))

    def _issue(self, command: Command) -> None:
        self._record(CommandIssued(self.id, command.value, self.sequence + 1))

    # -- state ----------------------------------------------------------------------------

    @property
    def step(self) -> str | None:
        """The forward step waited for (`payment`, `reservation`, `fulfilment`), or None."""
        return STEPS.get(self.pending_command) if self.pending_command else None

    @property
    def command_id(self) -> str | None:
        """Id of the pending command (its inbox key at the receiving service)."""
        return f"{self.id}:{self.sequence}" if self.pending_command else None

    def apply(self, event: object) -> None:
        match event:
            case OrchestrationStarted():
                self.total, self.currency = event.total, event.currency
            case CommandIssued():
                self.pending_command = Command(event.command)
                self.sequence = event.sequence
            case ReplyAccepted():
                self.pending_command = None
                if event.reply == "PaymentProcessed":
                    self.payment_id = event.reference
                elif event.reply == "InventoryReserved":
                    self.reservation_id = event.reference
                elif event.reply == "OrderFulfilled":
                    self.order_id = event.reference
                elif event.reply == "PaymentRefunded":
                    self.to_refund = False
                elif event.reply == "InventoryReleased":
                    self.to_release = False
            case CompensationDecided():
                self.pending_command = None
                self.reason = event.reason
                self.to_refund, self.to_release = event.refund, event.release
            case OrchestrationEnded():
                self.pending_command = None
                self.outcome = Outcome(event.outcome)
            case _:
                raise TypeError(f"an orchestration does not record {type(event).__name__}")
