"""One document read as its stream has it now (seed 6.2.2): the read model's when it is up
to date, else the stream's events folded with the projection's own function."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from magasin.eventstore.store import EventStore
from magasin.shared.messages import JsonDict, RecordedEvent

Apply = Callable[[JsonDict | None, RecordedEvent], JsonDict | None]
"""A projection's step for one document: the document once an event is applied, carrying
`version`, the stream version it reflects."""


def folded(apply: Apply, kinds: Collection[str], events: Iterable[RecordedEvent]
           ) -> JsonDict | None:
    """The document a stream folds to: what the projection will write (None: nothing)."""
    doc: JsonDict | None = None
    for event in events:
        if event.type in kinds:
            doc = apply(doc, event)
    return doc


async def current(store: EventStore, collection: str, key: str, stream: str, apply: Apply,
                  kinds: Collection[str]) -> JsonDict | None:
    """The document `key` of `collection` when its `version` has caught up with `stream`;
    otherwise (missing, or older: the projection lags) the stream folded by `apply`."""
    doc = await store.get_document(collection, key)
    if doc is not None and doc.get("version", 0) >= await store.stream_version(stream):
        return doc
    return folded(apply, kinds, await store.read_stream(stream))
