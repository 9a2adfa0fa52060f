"""A group of units of work applied in one SQLite transaction with a few statements.

The SQLite writer commits the units of work that queued while it was busy together (group
commit). Applied one by one, each costs its own statements: an inbox INSERT, an event-id
and version check, an INSERT per event, a checkpoint upsert, a document upsert... — about
a dozen statements per unit, most of a sale's SQL. `apply_group` applies the whole group
with one statement per kind instead: one INSERT for every inbox mark, one SELECT that
checks every appended event id and reads every appended stream's version, one INSERT for
every event (positions assigned here: the writer holds the write lock, so they follow the
log's head), one upsert for every checkpoint (plain ones, and guarded ones moved only from
where they are expected: projections), one upsert and one DELETE for the final state of every
document touched. The outcome is the one the units would have had one after the other.

Anything unusual — a check that fails (an inbox mark seen before, a version conflict, an
idempotent retry of stored events), a collection-wide operation, two units guarding the
same checkpoint — raises `Unmergeable` (or the MagasinError found) and the transaction
rolls back: the caller then applies the units one by one, each in its own SAVEPOINT, which
tells every unit its own outcome exactly as before. Such groups are rare (conflicts and
redeliveries), so the common path is the cheap one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from magasin.eventstore.rows import StoredEvent, dumps
from magasin.eventstore.sqlite_known import KnownState
from magasin.eventstore.store import (
    Append,
    DeleteDocument,
    MarkProcessed,
    Operation,
    PutDocument,
    SetCheckpoint,
)
from magasin.shared.clock import to_micros
from magasin.shared.errors import ConcurrencyError
from magasin.shared.messages import RecordedEvent

MAX_PARAMETERS = 30_000
"""Parameters of one statement at most (SQLite's limit is 32,766 since 3.32)."""
ROWS = 200
"""Rows of one multi-row INSERT or DELETE."""

_INSERT_EVENTS = (
    "INSERT INTO events (global_position, event_id, stream_id, stream_version, type, "
    "schema_version, occurred_at, correlation_id, causation_id, traceparent, metadata, "
    "payload) VALUES "
)
_EVENT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


class Unmergeable(Exception):
    """The group must be applied unit by unit (nothing of it was written)."""


@dataclass
class _Plan:
    marks: list[tuple[str, str]] = field(default_factory=list)
    appends: list[tuple[int, Append]] = field(default_factory=list)
    plain: dict[str, int] = field(default_factory=dict)
    movers: dict[str, SetCheckpoint] = field(default_factory=dict)
    guards: dict[str, int] = field(default_factory=dict)
    documents: dict[tuple[str, str], Mapping[str, Any] | None] = field(default_factory=dict)

    def statements(self) -> int:
        """How many statements the group takes (chunking of huge groups aside)."""
        return (bool(self.marks) + 2 * bool(self.appends) + bool(self.plain or self.movers)
                + any(b is not None for b in self.documents.values())
                + any(b is None for b in self.documents.values()))


def plan(jobs: Sequence[Sequence[Operation]]) -> _Plan:
    """What the group writes, in its final form; Unmergeable if it needs the slow path."""
    p = _Plan()
    for index, ops in enumerate(jobs):
        for op in ops:
            if isinstance(op, PutDocument):
                p.documents[op.collection, op.key] = op.body
            elif isinstance(op, DeleteDocument):
                p.documents[op.collection, op.key] = None
            elif isinstance(op, MarkProcessed):
                p.marks.append((op.consumer, op.event_id))
            elif isinstance(op, Append):
                p.appends.append((index, op))
            elif isinstance(op, SetCheckpoint):
                _plan_checkpoint(p, op)
            else:  # a collection-wide operation: order matters, take the slow path
                raise Unmergeable
    conditional = p.movers.keys() | p.guards.keys()
    if p.plain.keys() & conditional or p.movers.keys() & p.guards.keys():
        raise Unmergeable
    if p.guards and not p.movers:
        raise Unmergeable
    return p


def _plan_checkpoint(p: _Plan, op: SetCheckpoint) -> None:
    if op.expected is None:
        p.plain[op.name] = op.position
    elif op.expected == op.position:
        if p.guards.setdefault(op.name, op.expected) != op.expected:
            raise Unmergeable
    else:
        if op.name in p.movers:
            raise Unmergeable
        p.movers[op.name] = op


def apply_group(
    conn: sqlite3.Connection, p: _Plan, jobs: int, *, outbox: bool, now: int,
    known: KnownState | None,
) -> list[list[RecordedEvent]]:
    """Apply the plan inside the caller's transaction; the recorded events of each job.
    `known`: what the writer knows for sure of the log (nobody else committed since it
    last did), which spares the check of the appends when it tells all they need."""
    if p.marks:
        _mark(conn, p.marks, now)
    recorded: list[list[RecordedEvent]] = [[] for _ in range(jobs)]
    if p.appends:
        _append(conn, p.appends, recorded, outbox, known)
    if len(p.plain) + len(p.movers) <= ROWS:
        if p.plain or p.movers:
            _checkpoints(conn, p)
    else:
        _plain(conn, p)
        if p.movers:
            _move(conn, p)
    if p.documents:
        write_documents(conn, p.documents)
    return recorded


def appends_alone(p: _Plan, *, outbox: bool) -> bool:
    """True when the plan writes events and nothing else, in one INSERT (ROWS events at
    most, no outbox rows): that statement is atomic on its own and needs no BEGIN/COMMIT
    around it, even with the check before it (`_check`, a read), because the INSERT gives
    every event its position explicitly: a commit of another connection between the check
    and the INSERT took the next positions, so the INSERT collides with it and changes
    nothing (Unmergeable: the slow path then answers exactly, under the write lock)."""
    return (bool(p.appends) and not outbox and not p.marks and not p.plain and not p.movers
            and not p.documents and sum(len(op.events) for _, op in p.appends) <= ROWS)


def append_alone(
    conn: sqlite3.Connection, op: Append, known: KnownState
) -> list[RecordedEvent] | None:
    """A unit of work that is one append, written as one INSERT in autocommit from what the
    writer knows (the log's head, the stream's version), with no plan of a group around it:
    a lone writer's append (bench/eventstore.py append_1_writer). None when it cannot be
    (nothing written): what the writer knows is not trusted, the stream's version is not
    known, the INSERT collides (another connection committed since, or an event id is
    stored already), or the expected version looks wrong (it may be stale: the general
    path answers exactly, under the write lock). Safe for the reasons of `appends_alone`."""
    head = known.head
    if head is None or not op.events or len(op.events) > ROWS or not known.trusted():
        return None
    versions = _known_versions(known, [(0, op)])
    if versions is None:
        return None
    recorded: list[list[RecordedEvent]] = [[]]
    try:
        _insert(conn, [(0, op)], recorded, False, versions, head)
    except (Unmergeable, ConcurrencyError):
        return None
    return recorded[0]


def single_statement_is_atomic(p: _Plan) -> bool:
    """True when the plan is one statement that writes everything or nothing, so it needs
    no BEGIN/COMMIT around it (a checkpoint moved alone, documents written alone)."""
    if p.statements() != 1 or p.marks or p.appends:
        return False
    if len(p.plain) + len(p.movers) > ROWS or len(p.documents) > ROWS:
        return False
    return not p.movers or (len(p.movers) == 1 and not p.plain)


def _mark(conn: sqlite3.Connection, marks: list[tuple[str, str]], now: int) -> None:
    for start in range(0, len(marks), ROWS):
        chunk = marks[start:start + ROWS]
        inserted = conn.execute(
            "INSERT INTO inbox (consumer, event_id, processed_at) VALUES "
            + ",".join(["(?, ?, ?)"] * len(chunk)) + " ON CONFLICT DO NOTHING",
            [v for consumer, event_id in chunk for v in (consumer, event_id, now)],
        ).rowcount
        if inserted != len(chunk):
            raise Unmergeable  # processed before: the slow path says which


def _append(
    conn: sqlite3.Connection,
    appends: list[tuple[int, Append]],
    recorded: list[list[RecordedEvent]],
    outbox: bool,
    known: KnownState | None,
) -> None:
    ids = [e.event_id for _, op in appends for e in op.events]
    streams = list(dict.fromkeys(op.stream_id for _, op in appends))
    if len(set(ids)) != len(ids) or len(ids) + len(streams) > MAX_PARAMETERS:
        raise Unmergeable
    known_versions = _known_versions(known, appends)
    if known is not None and known.head is not None and known_versions is not None:
        versions, position = known_versions, known.head
    else:
        versions, position = _check(conn, ids, streams)
    _insert(conn, appends, recorded, outbox, versions, position)


def _known_versions(
    known: KnownState | None, appends: list[tuple[int, Append]]
) -> dict[str, int] | None:
    """The appended streams' versions from what the writer knows, None if it cannot tell.
    A stream it never wrote is taken for a new one only where that changes nothing but
    the numbering (no expected version, or none expected): if it exists after all, the
    first version inserted collides with its own, the INSERT fails and the slow path
    answers exactly. Stored event ids likewise collide on their unique key."""
    if known is None:
        return None
    versions: dict[str, int] = {}
    for _, op in appends:
        if op.stream_id in versions:
            continue
        version = known.versions.get(op.stream_id)
        if version is None:
            if op.expected_version not in (None, 0):
                return None
            version = 0
        versions[op.stream_id] = version
    return versions


def _check(
    conn: sqlite3.Connection, ids: list[str], streams: list[str]
) -> tuple[dict[str, int], int]:
    """One statement: is any id stored already, where the log ends, each stream's version."""
    rows = conn.execute(
        f"SELECT NULL, EXISTS (SELECT 1 FROM events WHERE event_id IN ({_marks(len(ids))})),"
        " (SELECT COALESCE(MAX(global_position), 0) FROM events)"
        " UNION ALL SELECT stream_id, MAX(stream_version), NULL FROM events"
        f" WHERE stream_id IN ({_marks(len(streams))}) GROUP BY stream_id",
        [*ids, *streams],
    ).fetchall()
    versions: dict[str, int] = {}
    position = 0
    for stream, value, head in rows:
        if stream is None:
            if value:
                raise Unmergeable  # an idempotent retry, or a mix: the slow path decides
            position = int(head)
        else:
            versions[stream] = int(value)
    return versions, position


def _insert(
    conn: sqlite3.Connection,
    appends: list[tuple[int, Append]],
    recorded: list[list[RecordedEvent]],
    outbox: bool,
    versions: dict[str, int],
    position: int,
) -> None:
    params: list[Any] = []
    positions: list[int] = []
    for index, op in appends:
        version = versions.get(op.stream_id, 0)
        if op.expected_version is not None and op.expected_version != version:
            raise ConcurrencyError(op.stream_id, op.expected_version, version)
        for event in op.events:
            version += 1
            position += 1
            micros = to_micros(event.occurred_at)
            metadata, payload = dumps(event.metadata), dumps(event.payload)
            params += (position, event.event_id, op.stream_id, version, event.type,
                       event.schema_version, micros, event.correlation_id,
                       event.causation_id, event.traceparent, metadata, payload)
            positions.append(position)
            recorded[index].append(StoredEvent(
                event.event_id, event.type, event.schema_version, op.stream_id, version,
                position, micros, event.correlation_id, event.causation_id,
                event.traceparent, metadata, payload,
            ))
        versions[op.stream_id] = version
    width = 12
    try:
        for start in range(0, len(positions), ROWS):
            count = min(ROWS, len(positions) - start)
            conn.execute(
                _INSERT_EVENTS + ",".join([_EVENT_ROW] * count),
                params[start * width:(start + count) * width],
            )
    except sqlite3.IntegrityError as exc:  # only another writer could cause it
        raise Unmergeable from exc
    if outbox:
        for start in range(0, len(positions), ROWS):
            chunk = positions[start:start + ROWS]
            conn.execute(
                "INSERT INTO outbox (global_position) VALUES " + ",".join(["(?)"] * len(chunk)),
                chunk,
            )


def _checkpoints(conn: sqlite3.Connection, p: _Plan) -> None:
    """Every checkpoint in one upsert: plain ones set, guarded ones moved only from where
    they are expected (a missing row counting as 0), guards checked; Unmergeable unless
    every row was written (the slow path then says which did not)."""
    rows: list[Any] = []
    for name, position in p.plain.items():
        rows += [name, position, None]
    for m in p.movers.values():
        rows += [m.name, m.position, m.expected]
    sql = ("INSERT INTO checkpoints (name, position) SELECT column1, column2 FROM (VALUES "
           + ",".join(["(?, ?, ?)"] * (len(rows) // 3)) + ") AS v WHERE (column3 IS NULL"
           " OR column3 = 0 OR EXISTS (SELECT 1 FROM checkpoints c WHERE c.name = column1))")
    params = rows
    for name, expected in p.guards.items():
        sql += " AND COALESCE((SELECT position FROM checkpoints WHERE name = ?), 0) = ?"
        params += [name, expected]
    sql += " ON CONFLICT (name) DO UPDATE SET position = excluded.position"
    if p.movers:
        sql += (" WHERE CASE excluded.name"
                + " WHEN ? THEN checkpoints.position = ?" * len(p.movers) + " ELSE 1 END")
        for m in p.movers.values():
            params += [m.name, m.expected]
    if conn.execute(sql, params).rowcount != len(p.plain) + len(p.movers):
        raise Unmergeable


def _plain(conn: sqlite3.Connection, p: _Plan) -> None:
    items = list(p.plain.items())
    for start in range(0, len(items), ROWS):
        chunk = items[start:start + ROWS]
        conn.execute(
            "INSERT INTO checkpoints (name, position) VALUES "
            + ",".join(["(?, ?)"] * len(chunk))
            + " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
            [v for row in chunk for v in row],
        )


def _move(conn: sqlite3.Connection, p: _Plan) -> None:
    """Every guarded checkpoint moved, and every guard checked, in one UPDATE; Unmergeable
    if any of them does not stand where expected (the slow path says which)."""
    movers = list(p.movers.values())
    params: list[Any] = []
    cases = ""
    for m in movers:
        cases += " WHEN ? THEN ?"
        params += [m.name, m.position]
    sql = f"UPDATE checkpoints SET position = CASE name{cases} END WHERE ("
    sql += " OR ".join(["(name = ? AND position = ?)"] * len(movers)) + ")"
    for m in movers:
        params += [m.name, m.expected]
    for name, expected in p.guards.items():
        sql += " AND COALESCE((SELECT position FROM checkpoints WHERE name = ?), 0) = ?"
        params += [name, expected]
    if conn.execute(sql, params).rowcount != len(movers):
        raise Unmergeable


def write_documents(
    conn: sqlite3.Connection, documents: dict[tuple[str, str], Mapping[str, Any] | None]
) -> None:
    """Put (a body) and delete (None) documents, a statement per ROWS of each."""
    puts = [(c, k, dumps(body)) for (c, k), body in documents.items() if body is not None]
    gone = [(c, k) for (c, k), body in documents.items() if body is None]
    for start in range(0, len(puts), ROWS):
        chunk = puts[start:start + ROWS]
        conn.execute(
            "INSERT INTO documents (collection, key, body) VALUES "
            + ",".join(["(?, ?, ?)"] * len(chunk))
            + " ON CONFLICT (collection, key) DO UPDATE SET body = excluded.body",
            [v for row in chunk for v in row],
        )
    for start in range(0, len(gone), ROWS):
        keys = gone[start:start + ROWS]
        # Through a subquery: SQLite 3.40 plans `(collection, key) IN (VALUES …)` of two
        # rows or more as a scan of the whole table (EXPLAIN QUERY PLAN: SCAN documents),
        # which made every delete cost more as the read models grew.
        conn.execute(
            "DELETE FROM documents WHERE (collection, key) IN (SELECT column1, column2 FROM"
            " (VALUES " + ",".join(["(?, ?)"] * len(keys)) + "))",
            [v for row in keys for v in row],
        )


def _marks(n: int) -> str:
    return ",".join("?" * n)
