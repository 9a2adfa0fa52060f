"""Conversions between stored rows and envelopes shared by the SQL adapters."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import orjson

from magasin.shared.clock import from_micros
from magasin.shared.errors import StorageError
from magasin.shared.messages import RecordedEvent

EVENT_COLUMNS = (
    "global_position, event_id, stream_id, stream_version, type, schema_version, "
    "occurred_at, correlation_id, causation_id, traceparent, metadata, payload"
)
ENVELOPE_COLUMNS = (
    "event_id, type, schema_version, stream_id, stream_version, global_position, "
    "occurred_at, correlation_id, causation_id, traceparent, metadata, payload"
)
"""The same columns in StoredEvent's argument order: a row converts with StoredEvent(*row)."""


def dumps(value: Mapping[str, Any]) -> str:
    return orjson.dumps(value).decode()


_TEXT = (str, bytes)  # a tuple: `str | bytes` would build a union at every test


class StoredEvent(RecordedEvent):
    """An envelope read from the store, which decodes its JSON and its time on first use.

    Reading the log builds hundreds of thousands of envelopes a second, and most readers
    look at few of their fields (a projection skips the types it does not handle, a tailing
    bus the events of other aggregates): decoding `metadata` and `payload` (orjson) and
    `occurred_at` (a datetime from microseconds) for all of them cost four times the
    query. `metadata` and `payload` may be given as JSON text, `occurred_at` as
    microseconds since the epoch; each becomes its value when first read, once. Stored
    JSON that does not parse raises StorageError then, naming the event.
    """

    __slots__ = ("_metadata", "_occurred_at", "_payload")

    def __init__(
        self,
        event_id: str,
        type: str,
        schema_version: int,
        stream_id: str,
        stream_version: int,
        global_position: int,
        occurred_at: datetime | int,
        correlation_id: str | None,
        causation_id: str | None,
        traceparent: str | None,
        metadata: Mapping[str, Any] | str | bytes,
        payload: Mapping[str, Any] | str | bytes,
    ) -> None:
        # Arguments in field order, as dataclasses.replace passes them back by name.
        self.event_id = event_id
        self.type = type
        self.schema_version = schema_version
        self.stream_id = stream_id
        self.stream_version = stream_version
        self.global_position = global_position
        self._occurred_at = occurred_at
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.traceparent = traceparent
        self._metadata = metadata
        self._payload = payload

    @property
    def occurred_at(self) -> datetime:
        value = self._occurred_at
        if type(value) is int:
            value = self._occurred_at = from_micros(value)
        return value  # type: ignore[return-value]

    @occurred_at.setter
    def occurred_at(self, value: datetime) -> None:
        self._occurred_at = value

    @property
    def metadata(self) -> Mapping[str, Any]:
        value = self._metadata
        if isinstance(value, _TEXT):
            value = self._metadata = self._decode("metadata", value)
        return value

    @metadata.setter
    def metadata(self, value: Mapping[str, Any]) -> None:
        self._metadata = value

    @property
    def payload(self) -> Mapping[str, Any]:
        value = self._payload
        if isinstance(value, _TEXT):
            value = self._payload = self._decode("payload", value)
        return value

    @payload.setter
    def payload(self, value: Mapping[str, Any]) -> None:
        self._payload = value

    def _decode(self, what: str, text: str | bytes) -> Mapping[str, Any]:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise StorageError(
                f"event {self.event_id} (position {self.global_position}): its stored "
                f"{what} is not valid JSON: {exc}"
            ) from exc
        if not isinstance(value, dict):
            raise StorageError(
                f"event {self.event_id} (position {self.global_position}): its stored "
                f"{what} is not a JSON object"
            )
        return value


def event_from_row(row: Any) -> RecordedEvent:
    """An envelope from a row laid out as EVENT_COLUMNS (rows in ENVELOPE_COLUMNS order are
    cheaper: StoredEvent(*row))."""
    return StoredEvent(
        row[1], row[4], row[5], row[2], row[3], row[0], row[6],
        row[7], row[8], row[9], row[10], row[11],
    )


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a page of rows becomes envelopes.

    A page of 5,000 events allocates some 10,000 objects the collector tracks (row
    tuples, envelopes), which triggered a dozen young collections and, through them,
    older ones: a third of reading the log, measured (SQLite read_all: ~450,000 events/s
    with the collector running, ~600,000 paused; the bare driver: ~650,000). The block
    must not await: paused, no other task runs meanwhile, and the collector runs again
    as soon as it resumes. If it was disabled already, it stays so."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
