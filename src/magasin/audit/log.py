"""The audit log in the event store, outside the business log: the consumer and sequencer
that chain entries (distributed), the projection that does it in embedded mode, and the
reads (trail, range, verification).

The chain is not in the event log: its entries are documents of `audit.entries` (key: the
zero-padded sequence number), with the head (sequence and hash of the last entry) in
`audit.head`, committed with them. No business consumer, projection or `read_all` ever
sees an entry, and the audit publishes nothing.

Distributed, the audit consumer (`Chainer`) chains each event in the unit of work of the
batch it came in, with the batch's inbox marks, moving the checkpoint `audit:chain` from
the head's sequence (a conditional write): two audit processes conflict on it and the loser
delivers its batch again from the new head, so an entry is chained exactly once. Before
2026-12-07 the consumer staged each event as a pending document and a sequencer loop
chained them (five row writes an event more, and a commit of its own); the `Sequencer`
still chains whatever an earlier version left staged.

Embedded, every event is in this process's log already: a projection chains them in log
order, a batch per commit with its checkpoint, and no event is staged or delivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from magasin.audit import domain
from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging.bus import Handler
from magasin.projections import Projection, ProjectionUnit
from magasin.shared.errors import ConcurrencyError
from magasin.shared.events import SCHEMAS
from magasin.shared.messages import RecordedEvent

LOG = "audit-log"
"""The key of the chain's head document."""
ENTRIES = "audit.entries"
"""The chained entries, one document each, keyed by `entry_key(sequence)`."""
PENDING = "audit.pending"
"""Entries staged by versions before 2026-12-07, which the Sequencer chains."""
HEAD = "audit.head"
TRAILS = "audit.trails"
"""One document per correlation id: the sequence numbers of its entries."""
CHAIN = "audit:chain"
"""The sequencer's checkpoint: the head's sequence, moved conditionally."""
CONSUMER = "audit"
PROJECTION = "audit.chain"
MAX_CONFLICTS = 20
TRAILS_KEPT = 10_000
"""Trails a sequencer remembers between its commits (a sale's entries come in several)."""

log = logging.getLogger("magasin.audit")

Alert = Callable[[str, RecordedEvent], None]


def entry_key(sequence: int) -> str:
    return f"{sequence:012d}"


def entry_of(event: RecordedEvent) -> dict[str, Any]:
    """What the audit keeps of an event (before it is chained)."""
    return {
        "event_id": event.event_id,
        "event_type": event.type,
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "occurred_at": event.occurred_at.isoformat(),
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "service": event.metadata.get("service") or event.aggregate,
        "scopes": domain.scopes_of(event.type, event.payload),
        "payload": dict(event.payload),
    }


def projection(alert: Alert) -> Projection:
    """Embedded: the chain as a projection of the log, every event in log order."""

    async def link(event: RecordedEvent, unit: ProjectionUnit) -> None:
        head = await unit.get_document(HEAD, LOG) or {"sequence": 0, "hash": domain.GENESIS}
        sequence = int(head["sequence"]) + 1
        linked = domain.chain(entry_of(event), sequence, str(head["hash"]))
        unit.put_document(ENTRIES, entry_key(sequence), linked)
        if cid := event.correlation_id:
            trail = await unit.get_document(TRAILS, cid) or {"sequences": []}
            unit.put_document(TRAILS, cid, {"sequences": [*trail["sequences"], sequence]})
        unit.put_document(HEAD, LOG, {"sequence": sequence, "hash": linked["hash"]})
        kind = domain.ALERTS.get(event.type)
        if kind is not None:
            unit.after_commit(lambda: alert(kind, event))

    return Projection(PROJECTION, dict.fromkeys(sorted(SCHEMAS.types), link),
                      (ENTRIES, HEAD, TRAILS), background=True)


