"""The inventory's read models as projections: stock per (store, product), reservations."""

from __future__ import annotations

from datetime import datetime

from magasin.projections import Projection, ProjectionUnit
from magasin.shared.messages import JsonDict, RecordedEvent

STOCK = "inventory.stock"
"""Key f"{store_id}:{product_id}": {store_id, product_id, on_hand, reserved, available}."""
RESERVATIONS = "inventory.reservations"
"""Key transaction_id: {reservation_id, transaction_id, store_id, lines, status, ...}."""

_ITEM_MOVES = {
    # event type of a stock item: (change of on_hand, change of reserved) per unit
    "StockAdded": (1, 0),
    "StockReserved": (0, 1),
    "StockReleased": (0, -1),
    "StockCommitted": (-1, -1),  # older logs, see InventoryCommitted
}
STOCK_EVENTS = (*_ITEM_MOVES, "InventoryCommitted")
"""The events that move a stock line: its stock item's, and the commit of a reservation."""

Move = tuple[str, str, int, int]
"""(store_id, product_id, change of on_hand, change of reserved)."""


def stock_moves(event: RecordedEvent) -> list[Move]:
    """How one of STOCK_EVENTS moves the stock lines it touches.

    A committed reservation's units leave `on_hand` and `reserved` together: since issue 11
    its InventoryCommitted says so for every line (the stock items record nothing); in
    older logs each stock item recorded a StockCommitted, and the reservation's event
    moves nothing (`per_item_commits`)."""
    p = event.payload
    if event.type == "InventoryCommitted":
        if p.get("per_item_commits", True):
            return []
        return [(p["store_id"], x["product_id"], -x["quantity"], -x["quantity"])
                for x in p["lines"]]
    on_hand, reserved = _ITEM_MOVES[event.type]
    q = p["quantity"]
    return [(p["store_id"], p["product_id"], on_hand * q, reserved * q)]


def empty_line(store_id: str, product_id: str) -> JsonDict:
    return {"store_id": store_id, "product_id": product_id,
            "on_hand": 0, "reserved": 0, "available": 0}


def move(doc: JsonDict, on_hand: int, reserved: int) -> None:
    doc["on_hand"] += on_hand
    doc["reserved"] += reserved
    doc["available"] = doc["on_hand"] - doc["reserved"]


async def _stock_moved(event: RecordedEvent, unit: ProjectionUnit) -> None:
    for store_id, product_id, on_hand, reserved in stock_moves(event):
        key = f"{store_id}:{product_id}"
        doc = await unit.get_document(STOCK, key) or empty_line(store_id, product_id)
        move(doc, on_hand, reserved)
        unit.put_document(STOCK, key, doc)


def stock_projection() -> Projection:
    # Two commits a sale of their own at moderate rates (its reservation, its commit) when
    # it committed at once: it lingers, and the stock routes wait for it (`fresh`).
    return Projection(STOCK, dict.fromkeys(STOCK_EVENTS, _stock_moved), (STOCK,),
                      background=True)


def _empty(transaction_id: str) -> JsonDict:
    return {
        "reservation_id": None, "transaction_id": transaction_id, "store_id": None,
        "lines": [], "status": None, "expires_at": None, "fulfilled": False, "missing": [],
        "reason": None,
    }


def reservation_applied(doc: JsonDict | None, event: RecordedEvent) -> JsonDict:
    """A reservation's document once `event` (of its stream) is applied; `version` is the
    stream version it reflects, so a reader can tell a lagging document."""
    p = event.payload
    doc = dict(doc) if doc is not None else _empty(p["transaction_id"])
    match event.type:
        case "InventoryReserved":
            doc.update(
                status="RESERVED", reservation_id=p["reservation_id"], store_id=p["store_id"],
                lines=[{"product_id": x["product_id"], "quantity": x["quantity"]}
                       for x in p["lines"]],
                expires_at=datetime.fromisoformat(p["expires_at"]).isoformat(),
            )
        case "InventoryUnavailable":
            doc.update(
                status="UNAVAILABLE", store_id=p["store_id"],
                missing=[{"product_id": m["product_id"], "requested": m["requested"],
                          "available": m["available"]} for m in p["missing"]],
            )
        case "InventoryReleased":
            doc.update(status="RELEASED", reason=p["reason"])
        case "InventoryCommitted":
            doc["status"] = "COMMITTED"
            if not p.get("per_item_commits", True):
                doc["fulfilled"] = True  # its sale completed: its order was prepared
        case "ReservationFulfilled":
            doc["fulfilled"] = True
        case "ReservationExpired":
            doc["expired_at"] = event.occurred_at.isoformat()
        case "ReservationVoided":
            doc.update(status="VOIDED", reason=p["reason"])
    doc["version"] = event.stream_version
    return doc


async def _reservation_changed(event: RecordedEvent, unit: ProjectionUnit) -> None:
    tid = event.payload["transaction_id"]
    before = await unit.get_document(RESERVATIONS, tid)
    if before is not None and before.get("version", 0) >= event.stream_version:
        return  # applied already (inline, by the unit of work that appended it)
    unit.put_document(RESERVATIONS, tid, reservation_applied(before, event))


RESERVATION_EVENTS = (
    "InventoryReserved", "InventoryUnavailable", "InventoryReleased", "InventoryCommitted",
    "ReservationFulfilled", "ReservationVoided", "ReservationExpired",
)


def reservations_projection() -> Projection:
    """Inline: one document per reservation stream (the transaction id), with its version.
    (The stock lines are not: a line moves with its stock item's events and with the
    InventoryCommitted of every reservation holding it, so no one stream version says
    which of those it reflects.)"""
    return Projection("inventory.reservations",
                      dict.fromkeys(RESERVATION_EVENTS, _reservation_changed), (RESERVATIONS,),
                      inline=True)
