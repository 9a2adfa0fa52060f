"""A sale's cost in the distributed deployment (all six services, each its own process, on
PostgreSQL and RabbitMQ), counted over 100 sales of the demo's mix.

Prints the table (run with `-s`); fails when a count is over its budget in budgets.py.
What is counted, and from where:
- events appended: rows added to each service's own log (`magasin_<service>.events`); the
  event store service's copies are its archive, not new events, so they are left out;
- audit records: entries of the audit chain (documents `audit.entries` of the audit
  service, or `AuditEntryRecorded` events where the chain was in a log), and those in the
  business log: `AuditEntryRecorded` events published on the bus or appended to any log but
  the audit service's own;
- messages published: events and commands the outbox relays published to the events
  exchange (`magasin_events_published_total`); a context's internal events are not (see
  `shared.events.CONSUMED`), they reach the audit and the archive in the shipped batches;
- broker deliveries: messages the broker delivered to the consumers of every process
  (`magasin_broker_deliveries_total`): one per event to a service's consumers, one per
  shipped batch to the consumers of the whole log (the audit, the archive), and the dead
  letters' own; the events these handled are `magasin_events_consumed_total`, printed;
- units of work: `magasin_store_commits_total` of every process;
- PostgreSQL statements: what every process sent, counted by tests/budget/counting (loaded
  into the services through their PYTHONPATH; this server has no pg_stat_statements). The
  statements PL/pgSQL functions run inside the server (magasin_commit's) are not included.
The test itself reads the database directly (its own connection, not counted) to tell
when a sale is over, so no polling through the services adds to their counts.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from magasin.bootstrap import SERVICES, WITHOUT_OUTBOX
from magasin.demo import _sale
from magasin.eventstore.postgres import _OUTBOX_BACKLOG, _OUTBOX_UNSHIPPED
from tests.budget.budgets import DISTRIBUTED, SALES
from tests.e2e.conftest import eventually
from tests.e2e.processes import Cluster, running_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

API_KEY = "budget-key"
AUDIT = "AuditEntryRecorded"
ARCHIVE = "eventstore"
"""The service whose log is a copy of everybody else's."""
TERMINAL = ["TransactionCompleted", "TransactionCancelled"]
COUNTING = Path(__file__).parent / "counting"
SETTLED_FOR = 1.5
"""Seconds without any change before the deployment counts as idle: longer than the audit
sequencer's poll (1 s), the slowest timer between a sale's last event and its last effect."""


