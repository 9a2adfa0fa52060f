"""A circuit breaker in front of the bank (seed 6.6.2): when the bank keeps failing, stop
calling it for a while, then try it again carefully.

    CLOSED --(failure rate >= failure_rate over the last `window` calls, at least
              `min_calls` of them)--> OPEN
    OPEN --(open_s elapsed)--> HALF_OPEN: `half_open_calls` trial calls, others fail fast
    HALF_OPEN --every trial succeeds--> CLOSED      HALF_OPEN --a trial fails--> OPEN

Only Unavailable counts as a failure: a declined charge or a refused refund is an answer.
While the breaker is not letting a call through it raises CircuitOpen, an Unavailable: the
payment handler lets it propagate, so the bus retries the message later instead of the
payment being declined, and the payment step's deadline ends a saga the bank never answers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from magasin.payments.gateway import BankGateway, BankRecord, Charge
from magasin.shared.errors import MagasinError, Unavailable

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CircuitOpen(Unavailable):
    """The breaker did not let the call reach the bank; `retry_in` seconds until it may."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(
            f"the {name} circuit breaker is open: not calling the {name} "
            f"(next trial in {retry_in:.1f} s)"
        )
        self.retry_in = retry_in


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When to open (`failure_rate` of the last `window` calls, once `min_calls` were made),
    how long to stay open, and how many trial calls must succeed to close again."""

    failure_rate: float = 0.5
    window: int = 10
    min_calls: int = 5
    open_s: float = 30.0
    half_open_calls: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be within (0, 1]")
        if not 1 <= self.min_calls <= self.window:
            raise ValueError("min_calls must be within [1, window]")
        if self.open_s < 0 or self.half_open_calls < 1:
            raise ValueError("open_s must be >= 0 and half_open_calls >= 1")


class CircuitBreaker(BankGateway):
    """Wraps a gateway; while open, calls raise CircuitOpen without reaching the bank.

    One breaker per process: each payment process learns about the bank on its own calls.
    """

    def __init__(
        self,
        gateway: BankGateway,
        policy: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "bank",
    ) -> None:
        self.gateway = gateway
        self.policy = policy or BreakerPolicy()
        self.name = name
        self._clock = clock
        self._calls: deque[bool] = deque(maxlen=self.policy.window)
        """Outcomes of the last calls while closed: True for a failure."""
        self._opened_at: float | None = None
        self._trials_started = 0
        self._trials_passed = 0

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.policy.open_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def retry_in(self) -> float:
        """Seconds until the open breaker lets trial calls through (0 unless OPEN)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_s - self._clock())

    def health(self) -> dict[str, Any]:
        """What `/health` shows of the breaker."""
        failures = sum(self._calls)
        return {
            "state": str(self.state),
            "calls_in_window": len(self._calls),
            "failures_in_window": failures,
            "retry_in_s": round(self.retry_in, 3),
        }

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        return await self._call(
            lambda: self.gateway.charge(idempotency_key, amount, currency, method)
        )

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        return await self._call(lambda: self.gateway.refund(idempotency_key, reference, amount))

    async def lookup(self, idempotency_key: str) -> BankRecord | None:
        return await self._call(lambda: self.gateway.lookup(idempotency_key))

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        state = self.state
        if state is BreakerState.OPEN:
            raise CircuitOpen(self.name, self.retry_in)
        trial = state is BreakerState.HALF_OPEN
        if trial:
            if self._trials_started >= self.policy.half_open_calls:
                raise CircuitOpen(self.name, 0.0)  # the trials are under way
            self._trials_started += 1
        opened_at = self._opened_at
        try:
            result = await call()
        except Unavailable:
            self._outcome(trial, opened_at, failed=True)
            raise
        except MagasinError:
            self._outcome(trial, opened_at, failed=False)  # a refusal is an answer
            raise
        except BaseException:
            if trial and opened_at == self._opened_at:
                self._trials_started -= 1  # tells nothing about the bank: give it back
            raise
        self._outcome(trial, opened_at, failed=False)
        return result

    def _outcome(self, trial: bool, opened_at: float | None, *, failed: bool) -> None:
        if opened_at != self._opened_at:
            return  # the breaker changed state while this call ran: its news is stale
        if trial:
            if failed:
                self._open()
            else:
                self._trials_passed += 1
                if self._trials_passed >= self.policy.half_open_calls:
                    self._close()
            return
        self._calls.append(failed)
        failures = sum(self._calls)
        if (
            failed
            and len(self._calls) >= self.policy.min_calls
            and failures >= self.policy.failure_rate * len(self._calls)
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._trials_started = self._trials_passed = 0

    def _close(self) -> None:
        self._opened_at = None
        self._trials_started = self._trials_passed = 0
        self._calls.clear()
