"""`magasin cluster up`, the one command of distributed mode, run as a user runs it: every
service and the gateway start, the demo data is seeded, a sale completes through the one
URL, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from magasin.api.app import create_app
from magasin.bootstrap import Runtime
from magasin.config import Settings
from tests.conftest import RUN_ID, run_sync
from tests.deploy.test_gateway_config import nginx_binary
from tests.e2e.processes import delete_topology, drop_database, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

API_KEY = "cluster-key"
BANNER = "Ctrl-C stops every process."
START_TIMEOUT = 120.0


@dataclass
class Running:
    popen: subprocess.Popen[bytes]
    url: str
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children of children too)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent's wait() counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster_up(pg_database: str, amqp_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    nginx_binary()
    workdir = tmp_path_factory.mktemp("cluster-up")
    suffix = uuid.uuid4().hex[:8]
    database = f"magasin_cluster_{RUN_ID}_{suffix}"  # cluster up creates it
    namespace = f"magasin-cluster-{RUN_ID}-{suffix}"
    server = pg_database.rsplit("/", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_DATABASE_URL=f"{server}/{database}", MAGASIN_AMQP_URL=amqp_url,
        MAGASIN_AMQP_NAMESPACE=namespace, MAGASIN_API_KEYS=API_KEY,
        MAGASIN_DATA_DIR=str(workdir / "var"), MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_RETRY_INITIAL_DELAY="0.05",
    )
    port = free_port()
    output = workdir / "cluster.log"
    with output.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "magasin", "cluster", "up", "--port", str(port),
             "--service-ports", "0", "--scale", "transaction=1,inventory=1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    running = Running(popen, f"http://127.0.0.1:{port}", output)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while BANNER not in running.text():
            assert popen.poll() is None, f"cluster up exited:\n{running.text()[-5000:]}"
            assert time.monotonic() < deadline, f"not up in time:\n{running.text()[-5000:]}"
            time.sleep(0.2)
        yield running
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
        try:
            run_sync(delete_topology(amqp_url, namespace, 3))
        finally:
            run_sync(drop_database(pg_database, database))


def test_cluster_up_prints_the_one_url_and_the_api_key(cluster_up: Running) -> None:
    text = cluster_up.text()
    assert f"magasin distributed: {cluster_up.url}" in text
    assert f"API key: {API_KEY}" in text
    assert "seeded demo stores, catalog and stock" in text


def test_a_sale_completes_through_the_gateway_on_the_seeded_catalog(
    cluster_up: Running,
) -> None:
    with httpx.Client(base_url=cluster_up.url, headers={"X-API-Key": API_KEY},
                      timeout=30) as client:
        stores = client.get("/api/stores").json()["items"]
        products = [p for p in client.get("/api/products").json()["items"]
                    if p["sku"] == "CAF-001"]
        assert len(stores) == 3 and len(products) == 1
        created = client.post("/api/transactions", json={
            "store_id": stores[0]["store_id"], "customer_id": "alice", "payment_method": "VISA",
            "items": [{"product_id": products[0]["product_id"], "quantity": 2}]})
        assert created.status_code == 201, created.text
        sale = created.json()
        deadline = time.monotonic() + 60
        while True:
            doc = client.get(f"/api/transactions/{sale['transaction_id']}",
                             params={"min_version": sale["version"]}).json()
            if doc["status"] in ("COMPLETED", "CANCELLED") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert doc["status"] == "COMPLETED", doc


def test_what_every_service_answers_comes_back_merged(
    cluster_up: Running, tmp_path: Path
) -> None:
    with httpx.Client(base_url=cluster_up.url, headers={"X-API-Key": API_KEY},
                      timeout=30) as client:
        health = client.get("/health")
        projections = client.get("/api/projections").json()
        letters = client.get("/api/dead-letters")
        merged = client.get("/openapi.json").json()

    assert health.status_code == 200, health.text
    assert len(health.json()["services"]) == 6
    assert {"transaction.transactions", "store.stores", "inventory.stock",
            "payment.payments"} <= {p["name"] for p in projections}
    assert letters.status_code == 200 and letters.json() == {"items": []}
    embedded: dict[str, Any] = create_app(
        Runtime.embedded(Settings(api_keys="k", data_dir=tmp_path)), frozenset({"k"})
    ).openapi()
    missing = {p for p in embedded["paths"] if p not in merged["paths"]} - {"/metrics"}
    assert not missing


def test_each_service_reports_its_garbage_collector_s_pauses(cluster_up: Running) -> None:
    for service in ("transaction", "payment", "inventory", "store", "audit", "eventstore"):
        text = httpx.get(f"{cluster_up.url}/metrics/{service}", timeout=30).text
        young = [line for line in text.splitlines()
                 if line.startswith('magasin_gc_pause_seconds_count{generation="0"}')]
        assert young and float(young[0].rsplit(" ", 1)[1]) > 0, service


def test_ctrl_c_stops_every_process_it_started(cluster_up: Running) -> None:
    started = descendants(cluster_up.popen.pid)
    assert len(started) >= 7  # six services and nginx, at least

    cluster_up.popen.send_signal(signal.SIGINT)
    code = cluster_up.popen.wait(timeout=30)

    assert code == 0, cluster_up.text()[-3000:]
    left = [pid for pid in started if alive(pid)]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