class _Memory:
    """What a chainer trusts between its own commits instead of reading it again: the head
    its last commit left, and the trails it wrote since it last read the head. The
    conditional checkpoint fails its commit if another chainer moved the chain meanwhile;
    it then forgets, and reads everything afresh."""

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None
        self.trails: OrderedDict[str, list[int]] = OrderedDict()
        """Most recent last."""

    async def head_of(self, store: EventStore) -> dict[str, Any]:
        if self.head is None:
            self.trails.clear()
            return await store.get_document(HEAD, LOG) or {"sequence": 0,
                                                          "hash": domain.GENESIS}
        return self.head

    async def trails_of(self, store: EventStore,
                        cids: Iterable[str | None]) -> dict[str, list[int]]:
        """The trails of these correlation ids as they stand: those written last from
        memory, the others in one read (a sale's first entries find none)."""
        trails: dict[str, list[int]] = {}
        unknown: list[tuple[str, str]] = []
        for cid in dict.fromkeys(filter(None, cids)):
            known = self.trails.get(cid)
            if known is None:
                unknown.append((TRAILS, cid))
            else:
                trails[cid] = list(known)
        found = await store.get_documents(unknown) if unknown else {}
        for pair in unknown:
            doc = found.get(pair) or {"sequences": []}
            trails[pair[1]] = [int(n) for n in doc["sequences"]]
        return trails

    def committed(self, sequence: int, last: str, trails: dict[str, list[int]]) -> None:
        self.head = {"sequence": sequence, "hash": last}
        for cid, trail in trails.items():
            self.trails[cid] = trail
            self.trails.move_to_end(cid)
        while len(self.trails) > TRAILS_KEPT:
            self.trails.popitem(last=False)

    def forget(self) -> None:
        self.head = None  # moved by another chainer, or not known to be written


class Sequencer:
    """Appends pending entries (staged by versions before 2026-12-07) to the chain, in key
    order, a batch per commit, trusting its `_Memory` between its own commits."""

    def __init__(self, store: EventStore, batch: int = 500, poll: float = 1.0) -> None:
        self.store = store
        self.batch = batch
        self.poll = poll
        self._memory = _Memory()

    async def run(self) -> None:
        conflicts = 0
        while True:
            try:
                if await self.step() >= self.batch:
                    conflicts = 0
                    continue  # more may be pending; a short batch took all there was
                conflicts = 0
            except ConcurrencyError:
                # Another chainer went first: start over from its head, after a little
                # jitter. Conflicts that never end mean the head and the checkpoint
                # audit:chain disagree (rows changed by hand): say so, and keep trying at
                # the poll pace.
                conflicts += 1
                if conflicts < MAX_CONFLICTS:
                    await asyncio.sleep(random.uniform(0, 0.01 * conflicts))
                    continue
                log.error("audit chain head does not match the checkpoint %s; "
                          "GET /api/audit/verify tells where", CHAIN)
            except Exception:
                log.exception("audit sequencer step failed; retrying")
            await asyncio.sleep(self.poll)

    async def step(self) -> int:
        """Chain one batch of pending entries; returns how many (0: none was pending)."""
        # The head before the pending entries: an entry another sequencer chained after
        # this head was read then fails this one's commit (the checkpoint moved), while
        # read the other way round, a head read after that chaining let entries read
        # pending before it be chained a second time.
        head = await self._memory.head_of(self.store)
        pending = await self.store.find_documents(PENDING, limit=self.batch)
        if not pending:
            return 0
        sequence, last = int(head["sequence"]), str(head["hash"])
        trails = await self._memory.trails_of(
            self.store, (entry.get("correlation_id") for _, entry in pending))
        try:
            async with self.store.transaction() as uow:
                for key, entry in pending:
                    sequence += 1
                    linked = domain.chain(entry, sequence, last)
                    last = linked["hash"]
                    uow.put_document(ENTRIES, entry_key(sequence), linked)
                    uow.delete_document(PENDING, key)
                    if cid := entry.get("correlation_id"):
                        trail = trails[cid]
                        trail.append(sequence)
                        uow.put_document(TRAILS, cid, {"sequences": list(trail)})
                uow.set_checkpoint(CHAIN, sequence, expected=int(head["sequence"]))
                uow.put_document(HEAD, LOG, {"sequence": sequence, "hash": last})
        except BaseException:
            self._memory.forget()
            raise
        self._memory.committed(sequence, last, trails)
        return len(pending)

    async def drain(self) -> int:
        """Chain until nothing is pending (for tests and shutdown)."""
        total = 0
        while moved := await self.step():
            total += moved
        return total


