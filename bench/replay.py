"""Replay speed: projection rebuild throughput, and point-in-time reads of one aggregate.

Prints one JSON object:
    {"rebuild_events_per_s": {"sqlite": n, "postgres": n},
     "as_of_ms": {"with_snapshots": n, "without_snapshots": n}}

`as_of_ms`: median latency of rebuilding one aggregate (a stock item with 10,000 events,
written through the Repository, so snapshots are taken as in production, every 100 events)
as of random moments of its life, on SQLite, starting from the latest snapshot before that
moment or from the first event. `rebuild_events_per_s` comes from
`magasin.projections.rebuild_throughput` (null when that is not available).

    python bench/replay.py [--samples 200] [--skip-rebuild]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from magasin.eventstore.repository import Repository, configure_snapshots
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.inventory.domain import StockItem

EVENTS = 10_000
SNAPSHOT_EVERY = 100
stock = Repository(StockItem)


async def _fill(store: SqliteEventStore) -> list[datetime]:
    """10,000 restocks of one item, 100 per unit of work; returns when each batch occurred."""
    moments = []
    for _ in range(EVENTS // SNAPSHOT_EVERY):
        async with store.transaction() as uow:
            item = await stock.find(uow, "s1:p1") or StockItem.create("s1", "p1")
            for _ in range(SNAPSHOT_EVERY):
                item.add(1)
            stock.save(uow, item)
        moments.append(uow.recorded[-1].occurred_at)
    return moments


async def as_of_ms(samples: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteEventStore(Path(tmp) / "replay.db", synchronous="NORMAL") as store:
            configure_snapshots(store, SNAPSHOT_EVERY)
            moments = await _fill(store)
            rng = random.Random(7)
            first, last = moments[0].timestamp(), moments[-1].timestamp()
            points = [datetime.fromtimestamp(rng.uniform(first, last), moments[0].tzinfo)
                      for _ in range(samples)]
            result: dict[str, float] = {}
            for label, use in (("with_snapshots", True), ("without_snapshots", False)):
                timings = []
                for point in points:
                    start = time.perf_counter()
                    rebuilt = await stock.rebuild(store, "s1:p1", until=point,
                                                  use_snapshots=use)
                    timings.append(time.perf_counter() - start)
                    assert rebuilt is not None
                result[label] = round(statistics.median(timings) * 1000, 3)
            return result


def rebuild_events_per_s() -> dict[str, Any]:
    try:
        from magasin.projections import rebuild_throughput
        from magasin.transactions.projection import projection
    except ImportError:
        return {"sqlite": None, "postgres": None}
    figures: dict[str, Any] = {}
    for kind in ("sqlite", "postgres"):
        try:
            figures[kind] = round(rebuild_throughput(kind, projection()))
        except Exception as exc:  # a server that is not there: say so, measure the rest
            print(f"rebuild on {kind} failed: {exc!r}", file=sys.stderr)
            figures[kind] = None
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--skip-rebuild", action="store_true")
    args = parser.parse_args()
    rebuild = ({"sqlite": None, "postgres": None} if args.skip_rebuild
               else rebuild_events_per_s())
    print(json.dumps({"rebuild_events_per_s": rebuild,
                      "as_of_ms": asyncio.run(as_of_ms(args.samples))}))


if __name__ == "__main__":
    main()
