"""The audit chain on each event store adapter: events delivered to the audit consumer are
chained once each (by two audit processes at once too), entries an earlier version staged
are chained by the sequencer, and tampering with a stored entry is caught and located by
verify."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from magasin.audit import domain, log
from magasin.eventstore.store import EventStore
from magasin.messaging.dispatch import Outcome, deliver, deliver_batch
from magasin.shared.events import SCHEMAS, PaymentFailed, TransactionCreated
from magasin.shared.messages import NewEvent, RecordedEvent

Tamper = Callable[[str, tuple[Any, ...]], Awaitable[None]]


@pytest.fixture
def tamper(store_factory: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Tamper:
    """Run one SQL statement straight on the store's database, as an intruder would
    (`$1`-style parameters for PostgreSQL, `?` for SQLite)."""
    if store_factory.kind == "sqlite":

        async def on_sqlite(sql: str, args: tuple[Any, ...]) -> None:
            with sqlite3.connect(tmp_path / "magasin.db") as conn:
                conn.execute(sql.replace("$1", "?").replace("$2", "?").replace("$3", "?"),
                             args)

        return on_sqlite
    import asyncpg

    url = request.getfixturevalue("pg_database")
    schema = request.getfixturevalue("pg_schema")

    async def on_postgres(sql: str, args: tuple[Any, ...]) -> None:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            await conn.execute(sql.replace("json_set(body, '$.payload.amount', 1)",
                                           "jsonb_set(body, '{payload,amount}', '1')"), *args)
        finally:
            await conn.close()

    return on_postgres


async def sales(store: EventStore, count: int, first: int = 0) -> list[RecordedEvent]:
    """`count` sales, each created and its payment failed: two events a sale."""
    events: list[RecordedEvent] = []
    for n in range(first, first + count):
        tid = f"t{n}"
        created = TransactionCreated(tid, "s1", "alice", (), 1000, "CAD", "VISA")
        failed = PaymentFailed(f"p{n}", tid, 1000, "CAD", "declined")
        events += await store.append(f"transaction-{tid}", [
            NewEvent(type(p).__name__, SCHEMAS.dump(p), correlation_id=tid)
            for p in (created, failed)
        ])
    return events


def chainer(store: EventStore, alerts: list[str] | None = None) -> dict[str, Any]:
    """An audit process's consumer on `store`: its handlers, its seal registered."""
    chaining = log.Chainer()
    store.before_commit(chaining.seal)
    return chaining.handlers(lambda kind, _: alerts.append(kind) if alerts is not None else None)


async def audited(store: EventStore, count: int) -> list[RecordedEvent]:
    """`count` sales delivered to the audit consumer (twice: the redelivery changes
    nothing) and chained."""
    alerts: list[str] = []
    consumer = chainer(store, alerts)
    events = await sales(store, count)
    for event in events + events:
        result = await deliver(store, SCHEMAS, log.CONSUMER, consumer[event.type], event)
        assert result.outcome in (Outcome.HANDLED, Outcome.DUPLICATE)
    assert alerts == ["payment_failed"] * count
    return events


async def whole(store: EventStore, count: int) -> None:
    """The chain verifies, holding the entries of `count` sales, each sale's trail whole."""
    assert await log.verify(store) == {
        "ok": True, "checked": 2 * count, "head": 2 * count, "problems": []}
    for n in range(count):
        trail = await log.trail(store, f"t{n}")
        assert [e["event_type"] for e in trail] == ["TransactionCreated", "PaymentFailed"]


async def staged(store: EventStore, events: list[RecordedEvent]) -> None:
    """Stage entries as versions before 2026-12-07 did, for the sequencer to chain."""
    async with store.transaction() as uow:
        for n, event in enumerate(events):
            uow.put_document(log.PENDING, f"{n:06d}", log.entry_of(event))


async def test_every_event_is_chained_once_and_verifies(store: EventStore) -> None:
    events = await audited(store, 4)
    report = await log.verify(store)
    assert report == {"ok": True, "checked": 8, "head": 8, "problems": []}
    trail = await log.trail(store, "t2")
    assert [e["event_type"] for e in trail] == ["TransactionCreated", "PaymentFailed"]
    assert {e["event_id"] for e in trail} == {e.event_id for e in events[4:6]}


