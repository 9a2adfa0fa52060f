"""The published language: every event services exchange, as plain dataclasses.

Money is an integer number of cents plus an ISO currency code, never a float. Events carry
the state their consumers need, so no consumer calls a producer back (DESIGN.md §3).
`SCHEMAS` is the registry the buses validate payloads against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from magasin.shared.messages import EventSchemas

# -- value objects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaleLine:
    """A line of a sale, priced from the catalog when the transaction was created."""

    product_id: str
    quantity: int
    unit_price: int


@dataclass(frozen=True, slots=True)
class StockLine:
    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class MissingLine:
    product_id: str
    requested: int
    available: int


# -- stores and catalog (store service) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreRegistered:
    store_id: str
    name: str
    district: str
    address: str


@dataclass(frozen=True, slots=True)
class StoreClosed:
    """The store stops preparing orders; sales reaching fulfilment there are compensated."""

    store_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class StoreReopened:
    store_id: str


@dataclass(frozen=True, slots=True)
class ProductAdded:
    product_id: str
    sku: str
    name: str
    unit_price: int
    currency: str


@dataclass(frozen=True, slots=True)
class SkuClaimed:
    """A SKU is taken by a product: first event of the SKU's own stream, so two products
    can never claim it (the second append finds the stream and fails)."""

    sku: str
    product_id: str


@dataclass(frozen=True, slots=True)
class ProductPriceChanged:
    product_id: str
    unit_price: int
    currency: str


# -- transaction service ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransactionCreated:
    transaction_id: str
    store_id: str
    customer_id: str
    lines: tuple[SaleLine, ...]
    total: int
    currency: str
    payment_method: str
    callback_url: str | None = None
    saga_mode: str = "choreography"
    """Which coordination runs this sale (`choreography` or `orchestration`), decided once
    at creation; events stored before the orchestrator existed are choreographed."""


@dataclass(frozen=True, slots=True)
class TransactionCompleted:
    """The sale is done: its order was prepared (`order_id`) and its payment captured.

    Since issue 11 this one event records the fulfilment too; before, a FulfilmentRecorded
    came just before it in the same unit of work (and `order_id` is empty here)."""

    transaction_id: str
    store_id: str
    customer_id: str
    total: int
    currency: str
    order_id: str = ""
    payment_id: str = ""
    reservation_id: str = ""
    """The payment and reservation of a choreographed sale, which the transaction service
    learns only from `OrderFulfilled` (empty when they were recorded before, with
    `PaymentRecorded` and `ReservationRecorded`, and in older events)."""


@dataclass(frozen=True, slots=True)
class TransactionCancelled:
    transaction_id: str
    store_id: str
    customer_id: str
    reason: str


# -- payment service ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentProcessed:
    payment_id: str
    transaction_id: str
    amount: int
    currency: str
    bank_reference: str
    store_id: str
    lines: tuple[StockLine, ...]


@dataclass(frozen=True, slots=True)
class PaymentFailed:
    payment_id: str
    transaction_id: str
    amount: int
    currency: str
    reason: str
    """`declined`, `limit_exceeded`, `bank_unavailable`, ..."""
    store_id: str = ""
    """Where the sale was made (for the payments read model; empty in older events)."""


@dataclass(frozen=True, slots=True)
class PaymentRefunded:
    payment_id: str
    transaction_id: str
    amount: int
    currency: str
    reason: str
    bank_reference: str


# -- inventory service --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StockAdded:
    store_id: str
    product_id: str
    quantity: int
    reason: str = "restock"


@dataclass(frozen=True, slots=True)
class InventoryReserved:
    transaction_id: str
    reservation_id: str
    store_id: str
    lines: tuple[StockLine, ...]
    expires_at: str
    """ISO-8601 UTC instant after which the reservation is released."""
    payment_id: str = ""
    """The payment the stock was reserved after (choreography), passed on to the store so
    that `OrderFulfilled` tells the transaction service the whole chain; empty when the
    orchestrator asked for the reservation, and in older events."""


@dataclass(frozen=True, slots=True)
class InventoryUnavailable:
    transaction_id: str
    store_id: str
    missing: tuple[MissingLine, ...]


@dataclass(frozen=True, slots=True)
class InventoryReleased:
    transaction_id: str
    reservation_id: str
    store_id: str
    lines: tuple[StockLine, ...]
    reason: str
    """`transaction_cancelled`, `fulfillment_failed`, `expired`."""


@dataclass(frozen=True, slots=True)
class ReservationExpired:
    """The reservation's time is up while its sale still waits for the store: the stock is
    still held. The transaction decides — it gives the sale up (SagaAborted, reason
    `reservation_expired`: refund, release) unless its order was recorded first — so a
    late fulfilment can never complete a sale whose stock went back on the shelves."""

    transaction_id: str
    reservation_id: str
    store_id: str
    expires_at: str


@dataclass(frozen=True, slots=True)
class InventoryCommitted:
    """The reserved stock left the shelves for good: the transaction completed (its order
    was prepared, so the reservation is fulfilled too).

    The stock items record nothing at commit (their units left `available` when they were
    reserved): the read models take each line off `on_hand` and `reserved` from this event.
    Before issue 11 (`per_item_commits`, true in those events) a ReservationFulfilled came
    first and each stock item recorded a StockCommitted, which is what moved its counts."""

    transaction_id: str
    reservation_id: str
    store_id: str
    lines: tuple[StockLine, ...]
    per_item_commits: bool = True
    """Whether each line's stock item recorded its own StockCommitted (events stored before
    issue 11, which lack the field); new events say False."""


# -- order preparation (store service) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderFulfilled:
    order_id: str
    transaction_id: str
    store_id: str
    lines: tuple[StockLine, ...] = ()
    """What was prepared (for the orders read model; empty in older events)."""
    payment_id: str = ""
    reservation_id: str = ""
    """The payment and the reservation the order was prepared after, as `InventoryReserved`
    carried them (choreography): the transaction service hears only this event of the happy
    path and records the chain with the sale's completion. Empty in older events."""


