"""Identifiers: time-ordered ids sort in creation order and are valid UUIDv7."""

from __future__ import annotations

import os
import time
import uuid

from magasin.shared.ids import aggregate_of, hex_id, new_id, stream_id, time_ordered_id


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


def test_random_ids_are_uuid4_in_canonical_text_and_do_not_repeat() -> None:
    ids = [new_id() for _ in range(20_000)]  # several refills of the pooled randomness
    assert len(set(ids)) == len(ids)
    for text in ids[::997]:
        value = uuid.UUID(text)
        assert (value.version, value.variant, str(value)) == (4, uuid.RFC_4122, text)


def test_hex_ids_are_uuid4_in_uuid4_hex_form_and_do_not_repeat() -> None:
    ids = [hex_id() for _ in range(5_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[::499]:
        value = uuid.UUID(hex=text)
        assert (value.version, value.variant, value.hex) == (4, uuid.RFC_4122, text)


def test_a_forked_child_does_not_hand_out_its_parent_s_next_ids() -> None:
    new_id()  # the pool holds randomness the parent has not used yet
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    assert theirs != new_id()
