"""The event store port: what every adapter (SQLite, PostgreSQL) must do, and nothing more.

Writes go through a `UnitOfWork`: appends to streams, inbox marks, subscription checkpoints
and documents are buffered, then committed atomically by the adapter in one database
transaction. No lock is held while a handler awaits something else (a bank call, say), and
an adapter may commit many units of work in one database transaction (group commit).
Reads see committed state (plus, within a unit of work, its own documents).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Self

from magasin.observability import metrics
from magasin.shared.clock import utcnow
from magasin.shared.errors import StorageError, Unavailable
from magasin.shared.messages import JsonDict, NewEvent, RecordedEvent

_SEEN_KEPT: Final = 50_000
LogReader = Callable[[int, int], Awaitable[list[RecordedEvent]]]
"""Reads the log after a position, up to a number of events (read_all, LogWindow.read)."""
"""Streams whose last committed version a store remembers (see seen_version)."""
ANY: Final = None
"""Expected version that accepts whatever version the stream is at."""
NO_STREAM: Final = 0
"""Expected version of a stream that must not exist yet."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of one stream's aggregate as of `version`, as the aggregate serialised it."""

    stream_id: str
    version: int
    state: Mapping[str, Any]
    schema_version: int = 1
    taken_at: datetime = field(default_factory=utcnow)
    event_at: datetime | None = None
    """When the event at `version` occurred: a point-in-time read may start from this
    snapshot only if that moment is not after the time asked for."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events `read_events` returns: every criterion given must hold (empty = any)."""

    stream_id: str | None = None
    aggregates: tuple[str, ...] = ()
    """Aggregate types, the part of a stream id before its first `-`."""
    types: tuple[str, ...] = ()
    correlation_id: str | None = None
    since: datetime | None = None
    """Events that occurred at or after this moment."""
    until: datetime | None = None
    """Events that occurred at or before this moment."""


@dataclass(frozen=True, slots=True)
class Append:
    stream_id: str
    events: tuple[NewEvent, ...]
    expected_version: int | None


@dataclass(frozen=True, slots=True)
class ExpectVersion:
    """The commit fails with ConcurrencyError unless the stream is at `version` (0: no
    event) before the unit's own appends: a state decided on without reading the stream
    (a cached aggregate) is checked so, whether the unit writes to that stream or not.
    With `before`, only events at global positions up to `before` count: those committed
    later are as a read at that moment would have missed them anyway."""

    stream_id: str
    version: int
    before: int | None = None


@dataclass(frozen=True, slots=True)
class MarkProcessed:
    consumer: str
    event_id: str


@dataclass(frozen=True, slots=True)
class SetCheckpoint:
    name: str
    position: int
    expected: int | None = None
    """When set, the commit fails with ConcurrencyError unless the stored position (0 if
    none) is this one: a projection's swap or competing runner cannot lose an update."""


@dataclass(frozen=True, slots=True)
class PutDocument:
    collection: str
    key: str
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DeleteDocument:
    collection: str
    key: str


@dataclass(frozen=True, slots=True)
class ClearCollection:
    collection: str


@dataclass(frozen=True, slots=True)
class ReplaceCollection:
    """Every document of `target` is dropped and those of `source` become `target`'s."""

    target: str
    source: str


Operation = (
    Append | MarkProcessed | SetCheckpoint | PutDocument | DeleteDocument
    | ClearCollection | ReplaceCollection | ExpectVersion
)


@dataclass(frozen=True, slots=True)
class Causation:
    """Where the events of a unit of work come from: stamped on each of them."""

    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, event: RecordedEvent, **metadata: Any) -> Causation:
        """Events caused by handling `event` keep its correlation, trace and baggage (the
        metadata entry `baggage`: facts about the whole flow, like a W3C baggage header)."""
        if (baggage := event.metadata.get("baggage")) and "baggage" not in metadata:
            metadata = {"baggage": baggage, **metadata}
        return cls(event.correlation_id, event.event_id, event.traceparent, metadata)