async def test_two_audit_processes_at_once_chain_each_entry_exactly_once(
    store: EventStore,
) -> None:
    """Batches of one sale's events and the next go to two consumers at once, as the
    broker shares them out; a batch that lost the race on the chain's head is delivered
    again, then event by event, as the bus does, until each event took effect."""
    events = await sales(store, 12)
    first, second = chainer(store), chainer(store)

    async def consume(handlers: dict[str, Any], batches: list[list[RecordedEvent]]) -> None:
        for batch in batches:
            if await deliver_batch(store, SCHEMAS, log.CONSUMER, handlers, batch,
                                   lambda uow: None):
                continue
            for event in batch:
                while (await deliver(store, SCHEMAS, log.CONSUMER, handlers[event.type],
                                     event)).outcome not in (Outcome.HANDLED, Outcome.DUPLICATE):
                    await asyncio.sleep(0.001)

    batches = [events[n:n + 3] for n in range(0, len(events), 3)]
    await asyncio.gather(consume(first, batches[0::2]), consume(second, batches[1::2]))
    await whole(store, 12)
    chained_ids = [entry["event_id"] async for page in log.entries(store) for _, entry in page]
    assert sorted(chained_ids) == sorted(e.event_id for e in events)


async def test_entries_an_earlier_version_staged_are_chained_with_the_consumer_s(
    store: EventStore,
) -> None:
    """After an upgrade: t0 was staged whole and t1's creation, before; the consumer chains
    what comes next, the sequencer what was staged, and each sale keeps its whole trail."""
    events = await sales(store, 3)
    await staged(store, events[:3])
    consumer = chainer(store)
    for event in events[3:]:
        result = await deliver(store, SCHEMAS, log.CONSUMER, consumer[event.type], event)
        assert result.outcome is Outcome.HANDLED
    assert await log.Sequencer(store).drain() == 3
    later = await sales(store, 1, first=3)
    for event in later:
        assert (await deliver(store, SCHEMAS, log.CONSUMER, consumer[event.type],
                              event)).outcome is Outcome.HANDLED
    await whole(store, 4)


async def test_a_sale_chained_by_two_sequencers_in_turn_keeps_its_whole_trail(
    store: EventStore,
) -> None:
    """A sequencer that did not chain a sale's first entries (after a restart, or another
    audit process) extends the trail those entries left, not a new one."""
    await staged(store, await sales(store, 2))  # pending: t0's two entries, then t1's two
    assert await log.Sequencer(store, batch=3).step() == 3  # t0's and t1's first
    assert await log.Sequencer(store, batch=3).step() == 1  # t1's last, by a newcomer
    trail = await log.trail(store, "t1")
    assert [e["event_type"] for e in trail] == ["TransactionCreated", "PaymentFailed"]
    assert (await log.verify(store))["ok"] is True


async def test_entries_appended_while_verify_runs_do_not_look_like_tampering(
    store: EventStore,
) -> None:
    await audited(store, 2)
    # An append committing after verify read the head: its entry is past that head (this
    # one is not even a valid entry; a verify that walked past the head would flag it).
    async with store.transaction() as uow:
        uow.put_document(log.ENTRIES, log.entry_key(5), {"sequence": 5})
    report = await log.verify(store)
    assert report == {"ok": True, "checked": 4, "head": 4, "problems": []}


async def test_a_modified_entry_is_located_by_verify(store: EventStore, tamper: Tamper) -> None:
    await audited(store, 3)
    await tamper(
        "UPDATE documents SET body = json_set(body, '$.payload.amount', 1) "
        "WHERE collection = $1 AND key = $2", (log.ENTRIES, log.entry_key(4)),
    )
    report = await log.verify(store)
    assert report["ok"] is False
    (problem,) = report["problems"]
    assert (problem["sequence"], problem["kind"]) == (4, "modified")
    assert problem["event_id"] is not None