@pytest.fixture(scope="module")
def cluster(pg_database: str, amqp_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0", MAGASIN_BANK_DECLINE_RATE="0",
        MAGASIN_RETRY_INITIAL_DELAY="0.05",
        MAGASIN_BUDGET_COUNTING="1",
        # MAGASIN_BUDGET_CALLERS=1 in the test's environment labels each statement with the
        # function that sent it (slower; for finding where statements come from).
        MAGASIN_BUDGET_CALLERS=os.environ.get("MAGASIN_BUDGET_CALLERS", "0"),
        # One sale at a time needs few connections; six processes at the default pool
        # would take two thirds of the shared test server's.
        MAGASIN_PG_POOL_MAX="4",
        PYTHONPATH=os.pathsep.join(filter(None, [str(COUNTING), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    with running_cluster(
        pg_database, amqp_url, tmp_path_factory.mktemp("budget"), kind="budget",
        services=SERVICES, env=env, retry_attempts=3,
        gateway={"gateway_rate_per_s": 100_000, "gateway_burst": 100_000},
    ) as running:
        yield running


class Counts:
    """Everything the deployment did so far, read from its database and its processes."""

    def __init__(self, cluster: Cluster, client: httpx.AsyncClient) -> None:
        self.cluster = cluster
        self.client = client
        self.idle_statements_per_s = 0.0
        """Statements the services' timers sent while no sale was in flight (last settle)."""

    async def snapshot(self) -> dict[str, Counter[str]]:
        conn = await asyncpg.connect(self.cluster.env["MAGASIN_DATABASE_URL"])
        try:
            events: Counter[str] = Counter()
            pending: Counter[str] = Counter()
            for service in SERVICES:
                schema = f'"magasin_{service}"'
                for row in await conn.fetch(
                        f"SELECT type, count(*) AS n FROM {schema}.events GROUP BY type"):
                    events[f"{service}:{row['type']}"] = row["n"]
                if service not in WITHOUT_OUTBOX:  # its two positions in the log
                    await conn.execute(f"SET search_path TO {schema}")
                    pending[f"{service}:outbox"] = await conn.fetchval(_OUTBOX_BACKLOG, None)
                    pending[f"{service}:outbox_log"] = await conn.fetchval(_OUTBOX_UNSHIPPED, None,
                                                                         None)
            audit = await conn.fetch(
                "SELECT collection, count(*) AS n FROM magasin_audit.documents "
                "WHERE collection IN ('audit.pending', 'audit.entries') GROUP BY collection")
            chained = Counter({row["collection"]: row["n"] for row in audit})
            pending["audit:pending"] = chained["audit.pending"]
        finally:
            await conn.close()
        return {"events": events, "pending": pending,
                "chained": Counter({"entries": chained["audit.entries"]}),
                **await self.metrics()}

    async def metrics(self) -> dict[str, Counter[str]]:
        found: dict[str, Counter[str]] = {
            "deliveries": Counter(), "handled": Counter(), "published": Counter(),
            "units": Counter(), "statements": Counter()}
        for process in self.cluster.processes:
            text = (await self.client.get(f"{process.url}/metrics")).text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    value, labels = int(s.value), s.labels
                    if s.name == "magasin_broker_deliveries_total":
                        found["deliveries"][f"{labels['consumer']}:{labels['kind']}"] += value
                    elif s.name == "magasin_events_consumed_total":
                        found["handled"][f"{labels['consumer']}:{labels['outcome']}"] += value
                    elif s.name == "magasin_events_published_total":
                        if s.labels["outcome"] == "ok":
                            found["published"][s.labels["event_type"]] += value
                    elif s.name == "magasin_store_commits_total":
                        found["units"][process.service] += value
                    elif s.name == "magasin_budget_pg_statements_total":
                        found["statements"][f"{process.service}: {s.labels['kind']}"] += value
        return found

    async def settled(self, timeout: float = 60.0) -> dict[str, Counter[str]]:
        """The counts once nothing moved for SETTLED_FOR seconds and nothing waits to be
        published or chained."""
        deadline = time.monotonic() + timeout
        last = await self.snapshot()
        since = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = await self.snapshot()
            if _moving(now) != _moving(last):
                last, since = now, time.monotonic()
            elif (time.monotonic() - since >= SETTLED_FOR
                  and not any(now["pending"].values())):
                quiet = sum((now["statements"] - last["statements"]).values())
                self.idle_statements_per_s = quiet / (time.monotonic() - since)
                return now
            if time.monotonic() > deadline:
                raise TimeoutError(f"the deployment did not settle: {now['pending']}")


def _moving(counts: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    """What stops changing once no sale is in flight (the services' timers keep polling the
    database, so their statement counts never stop)."""
    return {k: v for k, v in counts.items() if k not in ("statements", "units")}


async def setup_shop(url: str, client: httpx.AsyncClient) -> tuple[list[str], list[dict[str, Any]]]:
    async def ok(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await client.post(url + path, json=body)
        assert response.status_code in (200, 201), (path, response.text)
        doc: dict[str, Any] = response.json()
        return doc

    stores = [(await ok("/api/stores", {"name": n, "district": "Ville-Marie",
                                        "address": "1 rue X"}))["store_id"]
              for n in ("Centre", "Gare")]
    catalog = []
    for sku, price in (("CAF-1", 1899), ("LAI-2", 649), ("PAIN-3", 129), ("TV-9", 1_099_999)):
        body = {"sku": sku, "name": sku, "unit_price": price, "currency": "CAD"}
        catalog.append({"product_id": (await ok("/api/products", body))["product_id"],
                        "unit_price": price})
    for store in stores:
        for product in catalog:
            path = f"{url}/api/stock/{store}/{product['product_id']}/restock"

            async def restocked(path: str = path) -> bool:  # 404 until inventory knows both
                r = await client.post(path, json={"quantity": 400})
                assert r.status_code in (200, 404), r.text
                return r.status_code == 200

            await eventually(restocked)
    return stores, catalog


async def sell(url: str, client: httpx.AsyncClient, database: asyncpg.Connection,
               body: dict[str, Any]) -> None:
    """One sale, through the gateway, until its saga has ended (read from the database)."""

    async def created() -> httpx.Response | None:  # the catalog replica may lag a bit
        r = await client.post(f"{url}/api/transactions", json=body)
        return None if r.status_code == 422 and "unknown" in r.text else r

    response: httpx.Response = await eventually(created)
    assert response.status_code == 201, response.text
    stream = f"transaction-{response.json()['transaction_id']}"

    async def ended() -> bool:
        return bool(await database.fetchval(
            "SELECT count(*) FROM magasin_transaction.events "
            "WHERE stream_id = $1 AND type = ANY($2::text[])", stream, TERMINAL))

    await eventually(ended, timeout=30)


def per_sale(counter: Counter[str]) -> dict[str, float]:
    return {k: round(n / SALES, 2) for k, n in counter.most_common() if n}


def table(rows: dict[str, float]) -> str:
    lines = [f"{'per completed sale (distributed, 6 services)':46} {'count':>8} {'budget':>8}"]
    lines += [f"{k:46} {v:8.2f} {DISTRIBUTED.get(k, float('nan')):8.2f}"
              for k, v in rows.items()]
    return "\n".join(lines)


async def test_a_sale_of_the_demo_mix_stays_within_its_distributed_budget(
    cluster: Cluster,
) -> None:
    url = cluster.gateway.url
    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
        stores, catalog = await setup_shop(url, client)
        ordinary = [p for p in catalog if p["unit_price"] < 100_000]
        counts = Counts(cluster, client)
        before = await counts.settled()
        database = await asyncpg.connect(cluster.env["MAGASIN_DATABASE_URL"])
        try:
            rng = random.Random(11)
            started = time.monotonic()
            for i in range(SALES):
                await sell(url, client, database, _sale(rng, i, stores, catalog, ordinary))
            selling = time.monotonic() - started
        finally:
            await database.close()
        after = await counts.settled()

    delta = {k: after[k] - before[k] for k in after}
    events = delta["events"]
    logged = Counter({k: n for k, n in events.items() if not k.startswith(f"{ARCHIVE}:")})
    audit_elsewhere = sum(n for k, n in logged.items()
                          if k.endswith(f":{AUDIT}") and not k.startswith("audit:"))
    rows = {
        "business events appended": sum(
            n for k, n in logged.items() if not k.endswith(f":{AUDIT}")) / SALES,
        "audit records": (delta["chained"]["entries"]
                          + sum(n for k, n in logged.items() if k.endswith(f":{AUDIT}"))) / SALES,
        "audit records in the business log":
            (delta["published"][AUDIT] + audit_elsewhere) / SALES,
        "messages published": sum(delta["published"].values()) / SALES,
        "broker deliveries": sum(delta["deliveries"].values()) / SALES,
        "units of work": sum(delta["units"].values()) / SALES,
        "PostgreSQL statements": sum(delta["statements"].values()) / SALES,
    }
    print("\n" + table(rows))
    print("events appended by service and kind, per sale:", per_sale(events))
    print("events published, per sale:", per_sale(delta["published"]))
    print("broker deliveries by consumer and kind, per sale:", per_sale(delta["deliveries"]))
    print("events consumed by consumer and outcome, per sale:", per_sale(delta["handled"]))
    print("units of work by service, per sale:", per_sale(delta["units"]))
    print(f"statements the services' timers send while idle: "
          f"{counts.idle_statements_per_s:.0f}/s; the {SALES} sales took {selling:.1f} s "
          f"(≈ {counts.idle_statements_per_s * selling / SALES:.1f} statements per sale)")
    print("top PostgreSQL statements, per sale:",
          dict(list(per_sale(delta["statements"]).items())[:40]))
    by_service: Counter[str] = Counter()
    for label, n in delta["statements"].items():
        by_service[label.split(":", 1)[0]] += n
    print("PostgreSQL statements by service, per sale:", per_sale(by_service))
    over = {k: v for k, v in rows.items() if k in DISTRIBUTED and v > DISTRIBUTED[k]}
    assert not over, f"over budget: {over}"