@dataclass(frozen=True, slots=True)
class OrderFulfillmentFailed:
    transaction_id: str
    store_id: str
    reason: str
    order_id: str = field(default="")
    lines: tuple[StockLine, ...] = ()
    """What could not be prepared (for the orders read model)."""


@dataclass(frozen=True, slots=True)
class ChargeReconciled:
    """Reconciliation with the bank found money the bank took for a payment recorded as
    failed (voided: a crash or a lost race between the bank's approval and our commit).
    `action`: `refunded` (we gave it back now) or `recorded` (the bank had given it back
    already; our books now say so). The sale is unaffected: it never used that money."""

    payment_id: str
    transaction_id: str
    bank_reference: str
    amount: int
    currency: str
    action: str
    refund_reference: str


# -- internal events: facts an aggregate keeps in its own stream ---------------------------
# No consumer of a business service handles them (SagaAborted aside: see CONSUMED), so a
# relay does not publish them; the event store and the audit get them in the shipped
# batches of the whole log, like every event.


@dataclass(frozen=True, slots=True)
class PaymentRecorded:
    """The transaction learnt its payment was captured."""

    transaction_id: str
    payment_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class ReservationRecorded:
    transaction_id: str
    reservation_id: str


@dataclass(frozen=True, slots=True)
class FulfilmentRecorded:
    """No longer recorded (issue 11: TransactionCompleted carries the order id); kept so
    that older logs replay."""

    transaction_id: str
    order_id: str


@dataclass(frozen=True, slots=True)
class CompensationStarted:
    """The saga failed at a step: compensation (refund, release) must finish before cancel."""

    transaction_id: str
    reason: str
    needs_refund: bool
    needs_release: bool


@dataclass(frozen=True, slots=True)
class FulfilmentRefused:
    """The store fulfilled the order after the sale was given up (its reservation expired or
    a deadline passed): the fulfilment is refused, the sale stays compensated."""

    transaction_id: str
    order_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RefundRecorded:
    transaction_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class ReleaseRecorded:
    transaction_id: str


@dataclass(frozen=True, slots=True)
class SagaAborted:
    """The transaction stopped waiting at `step` (`payment`, `reservation`, `fulfilment`):
    its deadline passed (`deadline:<step>`) or an operator forced it (`forced`). Payment
    voids or refunds, inventory releases what it holds for the sale.

    Also the retry of a compensation that did not finish in time: `step` is then
    `compensation`, `attempt` counts the retries (from 1) and `reason` is the saga's
    failure. Its consumers' effects are idempotent (a refund or release happens once)."""

    transaction_id: str
    step: str
    reason: str
    store_id: str
    total: int
    currency: str
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class CompensationStalled:
    """The compensation of a sale was retried `attempts` times and is still not confirmed:
    it is reported stuck (metric, alert, listing) until it finishes or an operator forces
    another retry."""

    transaction_id: str
    attempts: int
    reason: str


@dataclass(frozen=True, slots=True)
class StockReserved:
    store_id: str
    product_id: str
    quantity: int
    transaction_id: str


@dataclass(frozen=True, slots=True)
class StockReleased:
    store_id: str
    product_id: str
    quantity: int
    transaction_id: str


@dataclass(frozen=True, slots=True)
class StockCommitted:
    """No longer recorded (issue 11: InventoryCommitted says it for the whole reservation,
    and a stock item's `available` does not change when reserved units leave); kept so that
    older logs replay."""

    store_id: str
    product_id: str
    quantity: int
    transaction_id: str


@dataclass(frozen=True, slots=True)
class ReservationFulfilled:
    """The order was prepared: the reservation no longer expires, it awaits commit.

    No longer recorded (issue 11): the transaction completes in the same unit of work as it
    learns of the order, and the commit that follows marks the reservation fulfilled; kept
    so that older logs replay."""

    transaction_id: str


