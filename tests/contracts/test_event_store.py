"""Contract of the event store port, run against every adapter (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from magasin.eventstore.store import (
    ANY,
    NO_STREAM,
    EventFilter,
    EventStore,
    ExpectVersion,
    Snapshot,
)
from magasin.shared.errors import (
    AlreadyProcessed,
    ConcurrencyError,
    DuplicateEventError,
    NotFound,
)
from magasin.shared.messages import NewEvent

MakeStore = Callable[..., Awaitable[EventStore]]


def ev(kind: str = "ItemAdded", **payload: object) -> NewEvent:
    return NewEvent(type=kind, payload=payload or {"n": 1})


async def test_append_to_a_new_stream_numbers_versions_from_one(store: EventStore) -> None:
    recorded = await store.append("cart-1", [ev(n=1), ev(n=2)], NO_STREAM)

    assert [e.stream_version for e in recorded] == [1, 2]
    assert recorded[0].global_position < recorded[1].global_position
    assert await store.stream_version("cart-1") == 2
    assert [e.payload["n"] for e in await store.read_stream("cart-1")] == [1, 2]


async def test_envelope_fields_survive_the_round_trip(store: EventStore) -> None:
    at = datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)
    sent = NewEvent(
        type="PaymentProcessed",
        payload={"amount": 1999, "currency": "CAD", "nested": {"ok": True}},
        schema_version=2,
        occurred_at=at,
        correlation_id="tx-1",
        causation_id="cause-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        metadata={"service": "payment", "actor": "system"},
    )
    await store.append("payment-1", [sent])

    (got,) = await store.read_stream("payment-1")
    assert (got.event_id, got.type, got.schema_version) == (sent.event_id, sent.type, 2)
    assert got.occurred_at == at
    assert got.payload == sent.payload
    assert got.metadata == sent.metadata
    assert (got.correlation_id, got.causation_id) == ("tx-1", "cause-1")
    assert got.traceparent == sent.traceparent
    assert got.routing_key == "payment.PaymentProcessed"
    assert await store.read_event(sent.event_id) == got


async def test_every_read_returns_the_envelopes_the_append_recorded(store: EventStore) -> None:
    # Reads decode JSON and time lazily: the envelopes must still equal the recorded ones.
    sent = [
        NewEvent("ItemAdded", {"n": i, "tags": ["a", {"b": None}]}, correlation_id="c-1",
                 metadata={"service": "cart", "i": i})
        for i in range(3)
    ]
    recorded = await store.append("cart-7", sent)

    assert await store.read_stream("cart-7") == recorded
    assert await store.read_all() == recorded
    assert await store.read_events(EventFilter(correlation_id="c-1")) == recorded
    assert await store.read_event(sent[1].event_id) == recorded[1]
    assert [e.occurred_at for e in await store.read_all()] == [e.occurred_at for e in sent]


async def test_wrong_expected_version_raises_and_writes_nothing(store: EventStore) -> None:
    await store.append("cart-1", [ev()], NO_STREAM)
    before = await store.last_position()

    with pytest.raises(ConcurrencyError) as caught:
        await store.append("cart-1", [ev(), ev()], expected_version=0)
    assert caught.value.actual == 1
    with pytest.raises(ConcurrencyError):
        await store.append("cart-1", [ev()], expected_version=5)

    assert await store.stream_version("cart-1") == 1
    assert await store.last_position() == before


async def test_any_version_appends_after_whatever_is_there(store: EventStore) -> None:
    await store.append("cart-1", [ev()], ANY)
    recorded = await store.append("cart-1", [ev()], ANY)
    assert recorded[0].stream_version == 2


async def test_appending_the_same_event_id_twice_is_a_no_op(store: EventStore) -> None:
    event = ev(n=7)
    first = await store.append("cart-1", [event], NO_STREAM)
    again = await store.append("cart-1", [event], NO_STREAM)

    assert again == first
    assert len(await store.read_stream("cart-1")) == 1
    assert len(await store.read_all()) == 1


async def test_a_batch_mixing_stored_and_new_ids_is_refused_whole(store: EventStore) -> None:
    stored = ev()
    await store.append("cart-1", [stored])
    with pytest.raises(DuplicateEventError):
        await store.append("cart-1", [stored, ev()])
    assert len(await store.read_all()) == 1


async def test_concurrent_appends_at_the_same_version_let_exactly_one_win(
    store: EventStore,
) -> None:
    await store.append("cart-1", [ev()], NO_STREAM)
    outcomes = await asyncio.gather(
        *(store.append("cart-1", [ev(n=i)], 1) for i in range(8)), return_exceptions=True
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, ConcurrencyError) for o in losers)
    assert await store.stream_version("cart-1") == 2


async def test_read_stream_honours_version_and_time_bounds(store: EventStore) -> None:
    t0 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    events = [
        NewEvent(type="Tick", payload={"n": i}, occurred_at=t0 + timedelta(minutes=i))
        for i in range(1, 6)
    ]
    await store.append("clock-1", events)

    def ns(evs: list) -> list[int]:  # type: ignore[type-arg]
        return [e.payload["n"] for e in evs]

    assert ns(await store.read_stream("clock-1", from_version=3)) == [3, 4, 5]
    assert ns(await store.read_stream("clock-1", to_version=2)) == [1, 2]
    assert ns(await store.read_stream("clock-1", from_version=2, to_version=4)) == [2, 3, 4]
    until = t0 + timedelta(minutes=3)
    assert ns(await store.read_stream("clock-1", until=until)) == [1, 2, 3]
    assert await store.read_stream("nobody-1") == []


async def test_read_all_pages_through_the_log_in_position_order(store: EventStore) -> None:
    for i in range(25):
        await store.append(f"s-{i % 3}", [ev(n=i)])

    seen: list[int] = []
    after = 0
    while page := await store.read_all(after=after, limit=7):
        assert len(page) <= 7
        seen += [e.payload["n"] for e in page]
        after = page[-1].global_position
    assert seen == list(range(25))
    assert after == await store.last_position()


async def test_read_event_of_an_unknown_id_is_not_found(store: EventStore) -> None:
    with pytest.raises(NotFound):
        await store.read_event("00000000-0000-0000-0000-000000000000")


async def test_snapshots_keep_the_latest_version(store: EventStore) -> None:
    assert await store.load_snapshot("cart-1") is None
    await store.save_snapshot(Snapshot("cart-1", 10, {"items": 10}, schema_version=3))
    await store.save_snapshot(Snapshot("cart-1", 4, {"items": 4}))

    snap = await store.load_snapshot("cart-1")
    assert snap is not None
    assert (snap.version, snap.state, snap.schema_version) == (10, {"items": 10}, 3)

    await store.save_snapshot(Snapshot("cart-1", 20, {"items": 20}))
    snap = await store.load_snapshot("cart-1")
    assert snap is not None and snap.version == 20


async def test_read_latest_gives_the_latest_snapshot_and_the_events_after_it(
    store: EventStore,
) -> None:
    assert await store.read_latest("cart-1") == (None, [])
    await store.append("cart-1", [ev(n=1), ev(n=2), ev(n=3)], NO_STREAM)
    snap, events = await store.read_latest("cart-1")
    assert snap is None and [e.payload["n"] for e in events] == [1, 2, 3]

    at = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    await store.save_snapshot(Snapshot("cart-1", 2, {"n": 2}, schema_version=3, event_at=at))
    snap, events = await store.read_latest("cart-1")
    assert snap is not None
    assert (snap.stream_id, snap.version, snap.state, snap.schema_version, snap.event_at) == \
        ("cart-1", 2, {"n": 2}, 3, at)
    assert [(e.stream_version, e.payload["n"]) for e in events] == [(3, 3)]
    assert events[0].stream_id == "cart-1" and events[0].global_position == 3
    await store.save_snapshot(Snapshot("cart-1", 3, {"n": 3}))
    snap, events = await store.read_latest("cart-1")
    assert snap is not None and snap.version == 3 and events == []


async def test_past_snapshots_are_found_by_version_and_by_moment(store: EventStore) -> None:
    t0 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    for version in (100, 200, 300):
        at = t0 + timedelta(minutes=version)
        await store.save_snapshot(Snapshot("cart-1", version, {"v": version}, event_at=at))

    latest = await store.load_snapshot("cart-1")
    below = await store.load_snapshot("cart-1", max_version=250)
    earlier = await store.load_snapshot("cart-1", until=t0 + timedelta(minutes=299))
    assert latest is not None and latest.version == 300
    assert below is not None and below.state == {"v": 200}
    assert earlier is not None and earlier.event_at == t0 + timedelta(minutes=200)
    assert await store.load_snapshot("cart-1", max_version=99) is None


async def test_read_events_filters_the_log_and_pages_by_position(store: EventStore) -> None:
    t0 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)

    def at(minutes: int, kind: str, correlation: str | None = None) -> NewEvent:
        return NewEvent(type=kind, payload={"m": minutes}, correlation_id=correlation,
                        occurred_at=t0 + timedelta(minutes=minutes))

    await store.append("cart-1", [at(1, "ItemAdded", "tx-1"), at(2, "ItemRemoved", "tx-1")])
    await store.append("cartx-1", [at(3, "ItemAdded")])
    await store.append("order-1", [at(4, "OrderPlaced", "tx-1"), at(5, "ItemAdded", "tx-2")])

    async def minutes(where: EventFilter, after: int = 0, limit: int = 100) -> list[object]:
        return [e.payload["m"] for e in await store.read_events(where, after=after, limit=limit)]

    assert await minutes(EventFilter(stream_id="cart-1")) == [1, 2]
    assert await minutes(EventFilter(aggregates=("cart",))) == [1, 2]
    assert await minutes(EventFilter(aggregates=("cart", "order"))) == [1, 2, 4, 5]
    assert await minutes(EventFilter(types=("ItemAdded",))) == [1, 3, 5]
    assert await minutes(EventFilter(correlation_id="tx-1")) == [1, 2, 4]
    assert await minutes(EventFilter(since=t0 + timedelta(minutes=2),
                                     until=t0 + timedelta(minutes=4))) == [2, 3, 4]
    first = await store.read_events(EventFilter(), limit=2)
    assert await minutes(EventFilter(), after=first[-1].global_position) == [3, 4, 5]

    newest = await store.read_events(EventFilter(types=("ItemAdded",)), descending=True, limit=2)
    assert [e.payload["m"] for e in newest] == [5, 3]
    below = await store.read_events(EventFilter(types=("ItemAdded",)), descending=True,
                                    before=newest[-1].global_position)
    assert [e.payload["m"] for e in below] == [1]
    window = await store.read_events(EventFilter(), after=first[0].global_position,
                                     before=newest[0].global_position)
    assert [e.payload["m"] for e in window] == [2, 3, 4]


async def test_a_unit_of_work_commits_everything_together(store: EventStore) -> None:
    async with store.transaction() as uow:
        uow.append("a-1", [ev()], NO_STREAM)
        uow.append("b-1", [ev(), ev()], NO_STREAM)
        uow.mark_processed("billing", "evt-1")
        uow.set_checkpoint("billing", 42)
        uow.put_document("carts", "a-1", {"status": "open", "lines": 1})

    assert [e.stream_id for e in uow.recorded] == ["a-1", "b-1", "b-1"]
    assert await store.is_processed("billing", "evt-1")
    assert await store.get_checkpoint("billing") == 42
    assert await store.get_document("carts", "a-1") == {"status": "open", "lines": 1}


async def test_a_unit_of_work_with_one_failing_step_writes_nothing(store: EventStore) -> None:
    await store.append("b-1", [ev()], NO_STREAM)
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            uow.append("a-1", [ev()], NO_STREAM)
            uow.put_document("carts", "a-1", {"status": "open"})
            uow.set_checkpoint("billing", 9)
            uow.append("b-1", [ev()], NO_STREAM)  # b-1 exists: conflict

    assert await store.stream_version("a-1") == 0
    assert await store.get_document("carts", "a-1") is None
    assert await store.get_checkpoint("billing") == 0


async def test_an_exception_inside_the_block_discards_the_unit_of_work(
    store: EventStore,
) -> None:
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            uow.append("a-1", [ev()])
            raise RuntimeError("handler failed")
    assert await store.read_all() == []


async def test_a_unit_expecting_a_stream_version_commits_only_while_it_holds(
    store: EventStore,
) -> None:
    await store.append("cart-1", [ev()], NO_STREAM)
    async with store.transaction() as uow:
        uow.expect_version("cart-1", 1)
        uow.expect_version("cart-2", 0)  # no event yet
        uow.mark_processed("billing", "evt-1")
        uow.append("cart-1", [ev()], 1)  # checked before the unit's own appends
    await store.append("cart-1", [ev()], 2)

    failed: list[str] = []
    with pytest.raises(ConcurrencyError) as caught:
        async with store.transaction() as uow:
            uow.after_failure(lambda: failed.append("forget cart-1"))
            uow.mark_processed("billing", "evt-2")
            uow.expect_version("cart-1", 2)  # moved to 3 meanwhile
            uow.put_document("carts", "cart-1", {"lines": 2})
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == \
        ("cart-1", 2, 3)
    assert failed == ["forget cart-1"]
    assert not await store.is_processed("billing", "evt-2")
    assert await store.get_document("carts", "cart-1") is None


async def test_a_version_expected_before_a_position_ignores_later_events(
    store: EventStore,
) -> None:
    (first,) = await store.append("cart-1", [ev()], NO_STREAM)
    (later,) = await store.append("cart-1", [ev()], 1)
    async with store.transaction() as uow:  # cart-1 moved, but after that position
        uow.operations.append(ExpectVersion("cart-1", 1, before=later.global_position - 1))
        uow.mark_processed("billing", "evt-1")
    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            uow.operations.append(ExpectVersion("cart-1", 1, before=later.global_position))
            uow.mark_processed("billing", "evt-2")
    with pytest.raises(ConcurrencyError):  # a version the stream never reached
        async with store.transaction() as uow:
            uow.operations.append(ExpectVersion("cart-1", 3, before=first.global_position))
            uow.mark_processed("billing", "evt-3")
    assert await store.is_processed("billing", "evt-1")
    assert not await store.is_processed("billing", "evt-2")


async def test_inbox_refuses_the_second_processing_of_an_event(store: EventStore) -> None:
    async with store.transaction() as uow:
        uow.mark_processed("inventory", "evt-9")
        uow.append("stock-1", [ev()])

    with pytest.raises(AlreadyProcessed):
        async with store.transaction() as uow:
            uow.mark_processed("inventory", "evt-9")
            uow.append("stock-1", [ev()])

    assert await store.stream_version("stock-1") == 1
    assert not await store.is_processed("payment", "evt-9")


async def test_concurrent_units_of_work_fail_independently(store: EventStore) -> None:
    await store.append("hot-1", [ev()], NO_STREAM)

    async def work(i: int) -> None:
        async with store.transaction() as uow:
            uow.append(f"cold-{i}", [ev()], NO_STREAM)
            if i % 2:
                uow.append("hot-1", [ev()], NO_STREAM)  # conflicts

    outcomes = await asyncio.gather(*(work(i) for i in range(10)), return_exceptions=True)
    assert [isinstance(o, ConcurrencyError) for o in outcomes] == [bool(i % 2) for i in range(10)]
    for i in range(10):
        assert await store.stream_version(f"cold-{i}") == (0 if i % 2 else 1)


async def test_concurrent_units_of_work_keep_each_its_own_outcome_in_every_kind_of_write(
    store: EventStore,
) -> None:
    # Units committed together (SQLite's group commit) must come out as if one by one:
    # a repeated inbox mark fails its unit only, and the others' marks, checkpoints,
    # documents and events all land, the last write of a document winning.
    async with store.transaction() as uow:
        uow.mark_processed("c", "seen")
        uow.put_document("d", "shared", {"by": "setup"})

    async def work(i: int) -> None:
        async with store.transaction() as uow:
            uow.mark_processed("c", "seen" if i == 3 else f"e{i}")
            uow.append(f"s-{i}", [ev(n=i)], NO_STREAM)
            uow.set_checkpoint(f"bus:{i}", i)
            uow.put_document("d", f"k{i}", {"i": i})
            if i == 5:
                uow.delete_document("d", "shared")

    outcomes = await asyncio.gather(*(work(i) for i in range(8)), return_exceptions=True)

    assert [type(o).__name__ for o in outcomes] == [
        "AlreadyProcessed" if i == 3 else "NoneType" for i in range(8)]
    for i in range(8):
        assert await store.stream_version(f"s-{i}") == (0 if i == 3 else 1)
        assert await store.get_checkpoint(f"bus:{i}") == (0 if i == 3 else i)
        assert await store.get_document("d", f"k{i}") == (None if i == 3 else {"i": i})
        assert await store.is_processed("c", f"e{i}") == (i != 3)
    assert await store.get_document("d", "shared") is None


async def test_documents_can_be_found_by_field_in_either_key_order_and_deleted(
    store: EventStore,
) -> None:
    async with store.transaction() as uow:
        uow.put_document("letters", "k1", {"consumer": "a", "attempts": 3, "open": True})
        uow.put_document("letters", "k2", {"consumer": "b", "attempts": 3, "open": True})
        uow.put_document("letters", "k3", {"consumer": "a", "attempts": 1, "open": False})
        uow.put_document("other", "k1", {"consumer": "a"})

    found = await store.find_documents("letters", where={"consumer": "a"})
    assert [k for k, _ in found] == ["k1", "k3"]
    found = await store.find_documents("letters", where={"consumer": "a", "attempts": 3})
    assert [k for k, _ in found] == ["k1"]
    assert [k for k, _ in await store.find_documents("letters", where={"open": False})] == [
        "k3"
    ]
    assert [k for k, _ in await store.find_documents("letters", after_key="k1", limit=1)] == [
        "k2"
    ]
    newest_first = await store.find_documents("letters", descending=True, limit=2)
    assert [k for k, _ in newest_first] == ["k3", "k2"]
    below = await store.find_documents("letters", descending=True, after_key="k2")
    assert [k for k, _ in below] == ["k1"]
    assert [k for k, _ in await store.find_documents(
        "letters", where={"consumer": "a"}, descending=True)] == ["k3", "k1"]

    async with store.transaction() as uow:
        uow.delete_document("letters", "k1")
    assert await store.get_document("letters", "k1") is None
    assert await store.get_document("other", "k1") == {"consumer": "a"}


async def test_documents_of_several_collections_are_read_at_once(store: EventStore) -> None:
    async with store.transaction() as uow:
        uow.put_document("stores", "s1", {"name": "Centre"})
        uow.put_document("products", "p1", {"price": 100})
        uow.put_document("products", "p2", {"price": 250})
        uow.put_document("stores", "p1", {"name": "same key, other collection"})

    found = await store.get_documents(
        [("stores", "s1"), ("products", "p1"), ("products", "p2"), ("products", "gone"),
         ("products", "p1")])
    assert found == {("stores", "s1"): {"name": "Centre"}, ("products", "p1"): {"price": 100},
                     ("products", "p2"): {"price": 250}}
    assert await store.get_documents([("stores", "p1")]) == {
        ("stores", "p1"): {"name": "same key, other collection"}}
    assert await store.get_documents([]) == {}


async def test_a_collection_is_replaced_by_another_in_one_commit(store: EventStore) -> None:
    async with store.transaction() as uow:
        uow.put_document("stock", "old", {"n": 1})
        uow.put_document("stock", "both", {"n": 1})
        uow.put_document("stock~rebuild", "both", {"n": 2})
        uow.put_document("stock~rebuild", "new", {"n": 2})
        uow.put_document("orders", "old", {"n": 9})

    async with store.transaction() as uow:
        uow.replace_collection("stock", "stock~rebuild")

    assert await store.find_documents("stock") == [("both", {"n": 2}), ("new", {"n": 2})]
    assert await store.find_documents("stock~rebuild") == []
    assert await store.get_document("orders", "old") == {"n": 9}


async def test_a_failed_unit_of_work_replaces_no_collection(store: EventStore) -> None:
    await store.append("s-1", [ev()])
    async with store.transaction() as uow:
        uow.put_document("live", "a", {"n": 1})
        uow.put_document("shadow", "b", {"n": 2})

    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            uow.replace_collection("live", "shadow")
            uow.append("s-1", [ev()], NO_STREAM)  # conflicts: nothing may be swapped

    assert [k for k, _ in await store.find_documents("live")] == ["a"]
    assert [k for k, _ in await store.find_documents("shadow")] == ["b"]


async def test_clearing_a_collection_leaves_the_others(store: EventStore) -> None:
    async with store.transaction() as uow:
        uow.put_document("shadow", "a", {"n": 1})
        uow.put_document("live", "a", {"n": 1})
    async with store.transaction() as uow:
        uow.clear_collection("shadow")

    assert await store.find_documents("shadow") == []
    assert await store.get_document("live", "a") == {"n": 1}


async def test_a_conditional_checkpoint_moves_only_from_the_expected_position(
    store: EventStore,
) -> None:
    async with store.transaction() as uow:
        uow.set_checkpoint("projection:x", 5, expected=0)  # none stored counts as 0
    async with store.transaction() as uow:
        uow.set_checkpoint("projection:x", 9, expected=5)
    assert await store.get_checkpoint("projection:x") == 9

    with pytest.raises(ConcurrencyError):
        async with store.transaction() as uow:
            uow.put_document("live", "k", {"stale": True})
            uow.set_checkpoint("projection:x", 12, expected=5)  # someone moved it to 9

    assert await store.get_checkpoint("projection:x") == 9
    assert await store.get_document("live", "k") is None


async def test_of_two_concurrent_conditional_checkpoint_moves_one_wins(
    store: EventStore,
) -> None:
    async with store.transaction() as uow:
        uow.set_checkpoint("projection:race", 1)

    async def move(to: int) -> None:
        async with store.transaction() as uow:
            uow.put_document("race", str(to), {"to": to})
            uow.set_checkpoint("projection:race", to, expected=1)

    outcomes = await asyncio.gather(move(2), move(3), return_exceptions=True)

    assert sorted(type(o).__name__ for o in outcomes) == ["ConcurrencyError", "NoneType"]
    winner = await store.get_checkpoint("projection:race")
    assert [k for k, _ in await store.find_documents("race")] == [str(winner)]


async def test_concurrent_checkpoint_moves_each_succeed_or_fail_on_their_own(
    store: EventStore,
) -> None:
    async with store.transaction() as uow:
        uow.set_checkpoint("projection:a", 5)
        uow.set_checkpoint("projection:b", 5)

    async def move(name: str, to: int, expected: int | None) -> None:
        async with store.transaction() as uow:
            uow.set_checkpoint(name, to, expected=expected)

    outcomes = await asyncio.gather(
        move("bus:plain", 7, None),
        move("projection:a", 9, 5),        # where expected: moves
        move("projection:b", 9, 4),        # not where expected: fails
        move("projection:new", 3, 0),      # no row counts as 0: moves
        move("projection:gone", 3, 2),     # no row, 2 expected: fails
        return_exceptions=True,
    )

    assert [type(o).__name__ for o in outcomes] == [
        "NoneType", "NoneType", "ConcurrencyError", "NoneType", "ConcurrencyError"]
    assert [await store.get_checkpoint(n) for n in (
        "bus:plain", "projection:a", "projection:b", "projection:new", "projection:gone",
    )] == [7, 9, 5, 3, 0]


async def test_outbox_hands_out_unsent_events_until_marked_sent(
    store_factory: MakeStore,
) -> None:
    store = await store_factory(outbox=True)
    sent = await store.append("order-1", [ev(n=1), ev(n=2)])
    await store.append("order-2", [ev(n=3)])

    with pytest.raises(RuntimeError):
        async with store.outbox_batch(10) as batch:
            assert [e.payload["n"] for e in batch] == [1, 2, 3]
            raise RuntimeError("broker down: nothing is marked sent")

    async with store.outbox_batch(2) as batch:
        assert [e.event_id for e in batch] == [e.event_id for e in sent]
    async with store.outbox_batch(10) as batch:
        assert [e.payload["n"] for e in batch] == [3]
    async with store.outbox_batch(10) as batch:
        assert batch == []


async def test_published_events_wait_in_the_log_stage_until_shipped(
    store_factory: MakeStore,
) -> None:
    store = await store_factory(outbox=True)
    await store.append("order-1", [ev(n=1), ev(n=2)])
    await store.append("order-2", [ev(n=3)])
    async with store.outbox_batch(10, log=True) as batch:
        assert batch == [], "an event is shipped to the whole log only once published"

    async with store.outbox_batch(2):
        pass
    assert (await store.outbox_backlog(), await store.outbox_backlog(log=True)) == (1, 2)
    with pytest.raises(RuntimeError):
        async with store.outbox_batch(10, log=True) as batch:
            assert [e.payload["n"] for e in batch] == [1, 2]
            raise RuntimeError("broker down: nothing is marked shipped")
    async with store.outbox_batch(10):
        pass
    async with store.outbox_batch(10, log=True) as batch:
        assert [e.payload["n"] for e in batch] == [1, 2, 3]
    async with store.outbox_batch(10, log=True) as batch:
        assert batch == []
    assert (await store.outbox_backlog(), await store.outbox_backlog(log=True)) == (0, 0)


async def test_without_outbox_appends_leave_nothing_to_relay(store: EventStore) -> None:
    await store.append("order-1", [ev()])
    async with store.outbox_batch(10) as batch:
        assert batch == []
    assert await store.outbox_backlog() == 0


async def test_outbox_backlog_counts_events_until_they_are_sent(store_factory: MakeStore) -> None:
    store = await store_factory(outbox=True)
    await store.append("order-1", [ev(n=1), ev(n=2)])
    await store.append("order-2", [ev(n=3)])
    assert await store.outbox_backlog() == 3

    async with store.outbox_batch(2):
        pass
    assert await store.outbox_backlog() == 1


async def test_events_survive_closing_and_reopening_the_store(
    store_factory: MakeStore,
) -> None:
    first = await store_factory()
    await first.append("cart-1", [ev(n=1)])
    await first.close()

    second = await store_factory()
    assert [e.payload["n"] for e in await second.read_stream("cart-1")] == [1]
    recorded = await second.append("cart-1", [ev(n=2)], 1)
    assert recorded[0].global_position == 2


async def test_wait_for_events_wakes_up_when_an_event_is_committed(store: EventStore) -> None:
    async def later() -> None:
        await asyncio.sleep(0.05)
        await store.append("cart-1", [ev()])

    writer = asyncio.create_task(later())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.wait_for_events(after=0, timeout=5)
    assert loop.time() - started < 4
    await writer
    assert len(await store.read_all()) == 1


async def test_a_tailing_reader_sees_every_event_once_in_order_under_8_writers(
    store: EventStore,
) -> None:
    writers, per_writer = 8, 60
    expected: set[str] = set()
    done = asyncio.Event()

    async def writer(w: int) -> None:
        rng = random.Random(w)
        for i in range(per_writer):
            batch = [ev(w=w, i=i) for _ in range(rng.choice([1, 1, 2, 3]))]
            expected.update(e.event_id for e in batch)
            await store.append(f"w{w}-{i % 5}", batch)

    async def tail() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        after = 0
        while True:
            page = await store.read_all(after=after, limit=50)
            seen += [(e.global_position, e.event_id) for e in page]
            if page:
                after = page[-1].global_position
            elif done.is_set() and after >= await store.last_position():
                return seen
            else:
                await store.wait_for_events(after, timeout=0.05)

    reader = asyncio.create_task(tail())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    seen = await asyncio.wait_for(reader, 60)

    positions = [p for p, _ in seen]
    assert positions == sorted(positions)
    assert len(seen) == len({i for _, i in seen}), "an event was delivered twice"
    assert {i for _, i in seen} == expected, "an event was skipped"
