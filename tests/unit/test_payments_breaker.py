"""The circuit breaker in front of the bank (seed 6.6.2)."""

from __future__ import annotations

import pytest

from magasin.payments.breaker import BreakerState, CircuitBreaker
from magasin.payments.gateway import BankSimulator, Charge
from magasin.shared.errors import BusinessRuleViolation, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingBank(BankSimulator):
    def __init__(self) -> None:
        super().__init__(latency_s=0)
        self.calls = 0

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        self.calls += 1
        return await super().charge(idempotency_key, amount, currency, method)


def state_of(gateway: CircuitBreaker) -> BreakerState:
    """Read afresh: the state changes behind the property as calls succeed or fail."""
    return gateway.state


def breaker(bank: BankSimulator, clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(bank, failure_threshold=2, reset_after_s=10, clock=clock)


async def fail_twice(gateway: CircuitBreaker) -> None:
    for key in ("a", "b"):
        with pytest.raises(Unavailable):
            await gateway.charge(key, 100, "CAD", "VISA")


async def test_repeated_outages_open_the_circuit_and_calls_fail_fast() -> None:
    bank, clock = CountingBank(), Clock()
    gateway = breaker(bank, clock)
    bank.reachable = False
    await fail_twice(gateway)
    assert state_of(gateway) is BreakerState.OPEN

    bank.reachable = True
    with pytest.raises(Unavailable, match="circuit breaker is open"):
        await gateway.charge("c", 100, "CAD", "VISA")
    assert bank.calls == 2


async def test_after_the_timeout_a_successful_trial_closes_the_circuit() -> None:
    bank, clock = CountingBank(), Clock()
    gateway = breaker(bank, clock)
    bank.reachable = False
    await fail_twice(gateway)
    bank.reachable = True
    clock.now = 10
    assert state_of(gateway) is BreakerState.HALF_OPEN

    assert (await gateway.charge("c", 100, "CAD", "VISA")).approved
    assert state_of(gateway) is BreakerState.CLOSED


async def test_a_failed_trial_opens_the_circuit_again() -> None:
    bank, clock = CountingBank(), Clock()
    gateway = breaker(bank, clock)
    bank.reachable = False
    await fail_twice(gateway)
    clock.now = 10
    with pytest.raises(Unavailable):
        await gateway.charge("c", 100, "CAD", "VISA")
    assert state_of(gateway) is BreakerState.OPEN
    assert bank.calls == 3


async def test_declines_and_refusals_are_answers_not_outages() -> None:
    bank, clock = CountingBank(), Clock()
    gateway = breaker(bank, clock)
    for key in ("a", "b", "c"):
        assert not (await gateway.charge(key, 100, "CAD", "FAIL_CARD")).approved
        with pytest.raises(BusinessRuleViolation):
            await gateway.refund(key, "CH-UNKNOWN", 100)
    assert state_of(gateway) is BreakerState.CLOSED


async def test_a_success_resets_the_count_of_failures() -> None:
    bank, clock = CountingBank(), Clock()
    gateway = breaker(bank, clock)
    for key in ("a", "b", "c"):
        bank.reachable = False
        with pytest.raises(Unavailable):
            await gateway.charge(key, 100, "CAD", "VISA")
        bank.reachable = True
        await gateway.charge(key, 100, "CAD", "VISA")
    assert state_of(gateway) is BreakerState.CLOSED
