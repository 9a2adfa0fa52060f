"""A circuit breaker in front of the bank: after repeated outages, fail fast for a while.

    CLOSED --(failure_threshold consecutive Unavailable)--> OPEN
    OPEN --(reset_after_s elapsed)--> HALF_OPEN: one trial call, the others fail fast
    HALF_OPEN --trial succeeds--> CLOSED      HALF_OPEN --trial fails--> OPEN

Only Unavailable counts as a failure: a declined charge or a refused refund is an answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from magasin.payments.gateway import BankGateway, Charge
from magasin.shared.errors import MagasinError, Unavailable

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker(BankGateway):
    """Wraps a gateway; while open, calls raise Unavailable without reaching the bank."""

    def __init__(
        self,
        gateway: BankGateway,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or reset_after_s < 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s >= 0")
        self.gateway = gateway
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_after_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        return await self._call(
            lambda: self.gateway.charge(idempotency_key, amount, currency, method)
        )

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        return await self._call(lambda: self.gateway.refund(idempotency_key, reference, amount))

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        state = self.state
        if state is BreakerState.OPEN or (state is BreakerState.HALF_OPEN and self._trial_running):
            raise Unavailable("the bank circuit breaker is open: not calling the bank")
        trial = state is BreakerState.HALF_OPEN
        self._trial_running = self._trial_running or trial
        try:
            result = await call()
        except Unavailable:
            self._failures += 1
            if trial or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            raise
        except MagasinError:
            self._close()  # a refusal is an answer: the bank is reachable
            raise
        finally:
            if trial:
                self._trial_running = False
        self._close()
        return result

    def _close(self) -> None:
        self._failures = 0
        self._opened_at = None
