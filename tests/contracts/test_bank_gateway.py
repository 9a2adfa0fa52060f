"""Contract of the bank port (`payments.gateway.BankGateway`), run against every adapter:
the simulator (in memory, and keeping its books in each event store), and the circuit
breaker and tracing wrappers in front of it. Reconciliation relies on `lookup`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from magasin.eventstore.store import EventStore
from magasin.payments.breaker import CircuitBreaker
from magasin.payments.gateway import BankGateway, BankRecord, BankSimulator
from magasin.payments.traced import TracedBank
from magasin.shared.errors import BusinessRuleViolation
from tests.conftest import _drop_schema


@dataclass
class Bank:
    gateway: BankGateway
    reopen: Callable[[], BankGateway] | None
    """Another client of the same bank (a second payment process), when the adapter keeps
    its books outside the process."""


ADAPTERS = [
    "simulator", "simulator-sqlite-ledger",
    pytest.param("simulator-postgres-ledger", marks=pytest.mark.postgres),
    "circuit-breaker", "traced",
]


@pytest.fixture(params=ADAPTERS)
async def bank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bank]:
    kind: str = request.param
    ledger: EventStore | None = None
    if kind == "simulator-sqlite-ledger":
        from magasin.eventstore.sqlite import SqliteEventStore

        ledger = SqliteEventStore(tmp_path / "bank.db")
    elif kind == "simulator-postgres-ledger":
        from magasin.eventstore.postgres import PostgresEventStore

        url, schema = request.getfixturevalue("pg_database"), request.getfixturevalue("pg_schema")
        ledger = PostgresEventStore(url, schema=schema)
    if ledger is not None:
        await ledger.open()
        books = ledger
        yield Bank(BankSimulator(latency_s=0, ledger=books),
                   lambda: BankSimulator(latency_s=0, ledger=books))
        await ledger.close()
        if kind == "simulator-postgres-ledger":
            await _drop_schema(url, schema)
        return
    simulator = BankSimulator(latency_s=0)
    wrapped: BankGateway = {
        "simulator": simulator, "circuit-breaker": CircuitBreaker(simulator),
        "traced": TracedBank(simulator),
    }[kind]
    yield Bank(wrapped, None)


async def test_a_key_the_bank_never_saw_is_not_found(bank: Bank) -> None:
    assert await bank.gateway.lookup("never-charged") is None


async def test_an_approved_charge_is_found_holding_the_money(bank: Bank) -> None:
    charge = await bank.gateway.charge("tx-1", 2500, "CAD", "VISA")
    found = await bank.gateway.lookup("tx-1")
    assert found == BankRecord("tx-1", True, charge.reference, 2500, "CAD")
    assert found.holds_money


async def test_a_declined_charge_is_found_declined(bank: Bank) -> None:
    await bank.gateway.charge("tx-1", 2500, "CAD", "FAIL_CARD")
    found = await bank.gateway.lookup("tx-1")
    assert found is not None
    assert (found.approved, found.decline_reason, found.holds_money) == (False, "declined", False)


async def test_a_refunded_charge_is_found_with_its_refund(bank: Bank) -> None:
    charge = await bank.gateway.charge("tx-1", 2500, "CAD", "VISA")
    refund = await bank.gateway.refund("tx-1:refund", charge.reference, 2500)
    found = await bank.gateway.lookup("tx-1")
    assert found is not None
    assert (found.refund_reference, found.holds_money) == (refund, False)


async def test_a_lookup_changes_nothing(bank: Bank) -> None:
    charge = await bank.gateway.charge("tx-1", 2500, "CAD", "VISA")
    first = await bank.gateway.lookup("tx-1")
    assert await bank.gateway.lookup("tx-1") == first
    assert await bank.gateway.charge("tx-1", 2500, "CAD", "VISA") == charge
    assert await bank.gateway.lookup("other") is None


async def test_another_client_of_the_same_bank_finds_what_the_first_did(bank: Bank) -> None:
    if bank.reopen is None:
        pytest.skip("this adapter keeps its books in the process: there is no other client")
    charge = await bank.gateway.charge("tx-1", 2500, "CAD", "VISA")
    other = bank.reopen()
    assert await other.lookup("tx-1") == BankRecord("tx-1", True, charge.reference, 2500, "CAD")
    refund = await other.refund("tx-1:refund", charge.reference, 2500)
    found = await bank.gateway.lookup("tx-1")  # the first client sees the other's refund
    assert found is not None and found.refund_reference == refund


async def test_two_clients_racing_one_key_get_one_decision(bank: Bank) -> None:
    if bank.reopen is None:
        pytest.skip("this adapter keeps its books in the process: there is no other client")
    other = bank.reopen()
    charges = await asyncio.gather(bank.gateway.charge("tx-1", 2500, "CAD", "VISA"),
                                   other.charge("tx-1", 2500, "CAD", "VISA"))
    assert charges[0] == charges[1]
    refunds = await asyncio.gather(
        bank.gateway.refund("tx-1:refund", charges[0].reference, 2500),
        other.refund("tx-1:refund", charges[0].reference, 2500),
    )
    assert refunds[0] == refunds[1]
    found = await other.lookup("tx-1")
    assert found is not None and found.refund_reference == refunds[0]


async def test_a_charge_is_refunded_once_whichever_client_and_key_refund_it(bank: Bank) -> None:
    first = bank.gateway
    second = bank.reopen() if bank.reopen is not None else first
    charge = await first.charge("tx-1", 1000, "CAD", "VISA")
    assert await second.charge("tx-1", 1000, "CAD", "VISA") == charge  # known to both
    await first.refund("tx-1:refund", charge.reference, 1000)
    with pytest.raises(BusinessRuleViolation, match="already refunded"):
        await second.refund("tx-1:reconciled", charge.reference, 1000)

    other = await first.charge("tx-2", 2000, "CAD", "VISA")
    outcomes = await asyncio.gather(
        first.refund("tx-2:a", other.reference, 2000),
        second.refund("tx-2:b", other.reference, 2000), return_exceptions=True)
    assert sorted(type(outcome).__name__ for outcome in outcomes) == [
        "BusinessRuleViolation", "str"]
