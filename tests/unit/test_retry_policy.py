"""Retry policies built to last a given time, and the retry queues they need."""

from __future__ import annotations

from magasin.messaging.bus import RetryPolicy


def schedule(policy: RetryPolicy) -> list[float]:
    """The waits between attempts, jitter aside."""
    no_jitter = RetryPolicy(policy.attempts, policy.initial_delay, policy.multiplier,
                            policy.max_delay, jitter=0.0)
    return [no_jitter.delay(n) for n in range(1, policy.attempts)]


def test_a_policy_covering_a_time_retries_at_least_that_long_with_capped_delays() -> None:
    policy = RetryPolicy.covering(90, initial_delay=1, multiplier=2, max_delay=10)
    waits = schedule(policy)
    assert waits[:5] == [1, 2, 4, 8, 10]
    assert sum(waits) >= 90 > sum(waits[:-1])
    assert max(waits) == 10


def test_retries_past_the_cap_need_no_queue_of_their_own() -> None:
    assert RetryPolicy(attempts=3, initial_delay=1, multiplier=2, max_delay=300).levels == 2
    assert RetryPolicy(attempts=20, initial_delay=1, multiplier=2, max_delay=10).levels == 5
    assert RetryPolicy(attempts=20, initial_delay=0.5, multiplier=1).levels == 1
    assert RetryPolicy(attempts=1).levels == 0
