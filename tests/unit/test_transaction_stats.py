"""Rolling saga statistics: sagas that ended in a window, per bucket, percentiles of their
durations, and the records older than the retention pruned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from magasin.observability.sagas import ENDS, end_key
from magasin.transactions import stats
from tests.unit.conftest import Harness

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


async def ended(harness: Harness, seconds_ago: float, status: str, duration_s: float,
                store_id: str = "s1", reason: str | None = None) -> None:
    at = NOW - timedelta(seconds=seconds_ago)
    tid = f"t-{seconds_ago}-{status}"
    async with harness.store.transaction() as uow:
        uow.put_document(ENDS, end_key(at, tid), {
            "transaction_id": tid, "store_id": store_id, "status": status, "reason": reason,
            "ended_at": at.isoformat(), "duration_s": duration_s,
        })


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert stats.percentile(values, 0.5) == 10
    assert stats.percentile(values, 0.95) == 19
    assert stats.percentile([3.0], 0.95) == 3
    assert stats.percentile([], 0.5) is None


async def test_the_window_counts_sagas_by_outcome_bucket_and_duration(harness: Harness) -> None:
    await ended(harness, 5, "COMPLETED", 0.2)
    await ended(harness, 15, "COMPLETED", 0.4)
    await ended(harness, 16, "CANCELLED", 1.0, reason="declined")
    await ended(harness, 55, "CANCELLED", 2.0, reason="inventory_unavailable", store_id="s2")
    await ended(harness, 61, "COMPLETED", 9.0)  # before the window
    await ended(harness, -1, "COMPLETED", 9.0)  # after now

    found = await stats.rolling(harness.store, 60, 20, now=NOW)

    assert (found["finished"], found["completed"], found["cancelled"]) == (4, 2, 2)
    assert found["cancelled_by_reason"] == {"declined": 1, "inventory_unavailable": 1}
    assert found["per_s"] == round(4 / 60, 3)
    assert (found["p50_ms"], found["p95_ms"]) == (400.0, 2000.0)
    buckets = found["buckets"]
    assert [b["start"] for b in buckets] == [
        (NOW - timedelta(seconds=s)).isoformat() for s in (60, 40, 20)]
    assert [(b["completed"], b["cancelled"]) for b in buckets] == [(0, 1), (0, 0), (2, 1)]
    assert buckets[2]["p95_ms"] == 1000.0 and buckets[1]["p50_ms"] is None

    one_store = await stats.rolling(harness.store, 60, 20, store_id="s2", now=NOW)
    assert (one_store["finished"], one_store["in_flight"]) == (1, None)


async def test_records_older_than_the_retention_are_pruned(harness: Harness) -> None:
    for seconds_ago in (10, 3000, 4000, 5000):
        await ended(harness, seconds_ago, "COMPLETED", 0.1)

    removed = await stats.prune(harness.store, NOW - timedelta(seconds=stats.RETENTION_S))

    assert removed == 2
    left = await harness.store.find_documents(ENDS)
    assert [doc["ended_at"] for _, doc in left] == [
        (NOW - timedelta(seconds=s)).isoformat() for s in (3000, 10)]
