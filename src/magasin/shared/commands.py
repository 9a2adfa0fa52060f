"""Commands of the orchestrated saga: the contract between the orchestrator and services.

A command is an envelope like an event (stored in the orchestrator's log, sent through the
outbox and the bus), addressed to one service and carrying where the reply goes. The reply
is the event the service publishes anyway (PaymentProcessed, InventoryReserved, ...),
correlated by transaction id. `command_id` (`<transaction id>:<sequence>`) is the inbox key
that makes a redelivered command change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from magasin.shared.events import SCHEMAS, SaleLine
from magasin.shared.messages import RecordedEvent


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
    command_id: str
    reply_to: str
    transaction_id: str
    reason: str


TARGETS: dict[type, str] = {
    ChargePayment: "payment", RefundPayment: "payment", VoidPayment: "payment",
    ReserveStock: "inventory", ReleaseStock: "inventory",
    PrepareOrder: "store",
}
"""The service each command is addressed to (its consumer accepts it next to its events)."""

ALL_COMMANDS: tuple[type, ...] = tuple(TARGETS)

for _command_type in ALL_COMMANDS:
    SCHEMAS.register(_command_type.__name__, _command_type)


def orchestrated(event: RecordedEvent) -> bool:
    """An event of an orchestrated saga (its `baggage` metadata says so, from the
    orchestrator's commands on): the services' choreographed reactions leave it alone."""
    baggage = event.metadata.get("baggage") or {}
    return bool(baggage.get("saga_mode") == "orchestration")
