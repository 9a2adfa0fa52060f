"""A real Prometheus (Debian's package) scrapes a running embedded magasin: after a few
sales, its HTTP API answers with the saga metrics."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from magasin.api.app import create_app
from magasin.bootstrap import Runtime
from magasin.observability import metrics
from tests.deploy.conftest import tool
from tests.e2e import conftest as e2e
from tests.e2e.conftest import API_KEY, Shop, eventually
from tests.e2e.processes import free_port

TIMEOUT = 30.0


@pytest.fixture
async def magasin_url(tmp_path: Path) -> AsyncIterator[tuple[str, Runtime]]:
    """The embedded app served by uvicorn on a free port, as `magasin up` serves it."""
    runtime = Runtime.embedded(e2e.test_settings(tmp_path / "magasin", metrics_sample_s=0.5))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(runtime, frozenset({API_KEY})), host="127.0.0.1", port=port,
        log_level="warning", lifespan="on",
    ))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                assert not serving.done(), "uvicorn stopped before it started"
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}", runtime
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, TIMEOUT)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Any:
    """Starts Prometheus scraping one target every second; yields its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "magasin", "static_configs": [{"targets": [target]}]}],
        }))
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def query(client: httpx.AsyncClient, promql: str) -> float | None:
    """The single value of an instant query, None while Prometheus has no sample for it."""
    try:
        response = await client.get("/api/v1/query", params={"query": promql})
    except httpx.TransportError:  # still starting
        return None
    if response.status_code != 200:
        return None
    result = response.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def local(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_prometheus_receives_saga_metrics_from_the_running_app(
    magasin_url: tuple[str, Runtime], prometheus_for: Any
) -> None:
    url, runtime = magasin_url
    prometheus = prometheus_for(url.removeprefix("http://"))
    completed_before = local("magasin_sagas_finished_total", saga="transaction",
                             mode="choreography", outcome="completed")
    compensated_before = local("magasin_sagas_finished_total", saga="transaction",
                               mode="choreography", outcome="compensated")

    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}) as client:
        shop = Shop(client, runtime)
        store = await shop.open_store()
        product = await shop.add_product("PROM-1", 500)
        await shop.restock(store, product, 10)
        sales = [await shop.sell(store, [(product, 1)]) for _ in range(3)]
        sales.append(await shop.sell(store, [(product, 1)], payment_method="FAIL_CARD"))
        for sale in sales:
            await shop.final(sale["transaction_id"])

    async with httpx.AsyncClient(base_url=prometheus, timeout=5) as api:
        async def arrived(promql: str, at_least: float) -> bool:
            value = await query(api, promql)
            return value is not None and value >= at_least

        await eventually(lambda: arrived('up{job="magasin"}', 1), TIMEOUT)
        await eventually(lambda: arrived(
            'sum(magasin_sagas_finished_total{outcome="completed"})', completed_before + 3
        ), TIMEOUT)
        await eventually(lambda: arrived(
            'sum(magasin_sagas_finished_total{outcome="compensated"})', compensated_before + 1
        ), TIMEOUT)
        await eventually(lambda: arrived("sum(magasin_sagas_started_total)", 4), TIMEOUT)
        await eventually(lambda: arrived(
            'sum(magasin_saga_duration_seconds_count{outcome="completed"})', 3), TIMEOUT)
        # The sampled gauge: every step present, and no saga left in flight.
        await eventually(lambda: arrived("count(magasin_sagas_active)", 5), TIMEOUT)
        assert await query(api, "sum(magasin_sagas_active)") == 0