@dataclass(frozen=True, slots=True)
class ReservationVoided:
    """The transaction was cancelled before any reservation: a late payment reserves nothing."""

    transaction_id: str
    reason: str


# -- the saga orchestrator (transaction service): its decisions, and its commands ---------


@dataclass(frozen=True, slots=True)
class OrchestrationStarted:
    """An orchestrated sale's saga starts (stream `saga_orchestration-<transaction id>`)."""

    transaction_id: str
    total: int
    currency: str


@dataclass(frozen=True, slots=True)
class CommandIssued:
    transaction_id: str
    command: str
    sequence: int
    """1, 2, ... per saga: `<transaction id>:<sequence>` identifies the command (inbox key)."""


@dataclass(frozen=True, slots=True)
class ReplyAccepted:
    transaction_id: str
    reply: str
    reference: str | None = None
    """The id the reply carries (payment, reservation or order id), when it has one."""


@dataclass(frozen=True, slots=True)
class CompensationDecided:
    transaction_id: str
    reason: str
    refund: bool
    release: bool


@dataclass(frozen=True, slots=True)
class OrchestrationEnded:
    transaction_id: str
    outcome: str
    reason: str | None = None


# Commands are envelopes like events (stored in the sender's log, sent through its outbox,
# deduplicated by the receiver's inbox), addressed to one service, with where the reply
# goes. The reply is the event the service publishes anyway, correlated by transaction id.


@dataclass(frozen=True, slots=True)
class ChargePayment:
    command_id: str
    reply_to: str
    transaction_id: str
    store_id: str
    lines: tuple[SaleLine, ...]
    total: int
    currency: str
    payment_method: str


@dataclass(frozen=True, slots=True)
class ReserveStock:
    command_id: str
    reply_to: str
    transaction_id: str
    store_id: str
    lines: tuple[SaleLine, ...]


@dataclass(frozen=True, slots=True)
class PrepareOrder:
    command_id: str
    reply_to: str
    transaction_id: str
    store_id: str
    reservation_id: str
    lines: tuple[SaleLine, ...]


@dataclass(frozen=True, slots=True)
class RefundPayment:
    command_id: str
    reply_to: str
    transaction_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseStock:
    command_id: str
    reply_to: str
    transaction_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class VoidPayment:
    """The payment step passed its deadline (or was forced): void a charge not taken, refund
    one that was. Carries what a void records (like SagaAborted does)."""

    command_id: str
    reply_to: str
    transaction_id: str
    reason: str
    store_id: str
    total: int
    currency: str


ALL_COMMANDS: tuple[type, ...] = (
    ChargePayment, ReserveStock, PrepareOrder, RefundPayment, ReleaseStock, VoidPayment,
)

ALL_EVENTS: tuple[type, ...] = (
    StoreRegistered, StoreClosed, StoreReopened, ProductAdded, SkuClaimed, ProductPriceChanged,
    TransactionCreated, TransactionCompleted, TransactionCancelled,
    PaymentProcessed, PaymentFailed, PaymentRefunded, ChargeReconciled,
    StockAdded, InventoryReserved, InventoryUnavailable, InventoryReleased, InventoryCommitted,
    ReservationExpired,
    OrderFulfilled, OrderFulfillmentFailed,
    PaymentRecorded, ReservationRecorded, FulfilmentRecorded, CompensationStarted,
    FulfilmentRefused,
    RefundRecorded, ReleaseRecorded,
    SagaAborted, CompensationStalled,
    StockReserved, StockReleased, StockCommitted, ReservationFulfilled, ReservationVoided,
    OrchestrationStarted, CommandIssued, ReplyAccepted, CompensationDecided, OrchestrationEnded,
)

SCHEMAS = EventSchemas()
for _event_type in (*ALL_EVENTS, *ALL_COMMANDS):
    # Every process knows every message, commands included: the audit trail and the event
    # store archive the orchestrator's decisions and commands like any other event.
    SCHEMAS.register(_event_type.__name__, _event_type)

CONSUMED: frozenset[str] = frozenset({
    "TransactionCreated", "TransactionCompleted", "TransactionCancelled", "SagaAborted",
    "PaymentProcessed", "PaymentFailed", "PaymentRefunded",
    "InventoryReserved", "InventoryUnavailable", "InventoryReleased", "ReservationExpired",
    "ReservationVoided", "OrderFulfilled", "OrderFulfillmentFailed",
    "StoreRegistered", "ProductAdded", "ProductPriceChanged",
    *(command.__name__ for command in ALL_COMMANDS),
})
"""The messages some consumer of a business service handles (its registry has them): in
distributed mode the outbox relays publish these, and only these, to the broker. The others
stay in the log of the service that recorded them, which ships them with every event to the
consumers of the whole log (the audit, the event store's archive); `MAGASIN_PUBLISH_ALL`
publishes them too, for consumers outside magasin. A handler for another type needs it here
(tests/unit/test_published_messages.py checks it against every registry)."""
