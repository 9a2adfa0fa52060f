"""`magasin up` on a fresh data directory: the moment /health answers 200, the demo data
it seeds can be read (a script or a browser that waited for /health lists the stores)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.e2e.processes import ServiceProcess, free_port

KEY = "ready-test-key"


def test_the_demo_stores_are_listed_as_soon_as_health_says_ok(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGASIN_", "OTEL_"))}
    env.update({"MAGASIN_DATA_DIR": str(tmp_path / "var"), "MAGASIN_API_KEYS": KEY})
    process = ServiceProcess("magasin", free_port(), env, tmp_path / "magasin.log", Path.cwd())
    process.command = ["up"]
    process.start()
    statuses: list[str] = []
    try:
        with httpx.Client(base_url=process.url, timeout=5, trust_env=False) as client:
            deadline = time.monotonic() + 60
            while True:  # as often as a client could ask: the first 200 counts
                try:
                    health = client.get("/health")
                except httpx.TransportError:
                    health = None
                if health is not None:
                    statuses.append(health.json()["status"])
                    if health.status_code == 200:
                        break
                assert time.monotonic() < deadline, process.tail()
                time.sleep(0.005)
            stores = client.get("/api/stores", headers={"X-API-Key": KEY}).json()["items"]
            products = client.get("/api/products", headers={"X-API-Key": KEY},
                                  params={"limit": 500}).json()["items"]
    finally:
        process.terminate()
    assert stores, f"no store listed right after /health said ok ({statuses})"
    assert any(p["sku"] == "CAF-001" for p in products)
    # Before it is ready the process says so, and it is never "ok" before.
    assert set(statuses[:-1]) <= {"starting"} and statuses[-1] == "ok"
