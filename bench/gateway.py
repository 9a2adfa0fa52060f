"""What the gateway adds to a request: the same read, sent straight to the service's process
and through the gateway (nginx), in turns, in the same run.

Prints one JSON object:
  {"requests": n, "direct_ms": {"p50", "p99"}, "gateway_ms": {"p50", "p99"},
   "overhead_ms": {"p50", "p99"}, "floor_ms": {"p50", "p99"}}
Each request is `GET /api/products/{id}` (one document read from PostgreSQL by the store
service), one at a time on a kept-alive connection (stdlib http.client: the least client
work). `overhead_ms` is gateway minus direct, percentile by percentile. `floor_ms` is a
request the gateway answers by itself (an unknown path: no service behind it), the cost
of going through nginx at all with this client on this machine.

    python bench/gateway.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cluster_up import cluster_up

KEY = "bench-key"


def timed(connection: http.client.HTTPConnection, path: str, expect: int) -> float:
    started = time.perf_counter()
    connection.request("GET", path, headers={"X-API-Key": KEY})
    answer = connection.getresponse()
    answer.read()
    elapsed = time.perf_counter() - started
    if answer.status != expect:
        raise RuntimeError(f"GET {path}: {answer.status}")
    return elapsed


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": at(0.50), "p99": at(0.99)}


def measure(gateway: str, direct: str, path: str, requests: int) -> dict[str, Any]:
    def connect(url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)

    via, straight, floor = connect(gateway), connect(direct), connect(gateway)
    samples: dict[str, list[float]] = {"direct": [], "gateway": [], "floor": []}
    for _ in range(200):  # warm up: connections, caches, nginx's upstream keepalive
        timed(straight, path, 200), timed(via, path, 200), timed(floor, "/nothing", 404)
    for _ in range(requests):  # in turns, so the machine's state is the same for each
        samples["direct"].append(timed(straight, path, 200))
        samples["gateway"].append(timed(via, path, 200))
        samples["floor"].append(timed(floor, "/nothing", 404))
    direct_ms, gateway_ms = percentiles(samples["direct"]), percentiles(samples["gateway"])
    return {
        "requests": requests, "path": "GET /api/products/{id}",
        "direct_ms": direct_ms, "gateway_ms": gateway_ms,
        "overhead_ms": {q: round(gateway_ms[q] - direct_ms[q], 3) for q in ("p50", "p99")},
        "floor_ms": percentiles(samples["floor"]),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        async with cluster_up(Path(tmp), KEY) as deployment:
            async with httpx.AsyncClient(base_url=deployment.url, headers={"X-API-Key": KEY},
                                         timeout=30) as client:
                product = (await client.post("/api/products", json={
                    "sku": "BENCH-1", "name": "Banc", "unit_price": 100, "currency": "CAD",
                })).raise_for_status().json()
                path = f"/api/products/{product['product_id']}"
                while (await client.get(path)).status_code == 404:  # the read model's lag
                    await asyncio.sleep(0.05)
            direct = f"http://127.0.0.1:{deployment.ports['store'][0]}"
            result = await asyncio.to_thread(measure, deployment.url, direct, path,
                                             args.requests)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
