"""Identifiers: time-ordered ids sort in creation order and are valid UUIDv7."""

from __future__ import annotations

import time
import uuid

from magasin.shared.ids import aggregate_of, stream_id, time_ordered_id


def test_time_ordered_ids_sort_in_creation_order_even_within_one_millisecond() -> None:
    ids = [time_ordered_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_time_ordered_ids_are_uuid7_stamped_with_the_current_millisecond() -> None:
    value = uuid.UUID(time_ordered_id())
    assert (value.version, value.variant) == (7, uuid.RFC_4122)
    assert abs((value.int >> 80) - time.time_ns() // 1_000_000) < 5_000


def test_a_stream_id_names_its_aggregate() -> None:
    assert aggregate_of(stream_id("stock", "s-1:p-1")) == "stock"
