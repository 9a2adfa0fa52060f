"""The Transaction aggregate: a sale and the saga state it reaches from other services' events.

The saga is choreographed: this aggregate does not command anyone, it records what the
other services report and decides when the sale is COMPLETED, or CANCELLED once every
compensation it needs (refund, stock release) is confirmed. It records facts rather than
walking a strict sequence, so events arriving out of order or twice change nothing wrong.

As in the seed's runtime view (6.1.1), a choreographed sale hears only the end of its happy
path, `OrderFulfilled`, which carries the payment and the reservation it followed: the
payment and the reservation are recorded with the completion, and the sale waits for one
step, `order`, with one deadline (payment, reservation and preparation happen between the
other services). It hears every failure. An orchestrated sale records each step as its
orchestrator's replies come (a consumer meant for orchestrated sales only), and has a
deadline per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    CompensationStalled,
    CompensationStarted,
    FulfilmentRecorded,
    FulfilmentRefused,
    PaymentRecorded,
    RefundRecorded,
    ReleaseRecorded,
    ReservationRecorded,
    SagaAborted,
    SaleLine,
    TransactionCancelled,
    TransactionCompleted,
    TransactionCreated,
)
from magasin.transactions.orchestrator.routing import Mode

MAX_LINES = 100
MAX_QUANTITY = 1000


class Status(StrEnum):
    PENDING = "PENDING"
    PAYMENT_PROCESSED = "PAYMENT_PROCESSED"
    INVENTORY_RESERVED = "INVENTORY_RESERVED"
    FULFILLED = "FULFILLED"
    COMPLETED = "COMPLETED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (Status.COMPLETED, Status.CANCELLED)


HAPPY_PATH = (
    Status.PENDING, Status.PAYMENT_PROCESSED, Status.INVENTORY_RESERVED, Status.FULFILLED,
    Status.COMPLETED,
)


COMPENSATION = "compensation"
"""What a CANCELLING saga waits for: its refund and release to be confirmed."""

STEPS = {
    Status.PENDING: "payment",
    Status.PAYMENT_PROCESSED: "reservation",
    Status.INVENTORY_RESERVED: "fulfilment",
}
"""The step an orchestrated saga in each waiting status is waiting for (each one has a
deadline)."""

ORDER = "order"
"""The one step a choreographed saga waits for before it ends: its order prepared, after its
payment and its reservation (`OrderFulfilled` reports all three). Given up, it asks for a
refund and a release, and waits for both to be confirmed (a release of nothing held is
confirmed by `ReservationVoided` or `InventoryUnavailable`)."""


class Transaction(Aggregate):
    stream_type = "transaction"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.store_id = ""
        self.customer_id = ""
        self.lines: tuple[SaleLine, ...] = ()
        self.total = 0
        self.currency = ""
        self.payment_method = ""
        self.callback_url: str | None = None
        self.saga_mode: str = Mode.CHOREOGRAPHY
        self.payment_id: str | None = None
        self.reservation_id: str | None = None
        self.order_id: str | None = None
        self.refunded = False
        self.released = False
        self.failure: str | None = None
        self.needs_refund = False
        self.needs_release = False
        self.completed = False
        self.cancelled = False
        self.aborted_step: str | None = None
        self.compensation_attempts = 0
        """Retries of the compensation (SagaAborted at step `compensation`)."""
        self.stalled = False
        """The compensation's retries are spent and it is still not confirmed."""
        self.fulfilment_refused = False
        self.passed: list[Status] = []
        """Statuses entered by events recorded since load, in order (FULFILLED and then
        COMPLETED can come from one step; a client following the sale sees both)."""

    def _record(self, event: object) -> None:
        before = self.status
        super()._record(event)
        after = self.status
        if after == before:
            return
        if before in HAPPY_PATH and after in HAPPY_PATH:
            # Facts can arrive out of order (a reservation reported before the payment):
            # each step of the happy path needs the one before, so those happened too.
            self.passed += HAPPY_PATH[HAPPY_PATH.index(before) + 1:HAPPY_PATH.index(after)]
        self.passed.append(after)

    # -- commands -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        ident: str,
        *,
        store_id: str,
        customer_id: str,
        lines: Sequence[SaleLine],
        currency: str,
        payment_method: str,
        callback_url: str | None = None,
        saga_mode: str = Mode.CHOREOGRAPHY,
    ) -> Transaction:
        if not lines:
            raise InvalidInput("a transaction needs at least one line")
        if len(lines) > MAX_LINES:
            raise InvalidInput(f"a transaction has at most {MAX_LINES} lines")
        for line in lines:
            if not 1 <= line.quantity <= MAX_QUANTITY:
                raise InvalidInput(
                    f"quantity of {line.product_id} must be between 1 and {MAX_QUANTITY}"
                )
            if line.unit_price <= 0:
                raise BusinessRuleViolation(f"product {line.product_id} has no valid price")
        if not customer_id.strip():
            raise InvalidInput("customer_id must not be empty")
        if not payment_method.strip():
            raise InvalidInput("payment_method must not be empty")
        sale = cls(ident)
        sale._record(
            TransactionCreated(
                transaction_id=ident, store_id=store_id, customer_id=customer_id.strip(),
                lines=tuple(lines), total=sum(li.quantity * li.unit_price for li in lines),
                currency=currency, payment_method=payment_method.strip(),
                callback_url=callback_url, saga_mode=saga_mode,
            )
        )
        sale.passed.append(Status.PENDING)
        return sale

    def payment_captured(self, payment_id: str, amount: int) -> None:
        if self.payment_id is None and not self.status.terminal:
            self._record(PaymentRecorded(self.id, payment_id, amount))
        self._settle()

    def payment_failed(self, reason: str) -> None:
        if (self.failure is not None and self.needs_refund and self.payment_id is None
                and not self.refunded and not self.status.terminal):
            # Compensation started before the payment's outcome was known (its deadline
            # passed): the payment now says nothing was taken, so no refund is owed, and
            # its reason (`bank_unavailable`, say) is the better account of what happened.
            self._record(CompensationStarted(
                self.id, reason, needs_refund=False,
                needs_release=self.needs_release and not self.released,
            ))
        self._fail(reason, needs_refund=False, needs_release=False)

    def inventory_reserved(self, reservation_id: str) -> None:
        if self.reservation_id is None and not self.status.terminal:
            self._record(ReservationRecorded(self.id, reservation_id))
        self._settle()

    def inventory_unavailable(self) -> None:
        self._nothing_held()
        self._fail("inventory_unavailable", needs_refund=True, needs_release=False)

    def nothing_reserved(self) -> None:
        """The inventory voided the sale's reservation before any was made (the sale was
        given up first): a late payment reserves nothing, so no release is owed."""
        self._nothing_held()
        self._settle()

    def _nothing_held(self) -> None:
        """A sale given up without knowing whether its stock was reserved (a choreographed
        one) waits for a release; the inventory holding nothing for it confirms it too."""
        if self.failure is not None and self.needs_release and not self.released and (
            not self.status.terminal
        ):
            self._record(ReleaseRecorded(self.id))

    def order_fulfilled(
        self, order_id: str, payment_id: str = "", reservation_id: str = ""
    ) -> None:
        """The store prepared the order, after the payment and the reservation it names
        (choreography; empty when the orchestrator's replies recorded them)."""
        if self.order_id is None and self.failure is None and not self.status.terminal:
            # Nothing else is awaited once the order is prepared: one event records the
            # payment, the reservation and the fulfilment and completes the sale (a
            # FulfilmentRecorded came first before issue 11).
            self._complete(order_id, payment_id, reservation_id)
        elif self.order_id is None and self.failure is not None and not self.fulfilment_refused:
            # Late: the sale was given up first (its reservation expired, a deadline passed)
            # and its compensation gives the money and the stock back. The transaction is
            # the one arbiter, so the fulfilment is refused rather than the sale revived.
            self._record(FulfilmentRefused(self.id, order_id, self.failure))
        self._settle()

    def fulfillment_failed(self, reason: str) -> None:
        self._fail(f"fulfillment_failed:{reason}", needs_refund=True, needs_release=True)

    def reservation_expired(self) -> None:
        """The inventory reports the reservation's time is up (the stock is still held). A
        sale still waiting is given up (refund, release: SagaAborted); one whose order was
        recorded first completes, and its completion commits the stock."""
        self.abort("reservation_expired")

    def payment_refunded(self, amount: int) -> None:
        if not self.refunded and not self.status.terminal:
            self._record(RefundRecorded(self.id, amount))
        self._settle()

    def inventory_released(self) -> None:
        if not self.released and not self.status.terminal:
            self._record(ReleaseRecorded(self.id))
        self._settle()

    def abort(self, reason: str, step: str | None = None, release: bool | None = None) -> bool:
        """Stop waiting at the current step (only if it is `step`, when given) and compensate
        whatever may have happened: a refund always (a charge may be in flight at the payment
        step; the payment voids it or refunds it), a release at the fulfilment step (or as
        `release` says: an orchestrated sale releases what its orchestrator releases). False
        when there is nothing to abort: the saga moved on, is compensating or ended."""
        current = self.step
        if current is None or (step is not None and step != current):
            return False
        self._record(
            SagaAborted(self.id, current, reason, self.store_id, self.total, self.currency)
        )
        if release is None:
            # A choreographed sale does not know whether its stock was reserved: it asks,
            # and the inventory confirms a release or that nothing was held.
            release = current in ("fulfilment", ORDER)
        self._record(CompensationStarted(self.id, reason, needs_refund=True,
                                         needs_release=release))
        self._settle()
        return True

    def retry_compensation(self, attempt: int | None = None) -> bool:
        """Ask for the compensation again (refund, release: each consumer's effect happens
        once, so asking twice is safe); only after `attempt` retries, when given (a stale
        deadline entry changes nothing). False unless the saga is compensating."""
        if self.status is not Status.CANCELLING:
            return False
        if attempt is not None and attempt != self.compensation_attempts:
            return False
        assert self.failure is not None
        self._record(SagaAborted(
            self.id, COMPENSATION, self.failure, self.store_id, self.total, self.currency,
            attempt=self.compensation_attempts + 1,
        ))
        return True

    def stall(self, attempt: int) -> bool:
        """Report the compensation stuck after `attempt` retries; False if it finished, was
        retried since, or is reported already."""
        if self.status is not Status.CANCELLING or self.stalled:
            return False
        if attempt != self.compensation_attempts:
            return False
        assert self.failure is not None
        self._record(CompensationStalled(self.id, attempt, self.failure))
        return True

    def _fail(self, reason: str, *, needs_refund: bool, needs_release: bool) -> None:
        if self.failure is None and not self.status.terminal:
            self._record(CompensationStarted(self.id, reason, needs_refund, needs_release))
        self._settle()

    def _settle(self) -> None:
        """Finish the saga as soon as the facts allow it."""
        if self.status.terminal:
            return
        if self.failure is not None:
            if (self.refunded or not self.needs_refund) and (
                self.released or not self.needs_release
            ):
                self._record(
                    TransactionCancelled(self.id, self.store_id, self.customer_id, self.failure)
                )
        elif self.order_id is not None:
            self._complete(self.order_id)  # an older log's FulfilmentRecorded

    def _complete(self, order_id: str, payment_id: str = "", reservation_id: str = "") -> None:
        self._record(TransactionCompleted(
            self.id, self.store_id, self.customer_id, self.total, self.currency, order_id,
            payment_id, reservation_id,
        ))

    # -- state --------------------------------------------------------------------------

    @property
    def step(self) -> str | None:
        """The saga step this sale waits for (choreographed: `order`; orchestrated:
        `payment`, `reservation`, `fulfilment`), or None once it compensates or ended."""
        status = self.status
        if self.saga_mode == Mode.CHOREOGRAPHY and status in STEPS:
            # Also a sale whose payment or reservation was recorded before the service
            # stopped hearing them (older logs): what it waits for now is its order.
            return ORDER
        return STEPS.get(status)

    @property
    def waits_for(self) -> str | None:
        """What the saga waits for, compensation included (each has a deadline); None
        once it ended."""
        return COMPENSATION if self.status is Status.CANCELLING else self.step

    @property
    def status(self) -> Status:
        if self.cancelled:
            return Status.CANCELLED
        if self.completed:
            return Status.COMPLETED
        if self.failure is not None:
            return Status.CANCELLING
        if self.order_id is not None:
            return Status.FULFILLED
        if self.reservation_id is not None:
            return Status.INVENTORY_RESERVED
        if self.payment_id is not None:
            return Status.PAYMENT_PROCESSED
        return Status.PENDING

    def apply(self, event: object) -> None:
        match event:
            case TransactionCreated():
                self.store_id, self.customer_id = event.store_id, event.customer_id
                self.lines, self.total, self.currency = event.lines, event.total, event.currency
                self.payment_method, self.callback_url = event.payment_method, event.callback_url
                self.saga_mode = event.saga_mode
            case PaymentRecorded():
                self.payment_id = event.payment_id
            case ReservationRecorded():
                self.reservation_id = event.reservation_id
            case FulfilmentRecorded():  # older logs
                self.order_id = event.order_id
            case CompensationStarted():
                self.failure = event.reason
                self.needs_refund, self.needs_release = event.needs_refund, event.needs_release
            case RefundRecorded():
                self.refunded = True
            case ReleaseRecorded():
                self.released = True
            case SagaAborted(attempt=0):
                self.aborted_step = event.step
            case SagaAborted():
                self.compensation_attempts = event.attempt
                self.stalled = False
            case CompensationStalled():
                self.stalled = True
            case FulfilmentRefused():
                self.fulfilment_refused = True
            case TransactionCompleted():
                self.completed = True
                if event.order_id:  # empty in older logs: FulfilmentRecorded said it
                    self.order_id = event.order_id
                if event.payment_id:  # a choreographed sale learns them with its order
                    self.payment_id = event.payment_id
                if event.reservation_id:
                    self.reservation_id = event.reservation_id
            case TransactionCancelled():
                self.cancelled = True
            case _:
                raise TypeError(f"a transaction does not record {type(event).__name__}")
