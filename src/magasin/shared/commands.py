"""Commands of the orchestrated saga: where each goes, and how a service tells an
orchestrated sale's events from a choreographed one's.

The command models live with the events in `shared.events` (one published language, one
registry every process loads: the audit trail and the event store know commands too).
`command_id` (`<transaction id>:<sequence>`) is the inbox key that makes a redelivered
command change nothing.
"""

from __future__ import annotations

from magasin.shared.events import (
    ALL_COMMANDS,
    ChargePayment,
    PrepareOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    VoidPayment,
)
from magasin.shared.messages import RecordedEvent

__all__ = [
    "ALL_COMMANDS", "TARGETS", "ChargePayment", "PrepareOrder", "RefundPayment",
    "ReleaseStock", "ReserveStock", "VoidPayment", "mode_of", "orchestrated",
]

TARGETS: dict[type, str] = {
    ChargePayment: "payment", RefundPayment: "payment", VoidPayment: "payment",
    ReserveStock: "inventory", ReleaseStock: "inventory",
    PrepareOrder: "store",
}
"""The service each command is addressed to (its consumer accepts it next to its events)."""


def orchestrated(event: RecordedEvent) -> bool:
    """An event of an orchestrated saga (its `baggage` metadata says so, from the
    orchestrator's commands on): the services' choreographed reactions leave it alone."""
    baggage = event.metadata.get("baggage") or {}
    return bool(baggage.get("saga_mode") == "orchestration")


def mode_of(event: RecordedEvent) -> str | None:
    """The coordination of the saga an event belongs to (`choreography`, `orchestration`),
    for metrics and traces; None for an event of no saga (a catalog change, say)."""
    if event.type == "TransactionCreated":
        return str(event.payload.get("saga_mode") or "choreography")
    if orchestrated(event):
        return "orchestration"
    return "choreography" if event.correlation_id else None
