"""What a projection is, and the unit of document changes its handlers write into."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.shared.errors import ConcurrencyError
from magasin.shared.messages import JsonDict, RecordedEvent

log = logging.getLogger("magasin.projections")

SHADOW_SUFFIX = "~rebuild"


def checkpoint_name(projection: str) -> str:
    return f"projection:{projection}"


def generation_name(projection: str) -> str:
    """Bumped by each swap of a rebuild: a live batch computed from the documents the swap
    replaced must not commit over them. Negative while a rebuild holds the swap fence."""
    return f"projection:{projection}:generation"


FENCE_TIMEOUT_S = 30.0
"""How long live runners wait on a rebuild's swap fence before they break it (the
rebuild died holding it); a rebuild that is merely slow then fences again."""


def fenced(generation: int) -> int:
    """The generation's value while a rebuild swaps in: live batches stop committing (their
    expected generation no longer matches) and wait until the swap sets `generation + 1`.
    Without the fence a swap raced every live commit and could lose for ever under a
    steady stream of events; with it, it wins on the first try."""
    return -(generation + 1)


async def live_generation(
    store: EventStore, projection: str, poll: float, on_wait: Callable[[], None] | None = None,
) -> int:
    """The projection's generation once no swap fence holds it (see `fenced`): waits while
    one does, and breaks a fence older than FENCE_TIMEOUT_S."""
    name = generation_name(projection)
    generation = await store.get_checkpoint(name)
    if generation >= 0:
        return generation
    loop = asyncio.get_running_loop()
    since, held = loop.time(), generation
    while generation < 0:
        if on_wait is not None:
            on_wait()
        if generation != held:
            since, held = loop.time(), generation
        elif loop.time() - since > FENCE_TIMEOUT_S:
            try:
                async with store.transaction() as uow:
                    uow.set_checkpoint(name, -generation, expected=generation)
            except ConcurrencyError:
                pass  # the swap (or another runner) moved it meanwhile
            else:
                log.warning("projection %s: broke a swap fence held for %.0f s",
                            projection, FENCE_TIMEOUT_S)
        await asyncio.sleep(min(poll, 0.05))
        generation = await store.get_checkpoint(name)
    return generation


ElsewhereHook = Callable[[EventStore, list[RecordedEvent]], Awaitable[None]]


def shadow_of(collection: str) -> str:
    return collection + SHADOW_SUFFIX


@dataclass(frozen=True)
class Projection:
    """A read model: `handlers` turn the events of the service's own log into documents of
    `collections`, and nothing else writes them."""

    name: str
    handlers: Mapping[str, ProjectionHandler]
    collections: tuple[str, ...]
    elsewhere: ElsewhereHook | None = None
    """Told of the events another process's runner projected (this one lost the race to
    commit them), once committed: what the projection wakes in this process on a commit
    (live clients) it wakes for those too. Of an inline projection, told of the events
    another process applied inline (its runner finds them applied)."""
    inline: bool = False
    """Applied in the unit of work that appends its events (see projections.inline): each
    document is changed by the events of one stream only, carries the stream version it
    reflects as `version`, and its handlers change nothing for an event at or below it.
    The runner still tails the log, to apply what was appended without it."""
    background: bool = False
    """No sale waits on its documents (the audit chain, the stock lines): its runner may
    let the events of many sales gather into each of its commits in every mode (see
    ProjectionRunner's `linger`), where the other read models linger only distributed. A
    request that must show what was committed before it calls `runner.fresh` first."""

    def __post_init__(self) -> None:
        if not self.handlers:
            raise ValueError(f"projection {self.name!r} handles no event type")
        if not self.collections:
            raise ValueError(f"projection {self.name!r} owns no collection")

    @property
    def checkpoint(self) -> str:
        return checkpoint_name(self.name)


class DocumentCache:
    """Documents a projection run has seen, by (collection, key). `complete` means it holds
    every document of its collections (a rebuild into emptied shadows), so a miss is an
    absent document and needs no read."""

    def __init__(self, size: int = 200_000, complete: bool = False) -> None:
        self.size = size
        self.complete = complete
        self.docs: dict[tuple[str, str], JsonDict | None] = {}

    def merge(self, changes: Mapping[tuple[str, str], JsonDict | None]) -> None:
        self.docs.update(changes)
        if len(self.docs) > self.size:
            self.docs.clear()
            self.complete = False


class ProjectionUnit:
    """The document changes of one batch: staged in memory (the last write of a key wins),
    read back by the handlers, then staged into one unit of work with the checkpoint.

    `rename` sends a collection to another (its shadow during a rebuild); handlers always
    name the live collection."""

    def __init__(
        self,
        store: EventStore,
        rename: Mapping[str, str] | None = None,
        cache: DocumentCache | None = None,
    ) -> None:
        self.store = store
        self.rename = rename or {}
        self.cache = cache
        self.changes: dict[tuple[str, str], JsonDict | None] = {}
        self.hooks: list[Callable[[], None]] = []

    async def get_document(self, collection: str, key: str) -> JsonDict | None:
        where = (self.rename.get(collection, collection), key) if self.rename else (
            collection, key)
        staged: JsonDict | None = self.changes.get(where, ABSENT)
        if staged is not ABSENT:
            return staged
        cache = self.cache
        if cache is not None:
            doc: JsonDict | None = cache.docs.get(where, ABSENT)
            if doc is not ABSENT:
                return None if doc is None else copy_doc(doc)
            if cache.complete:
                return None
            # Only the projection writes its collections, and it reads only those: what it
            # reads now stays true until its own next commit (a failed one drops the cache).
            found = await self.store.get_document(*where)
            cache.docs[where] = found
            return None if found is None else copy_doc(found)
        return await self.store.get_document(*where)

    def put_document(self, collection: str, key: str, body: JsonDict) -> None:
        """Stage `body` as the document; the handler must not change it afterwards except
        through another put (it is kept, not copied)."""
        self.changes[self.rename.get(collection, collection), key] = body

    def delete_document(self, collection: str, key: str) -> None:
        self.changes[self.rename.get(collection, collection), key] = None

    def after_commit(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)

    def stage(self, uow: UnitOfWork) -> None:
        for (collection, key), body in self.changes.items():
            if body is None:
                uow.delete_document(collection, key)
            else:
                uow.put_document(collection, key, body)
        for hook in self.hooks:
            uow.after_commit(hook)

    def committed(self) -> None:
        if self.cache is not None:
            self.cache.merge(self.changes)


ABSENT: Any = object()


def copy_doc(doc: JsonDict) -> JsonDict:
    """A document handlers may change in place (the cached one may be being written): its
    lists are copied too (histories, lines); handlers never change list items in place."""
    copy = dict(doc)
    for k, v in doc.items():
        if type(v) is list:
            copy[k] = v.copy()
    return copy


ProjectionHandler = Callable[[RecordedEvent, ProjectionUnit], Awaitable[None]]


async def project(
    projection: Projection, events: list[RecordedEvent], unit: ProjectionUnit
) -> None:
    """Apply each event the projection handles, in log order."""
    handlers = projection.handlers
    for event in events:
        handler = handlers.get(event.type)
        if handler is not None:
            await handler(event, unit)

