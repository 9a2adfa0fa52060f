"""The bank simulator: its decline rules, idempotency and refunds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.payments import gateway
from magasin.payments.gateway import BankSimulator
from magasin.shared.errors import BusinessRuleViolation, Conflict, Unavailable


def bank(decline_rate: float = 0.0, seed: int | None = None) -> BankSimulator:
    return BankSimulator(latency_s=0, decline_rate=decline_rate, seed=seed)


async def test_an_ordinary_charge_is_approved_with_a_reference() -> None:
    charge = await bank().charge("k", 2500, "CAD", "VISA")
    assert charge.approved
    assert charge.reference
    assert charge.decline_reason is None


@pytest.mark.parametrize(
    ("amount", "method", "reason"),
    [
        (2500, "FAIL_CARD", "declined"),
        (1_000_001, "VISA", "limit_exceeded"),
        (0, "VISA", "invalid_amount"),
    ],
)
async def test_the_bank_declines_by_its_rules(amount: int, method: str, reason: str) -> None:
    simulator = bank()
    charge = await simulator.charge("k", amount, "CAD", method)
    assert not charge.approved
    assert charge.decline_reason == reason
    assert simulator.captured_total == 0


async def test_exactly_ten_thousand_is_within_the_limit() -> None:
    assert (await bank().charge("k", 1_000_000, "CAD", "VISA")).approved


async def test_the_same_key_gets_the_same_answer_and_charges_once() -> None:
    simulator = bank()
    first = await simulator.charge("k", 2500, "CAD", "VISA")
    again = await simulator.charge("k", 2500, "CAD", "VISA")
    assert again == first
    assert len(simulator.charges) == 1
    assert simulator.captured_total == 2500


async def test_concurrent_calls_with_one_key_charge_once() -> None:
    simulator = BankSimulator(latency_s=0.01)
    answers = await asyncio.gather(
        *(simulator.charge("k", 2500, "CAD", "VISA") for _ in range(5))
    )
    assert len(set(answers)) == 1
    assert simulator.captured_total == 2500


async def test_a_key_reused_for_another_charge_is_a_conflict() -> None:
    simulator = bank()
    await simulator.charge("k", 2500, "CAD", "VISA")
    with pytest.raises(Conflict):
        await simulator.charge("k", 9900, "CAD", "VISA")


async def test_random_declines_follow_the_rate_and_the_seed() -> None:
    async def outcomes(seed: int) -> list[bool]:
        simulator = bank(decline_rate=0.5, seed=seed)
        return [(await simulator.charge(str(i), 100, "CAD", "VISA")).approved
                for i in range(200)]

    first = await outcomes(7)
    assert first == await outcomes(7)
    assert 60 < first.count(False) < 140


async def test_a_decline_rate_of_one_declines_everything() -> None:
    charge = await bank(decline_rate=1.0).charge("k", 100, "CAD", "VISA")
    assert charge.decline_reason == "declined"


async def test_a_captured_charge_is_refunded_once() -> None:
    simulator = bank()
    charge = await simulator.charge("k", 2500, "CAD", "VISA")
    reference = await simulator.refund("r", charge.reference, 2500)
    assert await simulator.refund("r", charge.reference, 2500) == reference
    assert simulator.refunds == [reference]
    assert simulator.captured_total == 0
    with pytest.raises(BusinessRuleViolation, match="already refunded"):
        await simulator.refund("other key", charge.reference, 2500)


async def test_refunding_an_unknown_or_declined_charge_is_refused() -> None:
    simulator = bank()
    declined = await simulator.charge("k", 2500, "CAD", "FAIL_CARD")
    with pytest.raises(BusinessRuleViolation, match="no captured charge"):
        await simulator.refund("r", "CH-UNKNOWN", 2500)
    with pytest.raises(BusinessRuleViolation, match="no captured charge"):
        await simulator.refund("r", declined.reference, 2500)


async def test_a_refund_over_the_charge_is_refused() -> None:
    simulator = bank()
    charge = await simulator.charge("k", 2500, "CAD", "VISA")
    with pytest.raises(BusinessRuleViolation, match="not within"):
        await simulator.refund("r", charge.reference, 2501)


async def test_an_unreachable_bank_raises_unavailable_and_takes_nothing() -> None:
    simulator = bank()
    simulator.reachable = False
    with pytest.raises(Unavailable):
        await simulator.charge("k", 2500, "CAD", "VISA")
    assert simulator.charges == []


async def test_a_bank_with_a_ledger_is_one_bank_for_every_process_and_restart(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "bank.db") as ledger:
        first = BankSimulator(latency_s=0, ledger=ledger)
        charge = await first.charge("tx-1", 5000, "CAD", "VISA")

        restarted = BankSimulator(latency_s=0, ledger=ledger)
        assert await restarted.charge("tx-1", 5000, "CAD", "VISA") == charge
        refund = await restarted.refund("tx-1:refund", charge.reference, 5000)

        third = BankSimulator(latency_s=0, ledger=ledger)
        assert await third.refund("tx-1:refund", charge.reference, 5000) == refund
        with pytest.raises(BusinessRuleViolation, match="already refunded"):
            await third.refund("tx-1:again", charge.reference, 5000)


class _Books(SqliteEventStore):
    """A bank's books that count their reads, and may let something happen before one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0
        self.before_read: Callable[[str], Awaitable[None]] | None = None

    async def get_document(self, collection: str, key: str) -> Any:
        self.reads += 1
        if self.before_read is not None:
            await self.before_read(collection)
        return await super().get_document(collection, key)


