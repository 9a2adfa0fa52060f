"""The circuit breaker in front of the bank (seed 6.6.2): failure rate over a window of
calls, open for a while, then a few trial calls."""

from __future__ import annotations

import asyncio

import pytest

from magasin.payments.breaker import BreakerPolicy, BreakerState, CircuitBreaker, CircuitOpen
from magasin.payments.gateway import BankSimulator, Charge
from magasin.shared.errors import BusinessRuleViolation, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Bank(BankSimulator):
    """The simulator, counting calls; with `gate` set, charges wait for it to open."""

    def __init__(self) -> None:
        super().__init__(latency_s=0)
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().charge(idempotency_key, amount, currency, method)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bank() -> Bank:
    return Bank()


@pytest.fixture
def breaker(bank: Bank, clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(bank, BreakerPolicy(), clock=clock)  # 50 % of 10, min 5, 30 s, 3


def state_of(gateway: CircuitBreaker) -> BreakerState:
    """Read afresh: the state changes behind the property as calls succeed or fail."""
    return gateway.state


async def calls(gateway: CircuitBreaker, bank: Bank, outcomes: str) -> None:
    """One charge per letter: `o` succeeds, `x` finds the bank unreachable."""
    for n, outcome in enumerate(outcomes):
        bank.reachable = outcome == "o"
        if outcome == "o":
            await gateway.charge(f"k{bank.calls}-{n}", 100, "CAD", "VISA")
        else:
            with pytest.raises(Unavailable):
                await gateway.charge(f"k{bank.calls}-{n}", 100, "CAD", "VISA")
    bank.reachable = True


async def open_it(gateway: CircuitBreaker, bank: Bank) -> None:
    await calls(gateway, bank, "xxxxx")
    assert state_of(gateway) is BreakerState.OPEN


async def test_fewer_calls_than_the_minimum_never_open_the_circuit(
    breaker: CircuitBreaker, bank: Bank
) -> None:
    await calls(breaker, bank, "xxxx")
    assert state_of(breaker) is BreakerState.CLOSED


async def test_half_of_the_last_ten_calls_failing_opens_the_circuit(
    breaker: CircuitBreaker, bank: Bank
) -> None:
    await calls(breaker, bank, "oooooo" + "xxxx")
    assert state_of(breaker) is BreakerState.CLOSED, "4 failures of 10 is under 50 %"
    await calls(breaker, bank, "x")
    assert state_of(breaker) is BreakerState.OPEN, "the oldest success left the window"


async def test_failures_older_than_the_window_are_forgotten(
    breaker: CircuitBreaker, bank: Bank
) -> None:
    await calls(breaker, bank, "xxxx" + "oooooo" + "xx")
    # 6 failures of 12 calls, but only 4 of the last 10.
    assert state_of(breaker) is BreakerState.CLOSED


async def test_an_open_circuit_fails_fast_without_calling_the_bank(
    breaker: CircuitBreaker, bank: Bank, clock: Clock
) -> None:
    await open_it(breaker, bank)
    before = bank.calls
    clock.now = 12
    with pytest.raises(CircuitOpen, match="circuit breaker is open") as raised:
        await breaker.charge("late", 100, "CAD", "VISA")
    assert isinstance(raised.value, Unavailable), "the payment is retried, not declined"
    assert raised.value.retry_in == pytest.approx(18)
    assert bank.calls == before


async def test_after_the_open_time_three_successful_trials_close_the_circuit(
    breaker: CircuitBreaker, bank: Bank, clock: Clock
) -> None:
    await open_it(breaker, bank)
    clock.now = 29.9
    assert state_of(breaker) is BreakerState.OPEN
    clock.now = 30
    assert state_of(breaker) is BreakerState.HALF_OPEN

    await calls(breaker, bank, "oo")
    assert state_of(breaker) is BreakerState.HALF_OPEN
    await calls(breaker, bank, "o")
    assert state_of(breaker) is BreakerState.CLOSED
    await calls(breaker, bank, "xxxx")
    assert state_of(breaker) is BreakerState.CLOSED, "closing starts a fresh window"


async def test_half_open_lets_three_trials_through_and_fails_the_others_fast(
    breaker: CircuitBreaker, bank: Bank, clock: Clock
) -> None:
    await open_it(breaker, bank)
    clock.now = 30
    bank.gate = asyncio.Event()
    trials = [
        asyncio.create_task(breaker.charge(f"t{n}", 100, "CAD", "VISA")) for n in range(3)
    ]
    await asyncio.sleep(0)
    before = bank.calls
    with pytest.raises(CircuitOpen):
        await breaker.charge("fourth", 100, "CAD", "VISA")
    assert bank.calls == before

    bank.gate.set()
    assert all(charge.approved for charge in await asyncio.gather(*trials))
    assert state_of(breaker) is BreakerState.CLOSED


async def test_a_failed_trial_opens_the_circuit_for_another_period(
    breaker: CircuitBreaker, bank: Bank, clock: Clock
) -> None:
    await open_it(breaker, bank)
    clock.now = 30
    await calls(breaker, bank, "ox")
    assert state_of(breaker) is BreakerState.OPEN
    clock.now = 59
    assert state_of(breaker) is BreakerState.OPEN
    clock.now = 60
    assert state_of(breaker) is BreakerState.HALF_OPEN


async def test_declines_and_refusals_are_answers_not_outages(
    breaker: CircuitBreaker, bank: Bank
) -> None:
    for key in ("a", "b", "c", "d", "e", "f"):
        assert not (await breaker.charge(key, 100, "CAD", "FAIL_CARD")).approved
        with pytest.raises(BusinessRuleViolation):
            await breaker.refund(key, "CH-UNKNOWN", 100)
    assert state_of(breaker) is BreakerState.CLOSED


async def test_health_tells_the_state_and_when_the_next_trial_comes(
    breaker: CircuitBreaker, bank: Bank, clock: Clock
) -> None:
    await calls(breaker, bank, "oo")
    assert breaker.health() == {
        "state": "closed", "calls_in_window": 2, "failures_in_window": 0, "retry_in_s": 0.0,
    }
    await calls(breaker, bank, "xxx")
    clock.now = 10
    assert breaker.health()["state"] == "open"
    assert breaker.health()["retry_in_s"] == 20.0


@pytest.mark.parametrize(
    "policy",
    [
        {"failure_rate": 0}, {"failure_rate": 1.5}, {"min_calls": 11}, {"min_calls": 0},
        {"open_s": -1}, {"half_open_calls": 0},
    ],
)
def test_a_policy_that_cannot_work_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        BreakerPolicy(**policy)  # type: ignore[arg-type]
