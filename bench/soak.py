"""Soak: sales for minutes while services are killed (-9) and restarted, RabbitMQ and
PostgreSQL restarted (distributed) or the embedded process killed; then the invariants.

    python bench/soak.py [--mode distributed|embedded] [--duration 300] [--seed 1]

Prints one JSON object: {"mode", "duration_s", "sagas", "kills", "restarts",
"invariant_violations", "violations" (the first few), "outcomes"}; target: 0 violations.
The distributed mode restarts the machine's RabbitMQ and PostgreSQL servers (seconds each;
`--no-server-restarts` to spare them) on its own database and RabbitMQ namespace, both
removed afterwards. Reuses the chaos helpers of the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.chaos import (  # noqa: E402
    Evidence,
    Shop,
    post_sales,
    postgres_effects,
    restart_postgres,
    restart_rabbitmq,
    sqlite_effects,
    stock_up,
    violations,
)
from tests.e2e.processes import (  # noqa: E402
    SERVICES,
    Cluster,
    ServiceProcess,
    create_database,
    delete_topology,
    drop_database,
    free_port,
)

API_KEY = "soak-key"
RETRY_ATTEMPTS = 6
PG_ADMIN = os.environ.get("MAGASIN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP = os.environ.get("MAGASIN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS), MAGASIN_RETRY_INITIAL_DELAY="0.5",
        PYTHONUNBUFFERED="1", **settings,
    )
    return env


async def crash(process: ServiceProcess) -> None:
    process.kill()
    await asyncio.sleep(random.uniform(0.1, 1.0))
    process.start()
    await process.healthy(timeout=60)


class Soak:
    def __init__(self, duration: float, rng: random.Random, per_round: int) -> None:
        self.duration = duration
        self.rng = rng
        self.per_round = per_round
        self.kills = 0
        self.restarts = 0

    async def run(self, shop: Shop, chaos: list[tuple[str, Any]]) -> Any:
        shelf = await stock_up(shop, "Soak", [(sku, 1_000_000) for sku in "ABCD"])
        end = time.monotonic() + self.duration
        while time.monotonic() < end:
            load = asyncio.create_task(post_sales(shop, shelf, self.per_round, self.rng))
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
            kind, action = self.rng.choice(chaos)
            await action()
            if kind == "kill":
                self.kills += 1
            else:
                self.restarts += 1
            await load
        return shelf


def report(mode: str, started: float, shelf: Any, soak: Soak, found: list[str],
           outcomes: Counter[str], seen: Evidence) -> dict[str, Any]:
    return {
        "mode": mode, "duration_s": round(time.monotonic() - started, 1),
        "sagas": len(shelf.sales), "kills": soak.kills, "restarts": soak.restarts,
        "invariant_violations": len(found), "violations": found[:10],
        "outcomes": dict(outcomes), "dead_letters": seen.dead_letters,
        "projection_lag_at_check": seen.projection_lag,
    }


async def distributed(soak: Soak, server_restarts: bool, workdir: Path) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    database, namespace = f"magasin_soak_{suffix}", f"magasin-soak-{suffix}"
    url = await create_database(PG_ADMIN, database)
    cluster = Cluster(environment(MAGASIN_DATABASE_URL=url, MAGASIN_AMQP_URL=AMQP,
                                  MAGASIN_AMQP_NAMESPACE=namespace), workdir)
    started = time.monotonic()
    try:
        for service in SERVICES:
            cluster.spawn(service)
        await asyncio.gather(*(p.healthy() for p in cluster.processes))
        chaos: list[tuple[str, Any]] = [
            ("kill", lambda s=s: crash(cluster.first(s))) for s in SERVICES
        ]
        if server_restarts:
            chaos += [("restart", lambda: asyncio.to_thread(restart_rabbitmq)),
                      ("restart", lambda: asyncio.to_thread(restart_postgres))]
        async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
            shop = Shop(client, cluster.url)
            shelf = await soak.run(shop, chaos)
            found, outcomes, seen = await violations(
                shop, [shelf], lambda: postgres_effects(url), timeout=300.0, settle_s=120.0,
            )
        return report("distributed", started, shelf, soak, found, outcomes, seen)
    finally:
        cluster.stop()
        try:
            await delete_topology(AMQP, namespace, RETRY_ATTEMPTS)
        finally:
            await drop_database(PG_ADMIN, database)


async def embedded(soak: Soak, workdir: Path) -> dict[str, Any]:
    data = workdir / "var"
    process = ServiceProcess("embedded", free_port(), environment(MAGASIN_DATA_DIR=str(data)),
                             workdir / "magasin.log", workdir)
    process.command = ["up", "--no-demo-data"]
    process.start()
    started = time.monotonic()
    try:
        await process.healthy()
        async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
            shop = Shop(client, lambda _: process.url)
            shelf = await soak.run(shop, [("kill", lambda: crash(process))])
            found, outcomes, seen = await violations(
                shop, [shelf], lambda: sqlite_effects(data / "magasin.db"),
                timeout=300.0, settle_s=120.0,
            )
        return report("embedded", started, shelf, soak, found, outcomes, seen)
    finally:
        process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("distributed", "embedded"), default="distributed")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of chaos")
    parser.add_argument("--sales-per-round", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-server-restarts", action="store_true")
    args = parser.parse_args()
    random.seed(args.seed)
    soak = Soak(args.duration, random.Random(args.seed), args.sales_per_round)
    with tempfile.TemporaryDirectory(prefix="magasin-soak-") as tmp:
        if args.mode == "distributed":
            result = asyncio.run(distributed(soak, not args.no_server_restarts, Path(tmp)))
        else:
            result = asyncio.run(embedded(soak, Path(tmp)))
    print(json.dumps(result))
    sys.exit(1 if result["invariant_violations"] else 0)


if __name__ == "__main__":
    main()