class UnitOfWork:
    """Writes to apply atomically. Reads see committed state, except that `get_document`
    sees this unit's own document writes and a Repository its own aggregates."""

    def __init__(self, store: EventStore, causation: Causation | None = None) -> None:
        self.store = store
        self.causation = causation or Causation()
        self.operations: list[Operation] = []
        self.recorded: list[RecordedEvent] = []
        self.identity: dict[str, object] = {}
        """Aggregates loaded in this unit of work, by stream id (see Repository)."""
        self._documents: dict[tuple[str, str], Mapping[str, Any] | None] = {}
        self.committed_hooks: list[Callable[[], None]] = []
        self.failed_hooks: list[Callable[[], None]] = []
        self.trusts_cache = False
        """Set by a unit that always commits (a delivery: its inbox mark): a Repository may
        then give it a cached aggregate without reading the stream, checked at commit
        (see `trust`; a read-only unit has no commit to check it)."""
        self.guesses_new = False
        """Set by a delivery's first attempt: a Repository may then take a stream its
        handler expects to create for missing without reading it (`find(likely_new=True)`),
        checked at commit; the retry after a conflict does not guess."""
        self.trusted: dict[str, tuple[int, int | None]] = {}
        """Streams this unit took at a version without reading them, and the log head this
        process knew then (see `trust`)."""

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook` once this unit of work has committed (never if it does not)."""
        self.committed_hooks.append(hook)

    def new_event(
        self, type_name: str, payload: Mapping[str, Any], schema_version: int = 1
    ) -> NewEvent:
        """An event stamped with this unit of work's correlation, causation and trace."""
        c = self.causation
        return NewEvent(
            type=type_name, payload=payload, schema_version=schema_version,
            correlation_id=c.correlation_id,
            causation_id=c.causation_id, traceparent=c.traceparent, metadata=c.metadata,
        )

    def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None = ANY,
    ) -> None:
        if not events:
            raise ValueError("append needs at least one event")
        if expected_version is not None and expected_version < 0:
            raise ValueError("expected_version must be >= 0 or ANY")
        self.operations.append(Append(stream_id, tuple(events), expected_version))

    def after_failure(self, hook: Callable[[], None]) -> None:
        """Call `hook` if this unit of work's commit fails (a conflict, an outage)."""
        self.failed_hooks.append(hook)

    def trust(self, stream_id: str, version: int) -> None:
        """This unit decides on `stream_id` at `version` without having read it. The commit
        checks it (ConcurrencyError): an append to the stream expects that version anyway;
        otherwise no event past it may sit at a position this process knew of now (the
        store's known head), i.e. one a read now would have returned; events committed
        later are concurrent, as they would be after a read. Without a known head, the
        stream must not have moved at all."""
        self.trusted[stream_id] = (version, self.store.known_head())

    def version_checks(self) -> list[ExpectVersion]:
        """The checks `trust` asks for (made when the unit commits)."""
        written = {op.stream_id for op in self.operations
                   if isinstance(op, Append) and op.expected_version is not None}
        return [ExpectVersion(s, v, before) for s, (v, before) in self.trusted.items()
                if s not in written]

    def expect_version(self, stream_id: str, version: int) -> None:
        """The commit fails (ConcurrencyError) unless `stream_id` is at `version` then."""
        self.operations.append(ExpectVersion(stream_id, version))

    def mark_processed(self, consumer: str, event_id: str) -> None:
        """Inbox: the commit fails with AlreadyProcessed if this pair was committed before."""
        self.operations.append(MarkProcessed(consumer, event_id))

    def set_checkpoint(self, name: str, position: int, *, expected: int | None = None) -> None:
        """With `expected`, the commit fails (ConcurrencyError) if the checkpoint moved."""
        self.operations.append(SetCheckpoint(name, position, expected))

    def clear_collection(self, collection: str) -> None:
        """Delete every document of `collection` (reads of this unit do not see it)."""
        self.operations.append(ClearCollection(collection))

    def replace_collection(self, target: str, source: str) -> None:
        """Atomically make `source`'s documents those of `target` (source ends up empty)."""
        if target == source:
            raise ValueError("a collection cannot replace itself")
        self.operations.append(ReplaceCollection(target, source))

    def put_document(self, collection: str, key: str, body: Mapping[str, Any]) -> None:
        self.operations.append(PutDocument(collection, key, body))
        self._documents[collection, key] = body

    def delete_document(self, collection: str, key: str) -> None:
        self.operations.append(DeleteDocument(collection, key))
        self._documents[collection, key] = None

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> list[RecordedEvent]:
        return await self.store.read_stream(
            stream_id, from_version=from_version, to_version=to_version, until=until
        )

    async def get_document(self, collection: str, key: str) -> JsonDict | None:
        """The document as this unit of work left it (its own puts and deletes first)."""
        if (collection, key) in self._documents:
            staged = self._documents[collection, key]
            return None if staged is None else dict(staged)
        return await self.store.get_document(collection, key)


Applier = Callable[[UnitOfWork], Awaitable[None]]
"""Stages more writes into a unit of work about to commit (see EventStore.before_commit)."""


def _appended(operations: Sequence[Operation]) -> list[tuple[str, Mapping[str, Any]]]:
    """(type, metadata) of every event a list of operations appends."""
    return [(e.type, e.metadata) for op in operations if isinstance(op, Append) for e in op.events]


class EventStore(ABC):
    """Port of the event store. Adapters: `SqliteEventStore`, `PostgresEventStore`.

    Errors: ConcurrencyError (wrong expected version, nothing written), DuplicateEventError,
    AlreadyProcessed (inbox), NotFound, Unavailable (server unreachable), StorageError.
    """

    #: True when an outbox relay publishes what this store appends (distributed mode).
    outbox: bool = False
    #: True when the log itself is the event bus (an InProcessBus tails it: embedded mode), so
    #: a commit is a publish for the metrics. Elsewhere the outbox relay counts publishes,
    #: and a store without outbox that is no bus (the event store service's archive) none.
    log_is_bus: bool = False
    #: What `before_commit` registered, in order (an instance's own tuple once it has one).
    _appliers: tuple[Applier, ...] = ()
    #: Units of work whose `transaction()` block is open (being prepared or committing):
    #: an adapter may commit differently when one is alone (SQLite: without a thread hop).
    units_open: int = 0
    #: True when `wait_for_events` also returns for another process's commits (PostgreSQL:
    #: its NOTIFY); False when only this process's own commits wake a waiter and another
    #: process's are found by the next poll (SQLite), so a follower woken only by the own
    #: commits it cares about misses nothing it would have been woken for (see LogWindow.wait).
    wakes_for_other_processes: bool = True

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if it is missing (idempotent)."""

    @abstractmethod
    async def close(self) -> None: ...

    # -- writes -------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self, causation: Causation | None = None) -> AsyncIterator[UnitOfWork]:
        """Collect writes in the block; they commit together when it exits without error."""
        uow = UnitOfWork(self, causation)
        self.units_open += 1
        try:
            yield uow
        except BaseException:
            self.units_open -= 1
            raise
        await self._finish(uow)

    async def _finish(self, uow: UnitOfWork) -> None:
        """Commit a unit of work whose block ended (one of `units_open`, closed here)."""
        try:
            if uow.operations:
                for applier in self._appliers:
                    await applier(uow)
                await self._commit_unit(uow)
        finally:
            self.units_open -= 1
        for hook in uow.committed_hooks:
            hook()

    def before_commit(self, applier: Applier) -> None:
        """Run `applier` on every unit of work with operations, after its block and before
        its commit: what it stages commits with the rest (inline projections stage the
        documents of the events appended). Registered once per process, at start-up."""
        self._appliers = (*self._appliers, applier)

    async def _commit_unit(self, uow: UnitOfWork) -> None:
        if uow.operations:
            if uow.trusted:
                uow.operations += uow.version_checks()
            started = time.perf_counter()
            try:
                uow.recorded = await self.commit(uow.operations)
                metrics.STORE_COMMITS.inc()
            except BaseException as exc:
                for hook in uow.failed_hooks:
                    hook()
                if self.log_is_bus and isinstance(exc, Unavailable | StorageError):
                    metrics.published(_appended(uow.operations), "failed")
                raise
            if self.log_is_bus and uow.recorded:
                metrics.published(
                    ((e.type, e.metadata) for e in uow.recorded), "ok",
                    time.perf_counter() - started,
                )

    @abstractmethod
    async def commit(self, operations: Sequence[Operation]) -> list[RecordedEvent]:
        """Apply all operations in one database transaction, or none of them.

        Returns the recorded events of every Append, in order. An Append whose event ids are
        all stored already is a no-op that returns the stored events (idempotent retry).
        """

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None = ANY,
    ) -> list[RecordedEvent]:
        uow = UnitOfWork(self)  # a transaction() block, without the generator around it
        uow.append(stream_id, events, expected_version)
        self.units_open += 1
        await self._finish(uow)
        return uow.recorded

    # -- reads --------------------------------------------------------------------------

    @abstractmethod
    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order, within the inclusive bounds given;
        `until` keeps events that occurred at or before that moment."""

    async def read_latest(self, stream_id: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The stream's latest snapshot (None if none) and its events after it: what loading
        an aggregate needs, in one round trip where the adapter can."""
        snapshot = await self.load_snapshot(stream_id)
        after = snapshot.version if snapshot is not None else 0
        return snapshot, await self.read_stream(stream_id, from_version=after + 1)

    @abstractmethod
    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to `limit` events with global_position > `after`, in position order.

        Gap-safe: never returns an event while an earlier position may still commit, so a
        reader that keeps calling with the last position it saw sees every event once.
        """

    @abstractmethod
    async def read_events(
        self, where: EventFilter, *, after: int = 0, limit: int = 100,
        before: int | None = None, descending: bool = False,
    ) -> list[RecordedEvent]:
        """Up to `limit` events matching `where` with `after` < global_position < `before`,
        in position order (`descending`: newest first): for browsing and historical
        queries. Unlike `read_all` it is not gap-safe (an event may commit later below the
        last position returned): never tail with it."""

    @abstractmethod
    async def read_event(self, event_id: str) -> RecordedEvent:
        """One event by id; NotFound if there is none."""

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """Current version of a stream, 0 if it has no event."""

    def known_version(self, stream_id: str) -> int | None:
        """The stream's current version without a query, when the adapter knows it: this
        process wrote the stream last and no other connection committed since (SQLite's
        single writer can tell); None when only a query can tell (always on PostgreSQL,
        whose writers are many processes)."""
        return None

    @abstractmethod
    async def last_position(self) -> int:
        """Highest global position committed so far (0 for an empty log)."""

    def seen_version(self, stream_id: str) -> int | None:
        """The version this process's last commit to `stream_id` took it to, known as soon
        as the commit is (before its writer resumes); None if it does not remember one."""
        seen: dict[str, int] | None = getattr(self, "_seen_versions", None)
        return None if seen is None else seen.get(stream_id)

    def on_commit(self, listener: Callable[[Sequence[RecordedEvent]], None]) -> None:
        """Call `listener` with the events of each commit of this process, as soon as the
        commit is known (before its writer resumes), in position order."""
        listeners: list[Callable[[Sequence[RecordedEvent]], None]] | None = getattr(
            self, "_commit_listeners", None)
        if listeners is None:
            listeners = []
            self._commit_listeners = listeners
        listeners.append(listener)

    def _saw(self, recorded: Sequence[RecordedEvent]) -> None:
        """Adapters call this with a commit's recorded events the moment it is known."""
        if not recorded:
            return
        for listener in getattr(self, "_commit_listeners", ()):
            listener(recorded)
        seen: OrderedDict[str, int] | None = getattr(self, "_seen_versions", None)
        if seen is None:
            seen = OrderedDict()
            self._seen_versions = seen
        for event in recorded:
            if seen.get(event.stream_id, 0) < event.stream_version:
                seen[event.stream_id] = event.stream_version
                seen.move_to_end(event.stream_id)
        while len(seen) > _SEEN_KEPT:
            seen.popitem(last=False)

    def known_head(self) -> int | None:
        """The highest position this process saw committed, without a query, when the
        adapter knows it (a single writer); None otherwise. Another process writing the
        same store is not seen here: a reader may trust it only for a short while."""
        return None

    @abstractmethod
    async def wait_for_events(self, after: int, timeout: float) -> None:
        """Return soon after an event past `after` may be readable, or after `timeout` s."""

    def commit_signal(self) -> asyncio.Event | None:
        """An event set at the next commit of events that this process makes or hears of
        (each commit sets the current one and puts a fresh one in its place): taken before
        a look at the store, it cannot miss a commit that look did not see, not even one
        filling a hole below the head. None when the adapter cannot tell (then poll)."""
        return None

    # -- subscriptions, inbox, documents ------------------------------------------------

    @abstractmethod
    async def get_checkpoint(self, name: str) -> int:
        """Last position stored for a subscription, 0 if none."""

    @abstractmethod
    async def is_processed(self, consumer: str, event_id: str) -> bool: ...

    @abstractmethod
    async def get_document(self, collection: str, key: str) -> JsonDict | None: ...

    async def get_documents(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], JsonDict]:
        """The documents of these (collection, key) pairs that exist, by pair: in one read
        where the adapter can (PostgreSQL: one round trip), else one read each."""
        found: dict[tuple[str, str], JsonDict] = {}
        for collection, key in dict.fromkeys(keys):
            if (doc := await self.get_document(collection, key)) is not None:
                found[collection, key] = doc
        return found

    @abstractmethod
    async def find_documents(
        self,
        collection: str,
        *,
        where: Mapping[str, str | int | bool] | None = None,
        after_key: str | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[tuple[str, JsonDict]]:
        """(key, body) pairs in key order; `where` matches top-level fields for equality.
        `descending`: in reverse key order, `after_key` then being the key the page goes on
        below (the last key of the previous page either way)."""

    # -- snapshots ----------------------------------------------------------------------

    @abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep this snapshot; a stream keeps one per version (saving a version again
        replaces it), so past states can start from the snapshot that preceded them."""

    @abstractmethod
    async def load_snapshot(
        self,
        stream_id: str,
        *,
        max_version: int | None = None,
        until: datetime | None = None,
    ) -> Snapshot | None:
        """The stream's snapshot of the highest version, among those at or below
        `max_version` and whose `event_at` is at or before `until` when these are given."""

    # -- outbox -------------------------------------------------------------------------

    @abstractmethod
    def outbox_batch(self, limit: int, *, log: bool = False,
                     read: LogReader | None = None) -> AbstractOutboxBatch:
        """Claim up to `limit` events of one stage of the outbox (oldest first) until the
        block exits.

        An appended event waits twice: to be published to the consumers of its type
        (`log=False`), then to be shipped with others, as one message, to the consumers of
        the whole log (`log=True`: an archive, an audit). On a clean exit the claimed
        events move on (from the first stage to the second, out of the outbox from the
        second); on an exception they stay where they were. One batch of a stage is claimed
        at a time: in the process, a second claim waits for the first to end; across the
        processes of one store, one of them relays and the others' claims get nothing.
        `read(after, limit)` reads the log where the outbox is a position in it
        (PostgreSQL; default `read_all`): a relay passes the window its process's readers
        share (eventstore.window).
        """

    @property
    def relays_outbox(self) -> bool | None:
        """Whether this process is the one that relays the store's outbox (of the processes
        sharing the store, one at a time does); None without an outbox."""
        return True if self.outbox else None

    @abstractmethod
    async def outbox_backlog(self, *, log: bool = False) -> int:
        """How many events wait in one stage of the outbox, claimed or not (0 without an
        outbox): to be published (default), or to be shipped to the whole log's consumers."""


class AbstractOutboxBatch(ABC):
    """Async context manager returned by `EventStore.outbox_batch`."""

    @abstractmethod
    async def __aenter__(self) -> list[RecordedEvent]: ...

    @abstractmethod
    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None: ...