class Chainer:
    """Distributed: chains each event in the audit consumer's own unit of work, with the
    inbox marks of the batch it came in, so an event costs the chain one entry (and its
    trail) and nothing is staged.

    The head is taken once per unit of work (from its `_Memory`, else read), every entry of
    the unit is linked after it, and the unit moves the checkpoint `audit:chain` from the
    head's sequence to its last (`seal`, registered with `EventStore.before_commit`). A
    unit that another chainer (another audit process) or the sequencer overtook fails at
    commit: the consumer delivers the batch again, and this chainer reads the head afresh.
    An entry is chained exactly once: its inbox mark and its entry are one commit."""

    def __init__(self) -> None:
        self._memory = _Memory()
        self._units: weakref.WeakKeyDictionary[UnitOfWork, _Unit] = (
            weakref.WeakKeyDictionary())

    def handlers(self, alert: Alert) -> dict[str, Handler]:
        """The audit consumer's registry: every published event type, all chained alike."""

        async def link(event: RecordedEvent, uow: UnitOfWork) -> None:
            unit = self._units.get(uow) or await self._begin(uow)
            unit.sequence += 1
            linked = domain.chain(entry_of(event), unit.sequence, unit.last)
            unit.last = linked["hash"]
            uow.put_document(ENTRIES, entry_key(unit.sequence), linked)
            if cid := event.correlation_id:
                unit.added.setdefault(cid, []).append(unit.sequence)
            kind = domain.ALERTS.get(event.type)
            if kind is not None:
                uow.after_commit(lambda: alert(kind, event))

        return dict.fromkeys(sorted(SCHEMAS.types), link)

    async def seal(self, uow: UnitOfWork) -> None:
        """Before a unit that chained entries commits: each correlation's trail as it
        stands followed by the unit's entries, the head, and the checkpoint moved from the
        head it started from (EventStore.before_commit)."""
        unit = self._units.pop(uow, None)
        if unit is None or unit.sequence == unit.start:
            return
        trails = await self._memory.trails_of(uow.store, unit.added)
        for cid, added in unit.added.items():
            trails[cid] += added
            uow.put_document(TRAILS, cid, {"sequences": trails[cid]})
        uow.set_checkpoint(CHAIN, unit.sequence, expected=unit.start)
        uow.put_document(HEAD, LOG, {"sequence": unit.sequence, "hash": unit.last})
        uow.after_commit(lambda: self._memory.committed(unit.sequence, unit.last, trails))
        uow.after_failure(self._memory.forget)

    async def _begin(self, uow: UnitOfWork) -> _Unit:
        head = await self._memory.head_of(uow.store)
        sequence = int(head["sequence"])
        unit = self._units[uow] = _Unit(sequence, sequence, str(head["hash"]))
        return unit


@dataclass
class _Unit:
    """What one unit of work chains: from the head at `start` to `sequence`."""

    start: int
    sequence: int
    last: str
    added: dict[str, list[int]] = field(default_factory=dict)
    """By correlation id, the sequences of the entries this unit chained."""


# -- reads ------------------------------------------------------------------------------


async def entries(
    store: EventStore, after: int = 0, page: int = 500
) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
    """Pages of (sequence, entry) after sequence `after`, in order (a deleted entry is
    simply absent)."""
    key = entry_key(after)
    while found := await store.find_documents(ENTRIES, after_key=key, limit=page):
        yield [(int(k), body) for k, body in found]
        key = found[-1][0]


async def length(store: EventStore) -> int:
    """How many entries the chain holds (its head's sequence)."""
    head = await store.get_document(HEAD, LOG)
    return 0 if head is None else int(head["sequence"])


async def trail(store: EventStore, correlation_id: str) -> list[dict[str, Any]]:
    """Every entry of one correlation id (a transaction), in occurrence order."""
    doc = await store.get_document(TRAILS, correlation_id)
    if not doc or not doc["sequences"]:
        return []
    found = [entry for n in doc["sequences"]
             if (entry := await store.get_document(ENTRIES, entry_key(int(n)))) is not None]
    return sorted(found, key=lambda entry: (entry["occurred_at"], entry["sequence"]))


async def verify(store: EventStore) -> dict[str, Any]:
    """Walk the whole chain; report every modified, deleted or relinked entry.

    The head is read first and the walk stops at it: entries and head are committed
    together, so entries past a head read earlier were appended since (the sequencer keeps
    going while verify runs). Reading the head last, a live chain looked truncated whenever
    an append landed between the walk and that read. Entries without any head mean the head
    document was deleted: reported as `head_missing`, since the end of the chain can then no
    longer be checked."""
    verifier = domain.Verifier()
    head = await store.get_document(HEAD, LOG)
    if head is None:
        # No head: an empty chain, or the first entries chained since that read (the head
        # is there now), or a deleted head. The walk stops at the last entry read now, so
        # entries chained later are not taken for headless ones.
        last = await store.find_documents(ENTRIES, limit=1, descending=True)
        end = int(last[0][0]) if last else 0
        head = await store.get_document(HEAD, LOG)
    if head is not None:
        end = int(head["sequence"])
    if end > 0:
        async for page in entries(store):
            verifier.feed([(n, e) for n, e in page if n <= end])
            if page[-1][0] >= end:
                break
    if head is not None:
        verifier.finish(int(head["sequence"]), str(head["hash"]))
    else:
        verifier.headless()
    return verifier.report()
