"""Envelopes read from the store decode their JSON and time lazily, and behave as eager ones."""

from __future__ import annotations

import dataclasses
import gc
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from magasin.eventstore.rows import StoredEvent, collector_paused
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.shared.clock import to_micros
from magasin.shared.errors import StorageError
from magasin.shared.events import SCHEMAS
from magasin.shared.messages import NewEvent, RecordedEvent

AT = datetime(2024, 5, 1, 12, 0, 0, 654321, tzinfo=UTC)
PAYLOAD = {"transaction_id": "t-1", "lines": [{"product_id": "p", "quantity": 2}]}
META = {"service": "transaction"}


def eager() -> RecordedEvent:
    return RecordedEvent("e-1", "Thing", 1, "cart-1", 3, 42, AT, "c", None, None, META,
                         PAYLOAD)


def lazy(payload: str = orjson.dumps(PAYLOAD).decode(),
         metadata: str | bytes = orjson.dumps(META)) -> StoredEvent:
    return StoredEvent("e-1", "Thing", 1, "cart-1", 3, 42, to_micros(AT), "c", None, None,
                       metadata, payload)


def test_a_stored_event_decodes_to_the_values_an_eager_one_holds() -> None:
    event = lazy()

    assert event.payload == PAYLOAD
    assert event.metadata == META
    assert event.occurred_at == AT
    assert event.occurred_at.tzinfo is not None
    assert isinstance(event, RecordedEvent)


def test_stored_and_eager_envelopes_compare_by_value_both_ways() -> None:
    assert lazy() == eager()
    assert eager() == lazy()
    assert lazy() != dataclasses.replace(eager(), payload={"other": 1})
    assert lazy() != "not an event"


def test_a_field_is_decoded_once_and_then_kept() -> None:
    event = lazy()

    assert event.payload is event.payload
    assert event.occurred_at is event.occurred_at


def test_replace_on_a_stored_event_keeps_every_decoded_field() -> None:
    changed = dataclasses.replace(lazy(), traceparent="00-abc-def-01")

    assert changed.traceparent == "00-abc-def-01"
    assert changed.payload == PAYLOAD
    assert changed.metadata == META
    assert changed.occurred_at == AT
    assert changed == dataclasses.replace(eager(), traceparent="00-abc-def-01")


def test_a_stored_event_serialises_like_an_eager_one() -> None:
    assert orjson.loads(lazy().to_json()) == orjson.loads(eager().to_json())
    assert "payload" in repr(lazy())


def test_upcasting_a_stored_event_changes_its_payload() -> None:
    upcast = dataclasses.replace(lazy(), payload={"v": 2}, schema_version=2)

    assert upcast.payload == {"v": 2}
    assert upcast.schema_version == 2


def test_stored_json_that_does_not_parse_raises_a_storage_error_when_read() -> None:
    event = lazy(payload='{"transaction_id": ')  # building it does not decode

    assert event.type == "Thing"
    with pytest.raises(StorageError, match=r"e-1 \(position 42\).*payload is not valid JSON"):
        _ = event.payload
    assert event.metadata == META  # the other fields still read


def test_stored_json_that_is_not_an_object_raises_a_storage_error() -> None:
    with pytest.raises(StorageError, match="metadata is not a JSON object"):
        _ = lazy(metadata=b"[1, 2]").metadata


async def test_a_corrupt_stored_payload_fails_its_reader_not_the_whole_page(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "log.db") as store:
        _, bad = await store.append("cart-1", [NewEvent("A", {"n": 1}),
                                                NewEvent("B", {"n": 2})])
        conn = sqlite3.connect(tmp_path / "log.db")
        with conn:
            conn.execute("UPDATE events SET payload = '{not json' WHERE event_id = ?",
                         (bad.event_id,))
        conn.close()

        first, second = await store.read_all()

        assert first.payload == {"n": 1}
        assert second.type == "B"
        with pytest.raises(StorageError, match=bad.event_id):
            _ = second.payload


async def test_validation_reads_a_lazy_payload(tmp_path: Path) -> None:
    # The schema registry validates event.payload: a lazy one must look like any mapping.
    async with SqliteEventStore(tmp_path / "log.db") as store:
        created = {"transaction_id": "t-1", "store_id": "s-1", "customer_id": "c-1",
                   "lines": [{"product_id": "p-1", "quantity": 1, "unit_price": 100}],
                   "total": 100, "currency": "CAD", "payment_method": "VISA"}
        await store.append("transaction-t-1", [NewEvent("TransactionCreated", created)])
        (event,) = await store.read_all()

        assert isinstance(event, StoredEvent)
        assert SCHEMAS.validate(event).transaction_id == "t-1"


async def test_reading_pages_leaves_the_garbage_collector_as_it_found_it(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "log.db") as store:
        await store.append("cart-1", [NewEvent("A", {"n": i}) for i in range(3)])

        assert len(await store.read_all()) == 3
        assert gc.isenabled()
        gc.disable()
        try:
            assert len(await store.read_stream("cart-1")) == 3
            assert not gc.isenabled()  # paused by someone else: not ours to resume
        finally:
            gc.enable()


def test_the_collector_resumes_when_converting_a_page_fails() -> None:
    with pytest.raises(ValueError, match="cannot convert"), collector_paused():
        assert not gc.isenabled()
        raise ValueError("a row that cannot convert")

    assert gc.isenabled()