async def test_a_deleted_entry_is_located_by_verify(store: EventStore, tamper: Tamper) -> None:
    await audited(store, 3)
    await tamper("DELETE FROM documents WHERE collection = $1 AND key = $2",
                 (log.ENTRIES, log.entry_key(2)))
    report = await log.verify(store)
    assert report["ok"] is False
    assert [(p["sequence"], p["kind"]) for p in report["problems"]] == [(2, "deleted")]


async def test_deleting_the_last_entries_is_caught_too(store: EventStore, tamper: Tamper) -> None:
    await audited(store, 3)
    await tamper("DELETE FROM documents WHERE collection = $1 AND key > $2",
                 (log.ENTRIES, log.entry_key(4)))
    report = await log.verify(store)
    assert [(p["sequence"], p["kind"]) for p in report["problems"]] == [(5, "truncated")]


async def test_two_sequencers_at_once_chain_each_entry_exactly_once(store: EventStore) -> None:
    events = await sales(store, 10)
    await staged(store, events)
    first, second = log.Sequencer(store, batch=4), log.Sequencer(store, batch=4)
    loops = [asyncio.create_task(s.run()) for s in (first, second)]

    async def chained() -> bool:
        return (await log.length(store)) == len(events)

    try:
        async with asyncio.timeout(20):
            while not await chained():
                await asyncio.sleep(0.02)
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    report = await log.verify(store)
    assert report == {"ok": True, "checked": 20, "head": 20, "problems": []}
    chained_ids = [entry["event_id"] async for page in log.entries(store) for _, entry in page]
    assert sorted(chained_ids) == sorted(e.event_id for e in events)


async def test_verifying_over_and_over_while_sales_are_chained_never_reports_a_problem(
    store: EventStore,
) -> None:
    sales = 150
    consumer = chainer(store)
    reports: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sell() -> None:
        for n in range(sales):
            tid = f"t{n}"
            created = TransactionCreated(tid, "s1", "alice", (), 1000, "CAD", "VISA")
            failed = PaymentFailed(f"p{n}", tid, 1000, "CAD", "declined")
            recorded = await store.append(f"transaction-{tid}", [
                NewEvent(type(p).__name__, SCHEMAS.dump(p), correlation_id=tid)
                for p in (created, failed)
            ])
            for event in recorded:
                await deliver(store, SCHEMAS, log.CONSUMER, consumer[event.type], event)

    async def verify_until_done() -> None:
        while not done.is_set():
            reports.append(await log.verify(store))
            await asyncio.sleep(0)  # let the sales and their chaining go on (SQLite is sync)

    async def chained() -> bool:
        return (await log.length(store)) == 2 * sales

    verifiers = [asyncio.create_task(verify_until_done()) for _ in range(2)]
    try:
        await sell()
        async with asyncio.timeout(60):
            while not await chained():
                await asyncio.sleep(0.01)
    finally:
        done.set()
        await asyncio.gather(*verifiers)
    assert [r for r in reports if r["problems"]] == []
    assert len({r["head"] for r in reports}) > 10
    final = await log.verify(store)
    assert final == {"ok": True, "checked": 2 * sales, "head": 2 * sales, "problems": []}


async def test_a_relinked_entry_is_located_by_verify(store: EventStore, tamper: Tamper) -> None:
    await audited(store, 3)
    # An intruder who edits entry 3 and recomputes its hash keeps entry 3 consistent, but
    # entry 4 still links to the old hash.
    third = await store.get_document(log.ENTRIES, log.entry_key(3))
    assert third is not None
    edited = {**third, "payload": {**third["payload"], "amount": 1}}
    edited["hash"] = domain.digest(edited)
    await tamper("UPDATE documents SET body = $1 WHERE collection = $2 AND key = $3",
                 (orjson.dumps(edited).decode(), log.ENTRIES, log.entry_key(3)))
    report = await log.verify(store)
    assert report["ok"] is False
    (problem,) = report["problems"]
    assert (problem["sequence"], problem["kind"]) == (4, "relinked")


async def test_deleting_the_head_document_is_caught(store: EventStore) -> None:
    await audited(store, 2)
    async with store.transaction() as uow:
        uow.delete_document(log.HEAD, log.LOG)
    report = await log.verify(store)
    assert report["ok"] is False
    assert [(p["sequence"], p["kind"]) for p in report["problems"]] == [(4, "head_missing")]