async def test_a_refund_made_meanwhile_by_another_client_with_the_same_key_is_the_answer(
    tmp_path: Path,
) -> None:
    async with _Books(tmp_path / "bank.db") as books:
        one, other = (BankSimulator(latency_s=0, ledger=books) for _ in range(2))
        charge = await one.charge("tx-1", 2500, "CAD", "VISA")
        refunds: list[str] = []

        async def other_refunds_first(collection: str) -> None:
            # `one` found no refund under the key, and reads the charge next.
            if collection == gateway.CAPTURED and books.before_read is not None:
                books.before_read = None
                refunds.append(await other.refund("tx-1:refund", charge.reference, 2500))

        books.before_read = other_refunds_first
        refunds.append(await one.refund("tx-1:refund", charge.reference, 2500))
        assert refunds[0] == refunds[1]


async def test_a_new_key_is_charged_without_reading_the_books_and_a_known_one_from_them(
    tmp_path: Path,
) -> None:
    async with _Books(tmp_path / "bank.db") as books:
        charge = await BankSimulator(latency_s=0, ledger=books).charge("tx-1", 2500, "CAD", "VISA")
        assert books.reads == 0

        restarted = BankSimulator(latency_s=0, ledger=books)
        assert await restarted.charge("tx-1", 2500, "CAD", "VISA") == charge
        assert books.reads == 1  # its claim on the key failed: the books told the answer
        with pytest.raises(Conflict):
            await BankSimulator(latency_s=0, ledger=books).charge("tx-1", 999, "CAD", "VISA")
        assert restarted.captured_total == 2500



async def test_a_bank_with_books_keeps_only_its_latest_charges_in_memory_and_reads_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "KEPT_IN_MEMORY", 2)
    async with _Books(tmp_path / "bank.db") as books:
        bank = BankSimulator(latency_s=0, ledger=books)
        first = await bank.charge("tx-1", 1000, "CAD", "VISA")
        await bank.refund("tx-1:refund", first.reference, 1000)
        for n in (2, 3, 4):
            await bank.charge(f"tx-{n}", 1000 * n, "CAD", "VISA")
        assert [c.reference for c in bank.charges] == [
            c.reference for c in [await bank.lookup("tx-3"), await bank.lookup("tx-4")]
            if c is not None]

        reads = books.reads
        assert await bank.charge("tx-1", 1000, "CAD", "VISA") == first  # from the books
        assert books.reads > reads
        with pytest.raises(BusinessRuleViolation, match="already refunded"):
            await bank.refund("tx-1:again", first.reference, 1000)
        with pytest.raises(Conflict):
            await bank.charge("tx-2", 1, "CAD", "VISA")


async def test_a_bank_without_books_forgets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway, "KEPT_IN_MEMORY", 2)
    bank = BankSimulator(latency_s=0)
    charges = [await bank.charge(f"tx-{n}", 100, "CAD", "VISA") for n in range(5)]
    assert bank.charges == charges
    assert await bank.charge("tx-0", 100, "CAD", "VISA") == charges[0]

