"""Stock items and reservations: the inventory's aggregates and its all-or-nothing rule.

A `StockItem` is one product on the shelves of one store. Its one rule is never to promise
more than it has: `available` units can be reserved, and a reservation takes them out of
`available` until it is released (they come back) or committed (they leave for good, and
the stock item records nothing: its `available` does not change). A `Reservation` is what
one transaction holds; it moves the stock of its lines, reserving and releasing them on
the stock items in the same unit of work.

The read models split the units taken out of `available` into `reserved` and sold (gone
from `on_hand`) from the reservations' events (`inventory/projection.py`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import datetime

from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    InventoryCommitted,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    MissingLine,
    ReservationExpired,
    ReservationFulfilled,
    ReservationVoided,
    StockAdded,
    StockCommitted,
    StockLine,
    StockReleased,
    StockReserved,
)

RELEASE_REASONS = frozenset({
    "transaction_cancelled", "fulfillment_failed", "expired", "saga_aborted",
})


def stock_key(store_id: str, product_id: str) -> str:
    """Id of a stock item, and key of its read-model document."""
    return f"{store_id}:{product_id}"


def _positive(quantity: int, what: str) -> None:
    if quantity <= 0:
        raise InvalidInput(f"{what} quantity must be > 0, got {quantity}")


class StockItem(Aggregate):
    """One product in one store. Invariant: 0 <= available <= received.

    `received` counts every unit ever added; `taken` (received - available) the units
    reserved and not given back, whether still held or sold since."""

    stream_type = "stock"
    snapshot_version = 2
    """2 since issue 11 (`received`, `available`; was `on_hand`, `reserved`)."""

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.store_id, _, self.product_id = ident.partition(":")
        self.received = 0
        self.available = 0

    @classmethod
    def create(cls, store_id: str, product_id: str) -> StockItem:
        """An item with no stock yet (nothing is recorded until stock moves)."""
        item = cls(stock_key(store_id, product_id))
        item.store_id, item.product_id = store_id, product_id
        return item

    @property
    def taken(self) -> int:
        return self.received - self.available

    def add(self, quantity: int, reason: str = "restock") -> None:
        _positive(quantity, "restock")
        self._record(StockAdded(self.store_id, self.product_id, quantity, reason))

    def reserve(self, quantity: int, transaction_id: str) -> None:
        _positive(quantity, "reserved")
        if quantity > self.available:
            raise BusinessRuleViolation(
                f"cannot reserve {quantity} of {self.product_id} in store {self.store_id}: "
                f"only {self.available} available"
            )
        self._record(StockReserved(self.store_id, self.product_id, quantity, transaction_id))

    def release(self, quantity: int, transaction_id: str) -> None:
        _positive(quantity, "released")
        if quantity > self.taken:
            raise BusinessRuleViolation(
                f"cannot release {quantity} of {self.product_id} in store {self.store_id}: "
                f"only {self.taken} taken"
            )
        self._record(StockReleased(self.store_id, self.product_id, quantity, transaction_id))

    def apply(self, event: object) -> None:
        match event:
            case StockAdded(store_id=store, product_id=product, quantity=q):
                self.store_id, self.product_id = store, product
                self.received += q
                self.available += q
            case StockReserved(quantity=q):
                self.available -= q
            case StockReleased(quantity=q):
                self.available += q
            case StockCommitted():
                # Older logs: reserved units left on_hand and reserved alike, so what can
                # still be promised did not change.
                pass


class ReservationStatus(enum.StrEnum):
    RESERVED = "RESERVED"
    UNAVAILABLE = "UNAVAILABLE"
    RELEASED = "RELEASED"
    COMMITTED = "COMMITTED"
    VOIDED = "VOIDED"


class Reservation(Aggregate):
    """What one transaction (the id) holds. `status` is None until something is recorded."""

    stream_type = "reservation"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.status: ReservationStatus | None = None
        self.reservation_id: str | None = None
        self.store_id: str | None = None
        self.lines: tuple[StockLine, ...] = ()
        self.missing: tuple[MissingLine, ...] = ()
        self.expires_at: datetime | None = None
        self.fulfilled = False
        """Its order was prepared (committed, or reported by the store in older logs)."""
        self.expired = False
        """Its expiry was reported to the transaction, which decides what happens to it."""
        self.reason: str | None = None
        """Why it was released or voided."""

    @property
    def transaction_id(self) -> str:
        return self.id

    def _require_new(self, action: str) -> None:
        if self.status is not None:
            raise BusinessRuleViolation(
                f"cannot {action} for transaction {self.id}: its reservation is {self.status}"
            )

    def _require_reserved(self, action: str) -> None:
        if self.status is not ReservationStatus.RESERVED:
            raise BusinessRuleViolation(
                f"cannot {action} the reservation of transaction {self.id}: it is "
                f"{self.status or 'not made'}"
            )

    def reserve(
        self, reservation_id: str, store_id: str, lines: Iterable[StockLine], expires_at: datetime,
        payment_id: str = "",
    ) -> None:
        """Hold the stock until `expires_at`; `payment_id` (the payment it follows, in a
        choreographed sale) travels on with InventoryReserved to the store."""
        self._require_new("reserve stock")
        merged = merge_lines(lines)
        if expires_at.tzinfo is None:
            raise InvalidInput("a reservation's expiry must be a UTC-aware time")
        self._record(
            InventoryReserved(self.id, reservation_id, store_id, merged, expires_at.isoformat(),
                              payment_id)
        )

    def refuse(self, store_id: str, missing: Iterable[MissingLine]) -> None:
        """Record that the stock could not be reserved: nothing is held."""
        self._require_new("refuse stock")
        missing = tuple(missing)
        if not missing:
            raise InvalidInput("a refused reservation must name its missing lines")
        self._record(InventoryUnavailable(self.id, store_id, missing))

    def void(self, reason: str) -> None:
        """The transaction ended before any reservation: a late payment reserves nothing."""
        self._require_new("void the reservation")
        self._record(ReservationVoided(self.id, reason))

    def release(self, reason: str) -> None:
        """Give the stock back; the caller releases each line on its stock item."""
        if reason not in RELEASE_REASONS:
            raise InvalidInput(f"unknown release reason {reason!r}")
        self._require_reserved("release")
        assert self.reservation_id is not None
        assert self.store_id is not None
        self._record(
            InventoryReleased(self.id, self.reservation_id, self.store_id, self.lines, reason)
        )

    def commit(self) -> None:
        """The transaction completed: the stock leaves for good (no stock item records it:
        its units left `available` when they were reserved)."""
        self._require_reserved("commit")
        assert self.reservation_id is not None
        assert self.store_id is not None
        self._record(InventoryCommitted(
            self.id, self.reservation_id, self.store_id, self.lines, per_item_commits=False
        ))

    def is_expired(self, now: datetime) -> bool:
        """Its time is up and nobody was told yet."""
        return (
            self.status is ReservationStatus.RESERVED
            and not self.fulfilled
            and not self.expired
            and self.expires_at is not None
            and now >= self.expires_at
        )

    def expire(self, now: datetime) -> None:
        """Report the expiry; the stock stays held until the transaction decides (it gives
        the sale up, and the release follows, unless the sale's order was recorded first,
        in which case the completion commits the stock)."""
        self._require_reserved("expire")
        if self.fulfilled:
            raise BusinessRuleViolation(
                f"the reservation of transaction {self.id} is fulfilled: it no longer expires"
            )
        if not self.is_expired(now):
            raise BusinessRuleViolation(
                f"the reservation of transaction {self.id} expires at {self.expires_at}"
                + (" (reported already)" if self.expired else "")
            )
        assert self.reservation_id is not None and self.store_id is not None
        assert self.expires_at is not None
        self._record(ReservationExpired(
            self.id, self.reservation_id, self.store_id, self.expires_at.isoformat()
        ))

    def apply(self, event: object) -> None:
        match event:
            case InventoryReserved():
                self.status = ReservationStatus.RESERVED
                self.reservation_id = event.reservation_id
                self.store_id = event.store_id
                self.lines = event.lines
                self.expires_at = datetime.fromisoformat(event.expires_at)
            case InventoryUnavailable():
                self.status = ReservationStatus.UNAVAILABLE
                self.store_id = event.store_id
                self.missing = event.missing
            case InventoryReleased(reason=reason):
                self.status = ReservationStatus.RELEASED
                self.reason = reason
            case InventoryCommitted():
                self.status = ReservationStatus.COMMITTED
                if not event.per_item_commits:
                    self.fulfilled = True  # its sale completed: its order was prepared
            case ReservationFulfilled():  # older logs: the order was reported first
                self.fulfilled = True
            case ReservationExpired():
                self.expired = True
            case ReservationVoided(reason=reason):
                self.status = ReservationStatus.VOIDED
                self.reason = reason


# -- domain services: rules spanning a reservation and its stock items ---------------------


def merge_lines(lines: Iterable[StockLine]) -> tuple[StockLine, ...]:
    """One line per product (quantities summed), in order of first appearance."""
    totals: dict[str, int] = {}
    for line in lines:
        _positive(line.quantity, f"line {line.product_id}")
        totals[line.product_id] = totals.get(line.product_id, 0) + line.quantity
    if not totals:
        raise InvalidInput("a reservation needs at least one line")
    return tuple(StockLine(product, quantity) for product, quantity in totals.items())


def reserve_all(
    items: Mapping[str, StockItem], lines: Iterable[StockLine], transaction_id: str
) -> tuple[MissingLine, ...]:
    """Reserve every line on its item (keyed by product id), or none of them.

    Returns the lines that cannot be served (a product without an item has 0 available);
    when there are any, no item changed.
    """
    merged = merge_lines(lines)
    missing = tuple(
        MissingLine(line.product_id, line.quantity, available)
        for line in merged
        if line.quantity > (available := _available(items, line.product_id))
    )
    if missing:
        return missing
    for line in merged:
        items[line.product_id].reserve(line.quantity, transaction_id)
    return ()


def _available(items: Mapping[str, StockItem], product_id: str) -> int:
    item = items.get(product_id)
    return item.available if item is not None else 0


def release_reservation(
    reservation: Reservation, items: Mapping[str, StockItem], reason: str
) -> None:
    """Give back every line of a held reservation to its stock item."""
    reservation.release(reason)
    for line in reservation.lines:
        items[line.product_id].release(line.quantity, reservation.id)
