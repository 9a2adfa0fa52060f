"""The inventory's aggregates and its all-or-nothing rule, without any storage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from magasin.inventory.domain import (
    Reservation,
    ReservationStatus,
    StockItem,
    merge_lines,
    release_reservation,
    reserve_all,
)
from magasin.shared.errors import BusinessRuleViolation, InvalidInput
from magasin.shared.events import (
    InventoryCommitted,
    InventoryReleased,
    InventoryReserved,
    MissingLine,
    ReservationExpired,
    ReservationFulfilled,
    StockAdded,
    StockCommitted,
    StockLine,
    StockReserved,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def stocked(product_id: str, on_hand: int, store_id: str = "S1") -> StockItem:
    item = StockItem.create(store_id, product_id)
    if on_hand:
        item.add(on_hand)
    item.pending.clear()
    return item


def held(transaction_id: str, *lines: StockLine, expires_at: datetime = NOW) -> Reservation:
    reservation = Reservation(transaction_id)
    reservation.reserve("R-" + transaction_id, "S1", lines, expires_at)
    return reservation


def test_stock_item_counts_what_it_received_and_what_is_available() -> None:
    item = stocked("P1", 10)
    item.reserve(3, "T1")
    assert (item.received, item.taken, item.available) == (10, 3, 7)
    item.release(1, "T1")
    assert (item.received, item.taken, item.available) == (10, 2, 8)


def test_stock_item_is_rebuilt_from_its_events() -> None:
    events = [StockAdded("S1", "P1", 5), StockReserved("S1", "P1", 2, "T1")]
    item = StockItem.replay("S1:P1", events, 2)
    assert (item.store_id, item.product_id, item.received, item.available) == ("S1", "P1", 5, 3)


def test_an_older_stock_log_with_per_item_commits_rebuilds_the_same_availability() -> None:
    # Before issue 11 a commit recorded StockCommitted on the item: it moved on_hand and
    # reserved alike, so what can be promised is what it is without it.
    events = [
        StockAdded("S1", "P1", 5),
        StockReserved("S1", "P1", 2, "T1"),
        StockCommitted("S1", "P1", 2, "T1"),
    ]
    item = StockItem.replay("S1:P1", events, 3)
    assert (item.received, item.available) == (5, 3)
    item.reserve(3, "T2")  # all that is left can still be promised, and no more
    with pytest.raises(BusinessRuleViolation, match="only 0 available"):
        item.reserve(1, "T3")


@pytest.mark.parametrize("quantity", [0, -1])
def test_stock_quantities_must_be_positive(quantity: int) -> None:
    item = stocked("P1", 5)
    for command in (item.add, item.reserve, item.release):
        with pytest.raises(InvalidInput, match="must be > 0"):
            command(quantity, "T1")
    assert item.pending == []


def test_never_reserves_more_than_available() -> None:
    item = stocked("P1", 5)
    item.reserve(4, "T1")
    with pytest.raises(BusinessRuleViolation, match="only 1 available"):
        item.reserve(2, "T2")
    assert item.available == 1


def test_stock_never_goes_above_what_was_received_by_release() -> None:
    item = stocked("P1", 5)
    item.reserve(2, "T1")
    with pytest.raises(BusinessRuleViolation, match="only 2 taken"):
        item.release(3, "T1")
    assert (item.received, item.available) == (5, 3)


def test_duplicate_product_lines_are_merged_in_first_seen_order() -> None:
    lines = [StockLine("P2", 1), StockLine("P1", 2), StockLine("P2", 3)]
    assert merge_lines(lines) == (StockLine("P2", 4), StockLine("P1", 2))


def test_a_request_without_lines_or_with_a_zero_line_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least one line"):
        merge_lines([])
    with pytest.raises(InvalidInput, match="must be > 0"):
        merge_lines([StockLine("P1", 0)])


def test_reserve_all_reserves_every_line_when_all_are_available() -> None:
    items = {"P1": stocked("P1", 5), "P2": stocked("P2", 1)}
    missing = reserve_all(items, [StockLine("P1", 5), StockLine("P2", 1)], "T1")
    assert missing == ()
    assert (items["P1"].available, items["P2"].available) == (0, 0)


def test_reserve_all_changes_nothing_when_one_line_is_short() -> None:
    items = {"P1": stocked("P1", 5), "P2": stocked("P2", 1)}
    missing = reserve_all(items, [StockLine("P1", 2), StockLine("P2", 3)], "T1")
    assert missing == (MissingLine("P2", 3, 1),)
    assert all(not item.pending for item in items.values())
    assert (items["P1"].available, items["P2"].available) == (5, 1)


def test_reserve_all_checks_merged_quantities_not_each_line() -> None:
    items = {"P1": stocked("P1", 3)}
    missing = reserve_all(items, [StockLine("P1", 2), StockLine("P1", 2)], "T1")
    assert missing == (MissingLine("P1", 4, 3),)
    assert items["P1"].available == 3


def test_reserve_all_counts_a_never_stocked_product_as_zero_available() -> None:
    assert reserve_all({}, [StockLine("P9", 1)], "T1") == (MissingLine("P9", 1, 0),)


def test_reservation_records_merged_lines_and_expiry() -> None:
    reservation = held("T1", StockLine("P1", 1), StockLine("P1", 2), expires_at=NOW)
    [event] = reservation.pending
    assert isinstance(event, InventoryReserved)
    assert event.lines == (StockLine("P1", 3),)
    assert datetime.fromisoformat(event.expires_at) == NOW
    assert reservation.status is ReservationStatus.RESERVED


def test_a_reservation_is_made_or_refused_or_voided_only_once() -> None:
    reservation = held("T1", StockLine("P1", 1))
    with pytest.raises(BusinessRuleViolation, match="is RESERVED"):
        reservation.reserve("R2", "S1", [StockLine("P1", 1)], NOW)
    with pytest.raises(BusinessRuleViolation, match="is RESERVED"):
        reservation.void("transaction_cancelled")
    voided = Reservation("T2")
    voided.void("transaction_cancelled")
    with pytest.raises(BusinessRuleViolation, match="is VOIDED"):
        voided.refuse("S1", [MissingLine("P1", 1, 0)])


def test_release_gives_every_line_back_to_its_stock_item() -> None:
    items = {"P1": stocked("P1", 5), "P2": stocked("P2", 5)}
    reserve_all(items, [StockLine("P1", 2), StockLine("P2", 1)], "T1")
    reservation = held("T1", StockLine("P1", 2), StockLine("P2", 1))
    release_reservation(reservation, items, "fulfillment_failed")
    assert reservation.status is ReservationStatus.RELEASED
    assert isinstance(reservation.pending[-1], InventoryReleased)
    assert (items["P1"].available, items["P2"].available) == (5, 5)


def test_only_a_held_reservation_can_be_released_or_committed() -> None:
    items = {"P1": stocked("P1", 5)}
    reserve_all(items, [StockLine("P1", 2)], "T1")
    reservation = held("T1", StockLine("P1", 2))
    release_reservation(reservation, items, "transaction_cancelled")
    with pytest.raises(BusinessRuleViolation, match="it is RELEASED"):
        release_reservation(reservation, items, "transaction_cancelled")
    with pytest.raises(BusinessRuleViolation, match="it is RELEASED"):
        reservation.commit()
    assert (items["P1"].received, items["P1"].available) == (5, 5)


def test_commit_ends_the_reservation_in_one_event_and_leaves_the_stock_items_alone() -> None:
    items = {"P1": stocked("P1", 5)}
    reserve_all(items, [StockLine("P1", 2)], "T1")
    for item in items.values():
        item.pending.clear()
    reservation = held("T1", StockLine("P1", 2))
    reservation.pending.clear()
    reservation.commit()
    [committed] = reservation.pending
    assert committed == InventoryCommitted(
        "T1", "R-T1", "S1", (StockLine("P1", 2),), per_item_commits=False
    )
    assert reservation.status is ReservationStatus.COMMITTED and reservation.fulfilled
    assert items["P1"].pending == [] and items["P1"].available == 3
    with pytest.raises(BusinessRuleViolation, match="it is COMMITTED"):
        reservation.commit()


def older_reservation(*after: object) -> Reservation:
    reserved = InventoryReserved("T1", "R-T1", "S1", (StockLine("P1", 2),), NOW.isoformat())
    return Reservation.replay("T1", [reserved, *after], 1 + len(after))


def test_an_older_reservation_log_rebuilds_to_the_same_state() -> None:
    committed = InventoryCommitted("T1", "R-T1", "S1", (StockLine("P1", 2),))
    assert committed.per_item_commits  # what an event stored before issue 11 reads as
    fulfilled = older_reservation(ReservationFulfilled("T1"), committed)
    assert (fulfilled.status, fulfilled.fulfilled) == (ReservationStatus.COMMITTED, True)
    # The order reported after the commit recorded nothing then: still not fulfilled.
    unreported = older_reservation(committed)
    assert (unreported.status, unreported.fulfilled) == (ReservationStatus.COMMITTED, False)


def test_an_older_fulfilled_reservation_can_still_be_released() -> None:
    items = {"P1": stocked("P1", 5)}
    reserve_all(items, [StockLine("P1", 2)], "T1")
    reservation = older_reservation(ReservationFulfilled("T1"))
    release_reservation(reservation, items, "transaction_cancelled")
    assert items["P1"].available == 5


def test_expiry_is_reported_once_past_due_and_keeps_the_stock_held() -> None:
    items = {"P1": stocked("P1", 5)}
    reserve_all(items, [StockLine("P1", 2)], "T1")
    reservation = held("T1", StockLine("P1", 2), expires_at=NOW)
    with pytest.raises(BusinessRuleViolation, match="expires at"):
        reservation.expire(NOW - timedelta(seconds=1))
    reservation.expire(NOW)
    expired = reservation.pending[-1]
    assert isinstance(expired, ReservationExpired)
    assert (expired.transaction_id, expired.expires_at) == ("T1", NOW.isoformat())
    assert reservation.status is ReservationStatus.RESERVED and reservation.expired
    assert items["P1"].available == 3  # held until the transaction decides
    assert not reservation.is_expired(NOW + timedelta(days=1))
    with pytest.raises(BusinessRuleViolation, match="reported already"):
        reservation.expire(NOW + timedelta(days=1))
    release_reservation(reservation, items, "expired")  # the sale was given up
    assert items["P1"].available == 5


def test_an_older_fulfilled_reservation_never_expires() -> None:
    reservation = older_reservation(ReservationFulfilled("T1"))
    assert not reservation.is_expired(NOW + timedelta(days=1))
    with pytest.raises(BusinessRuleViolation, match="no longer expires"):
        reservation.expire(NOW + timedelta(days=1))


def test_a_committed_reservation_never_expires() -> None:
    reservation = held("T1", StockLine("P1", 2), expires_at=NOW)
    reservation.commit()
    assert not reservation.is_expired(NOW + timedelta(days=1))
