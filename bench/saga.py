"""Saga throughput and latency, embedded and distributed, against the raw broker round trip.

Prints one JSON object:
  {"embedded": {"sagas_per_s", "p50_ms", "p95_ms", "p99_ms"},
   "distributed": {same keys},
   "raw_broker_roundtrip_per_s": n, "raw_http_sagas_per_s": n}
`sagas_per_s` is the most completed sagas per second over HTTP (POST /api/transactions,
then the SSE stream of the sale until its terminal state) with many sales in flight;
the latencies are POST-to-terminal, measured in a second run at half that rate, once the
deployment has settled (every consumer done with the first run's sales: otherwise the
second run measured how fast the first one's backlog drained). Each mode
runs as real processes on this machine: `magasin up`; `magasin cluster up` (every service,
one process each, behind the gateway, which the client calls).
`raw_http_sagas_per_s` is the same client's rate against an app that answers the same two
calls and does nothing else (bench/http_floor.py): the ceiling HTTP alone puts on a saga.

`--saga orchestration` measures both coordinations in the same run, one after the other on
fresh data, latencies at the same rate for both (`--latency-rate`, default 20 sagas/s):
the embedded deployment ({"coordination": {"choreography": {...}, "orchestration": {...}}})
or, with `--mode distributed`, the distributed one ({"coordination_distributed": ...}).
Besides sagas/s and latencies, every run reports what each saga costs the deployment
over the throughput run and until it settles (every consumer done): `messages_per_saga`
(events and commands published, the audit chain's own records left out),
`deliveries_per_saga` (handler runs, audit's included), `broker_deliveries_per_saga`
(messages RabbitMQ delivered: one per event, one per batch shipped to the audit and the
archive; 0 embedded), `commits_per_saga` (units of work), summed over the /metrics of
every process, `gc_ms_per_saga` and `gc_pauses_over_10ms` (the cyclic garbage collector's
pauses, every process's `magasin_gc_pause_seconds`), `loop_lag_over_10ms_share` (the share of the
event loops' lag samples, `magasin_event_loop_lag_seconds`, over 10 ms: how often a ready
task waited that long for its loop; also at the latency rate), and `cpu_ms_per_saga` (user + system
CPU, from /proc: embedded, the server process; distributed, `magasin cluster up` and
every process under it, gateway included, and the PostgreSQL backends of the deployment's
database; the shared RabbitMQ broker is not counted).
`other_cpu_cores` (throughput run), `other_cpu_cores_at_latency_rate` and
`other_cpu_cores_during_http_floor` are the cores the rest of the machine used meanwhile
(bench/cpu.py OtherLoad): near 0 on a quiet machine; a run well above it (stderr warns)
shared the two cores with other work, and its figures are lower than the code's.

`--runs n` measures n times and prints the median of each figure (the ratios: the median of
those measured in each run against its own floors), every run kept under `runs`.

    python bench/saga.py [--seconds 10] [--concurrency 64] [--mode embedded|distributed]
                         [--saga choreography|orchestration] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import httpx
from cluster_up import cluster_up
from cpu import OtherLoad, Usage
from floors import add_floors_and_ratios

KEY = "bench-key"
AMQP_URL = os.environ.get("MAGASIN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def process(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "magasin", *args, env=env, stdout=out, stderr=out
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


async def healthy(url: str, timeout: float = 60) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)


async def seed(store_url: str, stock_url: str, sale_url: str,
               count: int) -> tuple[str, list[str]]:
    """One store, `count` products with plenty of stock, known to the transaction service."""
    headers = {"X-API-Key": KEY}
    async with httpx.AsyncClient(headers=headers, timeout=30) as c:
        store = (await c.post(f"{store_url}/api/stores", json={
            "name": "Bench", "district": "Ville-Marie", "address": "1 rue du Banc"})).json()
        products = []
        for i in range(count):
            sku = f"B-{uuid.uuid4().hex[:8]}-{i}"
            body = {"sku": sku, "name": sku, "unit_price": 250 + i % 50, "currency": "CAD"}
            products.append((await c.post(f"{store_url}/api/products", json=body)).json())
        async with asyncio.timeout(60):
            for p in products:
                url = f"{stock_url}/api/stock/{store['store_id']}/{p['product_id']}/restock"
                while (await c.post(url, json={"quantity": 10_000_000})).status_code != 200:
                    await asyncio.sleep(0.05)
            probe = {"store_id": store["store_id"], "customer_id": "warm-up",
                     "payment_method": "VISA",
                     "items": [{"product_id": p["product_id"], "quantity": 1}
                               for p in products[:5]]}
            while (await c.post(f"{sale_url}/api/transactions", json=probe)).status_code != 201:
                await asyncio.sleep(0.05)
    return store["store_id"], [p["product_id"] for p in products]


def session(url: str, connections: int) -> aiohttp.ClientSession:
    """aiohttp drives the load: the client shares this machine's two cores with the
    server, and it costs several times less CPU per request than httpx."""
    return aiohttp.ClientSession(
        base_url=url, headers={"X-API-Key": KEY},
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def one_saga(client: aiohttp.ClientSession, store_id: str, product: str, n: int) -> float:
    body = {"store_id": store_id, "customer_id": f"c-{n % 500}", "payment_method": "VISA",
            "items": [{"product_id": product, "quantity": 1}]}
    started = time.perf_counter()
    async with client.post("/api/transactions", json=body) as created:
        created.raise_for_status()
        tid = (await created.json())["transaction_id"]
    async with client.get(f"/api/transactions/{tid}/events") as stream:
        async for line in stream.content:
            if line.startswith(b"data:") and (b'"COMPLETED"' in line or b'"CANCELLED"' in line):
                return time.perf_counter() - started
    raise RuntimeError(f"stream of {tid} ended before a terminal state")


async def max_rate(url: str, store_id: str, products: list[str], seconds: float,
                   concurrency: int) -> float:
    async with session(url, concurrency * 2) as client:
        deadline = time.perf_counter() + seconds
        done = 0

        async def worker(w: int) -> None:
            nonlocal done
            n = w
            while time.perf_counter() < deadline:
                await one_saga(client, store_id, products[n % len(products)], n)
                done += 1
                n += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


async def latencies_at(url: str, store_id: str, products: list[str], rate: float,
                       seconds: float) -> dict[str, float]:
    """Open loop: start a saga every 1/rate s, whatever the others do; POST-to-terminal."""
    async with session(url, 2000) as client:
        tasks = []
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.create_task(
                one_saga(client, store_id, products[n % len(products)], n)))
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        values = sorted(await asyncio.gather(*tasks))

    def pct(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    return {"p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "sagas": len(values)}


COUNTED = {
    "messages": ("magasin_events_published_total", {"outcome": "ok"}),
    "deliveries": ("magasin_events_consumed_total", {"outcome": "handled"}),
    "broker_deliveries": ("magasin_broker_deliveries_total", {}),
    "commits": ("magasin_store_commits_total", {}),
    "gc_pause_s": ("magasin_gc_pause_seconds_sum", {}),
    "gc_pauses": ("magasin_gc_pause_seconds_count", {}),
    "gc_pauses_within_10ms": ("magasin_gc_pause_seconds_bucket", {"le": "0.01"}),
    "loop_lags": ("magasin_event_loop_lag_seconds_count", {}),
    "loop_lags_within_10ms": ("magasin_event_loop_lag_seconds_bucket", {"le": "0.01"}),
}
"""What a saga costs the server, from its own /metrics: (sample name, labels to match)."""


@dataclass(frozen=True)
class Meter:
    """Where a deployment's costs are read: the /metrics of each of its processes, and
    the pids whose CPU time it uses (asked again at each reading)."""

    metrics_urls: list[str]
    pids: Callable[[], Awaitable[list[int]]]


async def counters(meter: Meter) -> dict[str, float]:
    """The deployment's counted work so far, summed over its processes, and its CPU
    seconds (user + system) by pid under the key `cpu_s:<pid>`."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(COUNTED, 0.0)
    async with httpx.AsyncClient(timeout=10) as client:
        for url in meter.metrics_urls:
            text = (await client.get(f"{url}/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.labels.get("event_type") == "AuditEntryRecorded":
                        continue  # the audit chain's own records: the same in both modes
                    for what, (name, labels) in COUNTED.items():
                        if sample.name == name and labels.items() <= sample.labels.items():
                            totals[what] += sample.value
    for pid in await meter.pids():
        with contextlib.suppress(OSError):  # it ended meanwhile
            totals[f"cpu_s:{pid}"] = cpu_seconds(pid)
    return totals


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc; fields 14 and 15 of stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds the processes used between two readings (one that started meanwhile
    counts from zero)."""
    return sum(t - before.get(k, 0.0) for k, t in after.items() if k.startswith("cpu_s:"))


async def settled(meter: Meter) -> dict[str, float]:
    """The counters once every consumer has caught up (no delivery for two seconds: idle
    consumers of the in-process bus poll every half second)."""
    last = await counters(meter)
    while True:
        await asyncio.sleep(2.0)
        now = await counters(meter)
        if now["deliveries"] == last["deliveries"]:
            return now
        last = now


def costs(before: dict[str, float], after: dict[str, float], sagas: float) -> dict[str, float]:
    """What each of `sagas` cost the deployment between two readings of its counters."""
    moved = {what: after[what] - before[what] for what in COUNTED}
    out = {f"{what}_per_saga": round(moved[what] / sagas, 2)
           for what in ("messages", "deliveries", "broker_deliveries", "commits")}
    out["gc_ms_per_saga"] = round(moved["gc_pause_s"] * 1000 / sagas, 3)
    out["gc_pauses_over_10ms"] = moved["gc_pauses"] - moved["gc_pauses_within_10ms"]
    out["cpu_ms_per_saga"] = round(cpu_used(before, after) * 1000 / sagas, 2)
    if moved["loop_lags"]:
        out["loop_lag_over_10ms_share"] = round(
            1 - moved["loop_lags_within_10ms"] / moved["loop_lags"], 3)
    return out


async def measure(url: str, store_id: str, products: list[str], seconds: float,
                  concurrency: int, meter: Meter | None = None,
                  latency_rate: float | None = None) -> dict[str, float]:
    before = await counters(meter) if meter is not None else None
    load = await OtherLoad(meter.pids).start() if meter is not None else None
    started = time.perf_counter()
    rate = await max_rate(url, store_id, products, seconds, concurrency)
    result = {"sagas_per_s": round(rate, 1)}
    if load is not None:
        result["other_cpu_cores"] = await load.cores("the throughput run")
    if meter is not None and before is not None:
        sagas = rate * (time.perf_counter() - started)
        result.update(costs(before, await settled(meter), sagas))
    at = latency_rate or max(rate / 2, 1)
    before = await counters(meter) if meter is not None else None
    load = await OtherLoad(meter.pids).start() if meter is not None else None
    latencies = await latencies_at(url, store_id, products, at, seconds)
    result.update({k: v for k, v in latencies.items() if k != "sagas"})
    result["latency_rate_per_s"] = round(at, 1)
    if load is not None:
        result["other_cpu_cores_at_latency_rate"] = await load.cores("the latency run")
    if meter is not None and before is not None:
        # The same work at that rate, open loop: batches are smaller there, so a sale costs
        # more than at the maximum (each wake, unit of work and HTTP chunk for fewer sales).
        there = costs(before, await settled(meter), latencies["sagas"])
        result["cpu_ms_per_saga_at_latency_rate"] = there["cpu_ms_per_saga"]
        result["commits_per_saga_at_latency_rate"] = there["commits_per_saga"]
        if "loop_lag_over_10ms_share" in there:
            result["loop_lag_over_10ms_share_at_latency_rate"] = there["loop_lag_over_10ms_share"]
    return result


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(MAGASIN_API_KEYS=KEY, MAGASIN_BANK_LATENCY_MS="0", **extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    return env


async def embedded(
    tmp: Path, seconds: float, concurrency: int, products_n: int,
    saga_mode: str = "choreography", costs: bool = False, latency_rate: float | None = None,
) -> dict[str, float]:
    port = free_port()
    env = base_env(MAGASIN_DATA_DIR=str(tmp / f"embedded-{saga_mode}"),
                   MAGASIN_HTTP_PORT=str(port), MAGASIN_SAGA_MODE=saga_mode)
    url = f"http://127.0.0.1:{port}"
    async with process(["up", "--no-demo-data"], env, tmp / f"embedded-{saga_mode}.log") as proc:
        await healthy(url)
        store_id, products = await seed(url, url, url, products_n)
        server = proc.pid

        async def pids() -> list[int]:
            return [server]

        return await measure(url, store_id, products, seconds, concurrency,
                             Meter([url], pids) if costs else None, latency_rate)


async def http_floor(tmp: Path, seconds: float, concurrency: int) -> tuple[float, float]:
    """Sagas/s of the same client against an app that only answers (bench/http_floor.py),
    and the cores other work used meanwhile (cpu.OtherLoad)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = str(Path(__file__).with_name("http_floor.py"))
    with (tmp / "http_floor.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, script, "serve", str(port), env=base_env(), stdout=out, stderr=out
        )
        try:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(OSError):
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.close()
                        break
                    await asyncio.sleep(0.1)
            async def server() -> list[int]:
                return [proc.pid]

            load = await OtherLoad(server).start()
            rate = await max_rate(url, "s", ["p"], seconds, concurrency)
            return rate, await load.cores("the HTTP floor")
        finally:
            proc.send_signal(signal.SIGINT)
            await proc.wait()


async def distributed(tmp: Path, seconds: float, concurrency: int, products_n: int,
                      saga_mode: str = "choreography", costs: bool = False,
                      latency_rate: float | None = None) -> dict[str, Any]:
    """The whole deployment as `magasin cluster up` runs it (every service, one process
    each, behind the gateway), measured through the gateway's one URL."""
    async with cluster_up(tmp, KEY, MAGASIN_BANK_LATENCY_MS="0",
                          MAGASIN_SAGA_MODE=saga_mode) as deployment:
        url = deployment.url
        store_id, products = await seed(url, url, url, products_n)
        processes = [f"http://127.0.0.1:{port}"
                     for ports in deployment.ports.values() for port in ports]
        meter = Meter(processes, deployment.pids) if costs else None
        usage = await Usage.start(deployment)
        result = await measure(url, store_id, products, seconds, concurrency, meter,
                               latency_rate)
        return result | await usage.per_saga()


async def raw_broker_roundtrip(seconds: float, window: int = 64) -> float:
    """aio-pika alone: persistent messages published with confirms to a durable queue and
    consumed with acks, `window` in flight: completed round trips per second."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=window)
        queue = await channel.declare_queue(f"bench-raw-{uuid.uuid4().hex[:8]}", durable=True)
        slots = asyncio.Semaphore(window)
        received = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            slots.release()

        await queue.consume(on_message)
        body = json.dumps({"event": "x" * 300}).encode()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            await slots.acquire()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
        return received / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="sagas in flight")
    parser.add_argument("--only", "--mode", dest="only", choices=["embedded", "distributed"])
    parser.add_argument("--products", type=int, default=5,
                        help="products sold (one per sale, in turn): few means hot stock items")
    parser.add_argument("--saga", choices=["choreography", "orchestration"],
                        default="choreography",
                        help="orchestration: also measure it, next to choreography")
    parser.add_argument("--latency-rate", type=float, default=20.0,
                        help="with --saga orchestration: sagas/s (open loop) at which both "
                        "coordinations' latencies are measured, the same load for both")
    parser.add_argument("--runs", type=int, default=1,
                        help="measure this many times (each with its floors) and print the "
                        "medians, with every run under `runs`: this machine is noisy")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.runs > 1 and args.saga == "orchestration":
        parser.error("--runs measures the choreography alone")
    out: dict[str, Any] = {}
    if args.saga == "orchestration":
        modes = ("choreography", "orchestration")
        with tempfile.TemporaryDirectory() as tmp:
            if args.only != "distributed":
                out["coordination"] = {
                    mode: await embedded(Path(tmp), args.seconds, args.concurrency,
                                         args.products, saga_mode=mode, costs=True,
                                         latency_rate=args.latency_rate)
                    for mode in modes
                }
            if args.only == "distributed":
                out["coordination_distributed"] = {
                    mode: await distributed(Path(tmp), args.seconds, args.concurrency,
                                            args.products, saga_mode=mode, costs=True,
                                            latency_rate=args.latency_rate)
                    for mode in modes
                }
        print(json.dumps(out))
        return
    runs = [await once(args) for _ in range(args.runs)]
    print(json.dumps(runs[0] if len(runs) == 1 else {**medians(runs), "runs": runs}))


async def once(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "embedded"):
            out["embedded"] = await embedded(
                Path(tmp), args.seconds, args.concurrency, args.products, costs=True)
        if args.only in (None, "distributed"):
            out["distributed"] = await distributed(
                Path(tmp), args.seconds, args.concurrency, args.products, costs=True)
    out["raw_broker_roundtrip_per_s"] = round(await raw_broker_roundtrip(args.seconds / 2))
    with tempfile.TemporaryDirectory() as tmp:
        rate, other = await http_floor(Path(tmp), args.seconds / 2, args.concurrency)
        out["raw_http_sagas_per_s"] = round(rate, 1)
        out["other_cpu_cores_during_http_floor"] = other
    await add_floors_and_ratios(out, args.seconds / 2)
    return out


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number the runs report, under the same keys (a key some run
    lacks is left out); each run keeps its own floors, so a ratio's median is the median of
    the ratios measured in the same run, not a ratio of medians."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs if key in run]
        if len(values) < len(runs):
            continue
        if isinstance(first, dict):
            out[key] = medians(values)
        elif isinstance(first, int | float) and not isinstance(first, bool):
            out[key] = round(statistics.median(values), 3)
    return out


if __name__ == "__main__":
    asyncio.run(main())
