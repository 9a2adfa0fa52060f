"""`magasin cluster up` for the benchmarks: the whole distributed deployment on a database
and a RabbitMQ namespace of its own (removed afterwards), its gateway URL and the ports of
each service's processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg

PG_URL = os.environ.get("MAGASIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("MAGASIN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BANNER = "Ctrl-C stops every process."
SRC = str(Path(__file__).resolve().parents[1] / "src")
SERVICES = ("transaction", "payment", "inventory", "store", "audit", "eventstore")


@dataclass(frozen=True)
class Deployment:
    url: str
    """The gateway."""
    ports: dict[str, list[int]]
    """Each service's processes."""
    pid: int
    """`magasin cluster up`, parent of every process of the deployment."""
    database: str
    """The deployment's PostgreSQL database."""

    async def pids(self) -> list[int]:
        """Every process working for the deployment: `magasin cluster up` and all under it
        (services, gateway), and the PostgreSQL backends connected to its database."""
        admin = await asyncpg.connect(PG_URL)
        try:
            rows = await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database)
        finally:
            await admin.close()
        return descendants(self.pid) + [row["pid"] for row in rows]


def descendants(root: int) -> list[int]:
    """`root` and every process under it (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(stat[1])
    tree, frontier = [root], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        tree.extend(frontier)
    return tree


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def cluster_up(workdir: Path, key: str, scale: str = "",
                     **settings: str) -> AsyncIterator[Deployment]:
    suffix = uuid.uuid4().hex[:8]
    database, namespace = f"magasin_bench_{suffix}", f"bench-{suffix}"
    server = PG_URL.rsplit("/", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(MAGASIN_DATABASE_URL=f"{server}/{database}", MAGASIN_AMQP_URL=AMQP_URL,
               MAGASIN_AMQP_NAMESPACE=namespace, MAGASIN_API_KEYS=key,
               MAGASIN_DATA_DIR=str(workdir / "var"), MAGASIN_LOG_FORMAT="json", **settings)
    env["PYTHONPATH"] = SRC
    port = free_port()
    log = workdir / "cluster.log"
    args = ["cluster", "up", "--port", str(port), "--service-ports", "0", "--no-demo-data"]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "magasin", *args, *(["--scale", scale] if scale else []),
            env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while BANNER not in (text := log.read_text(errors="replace")):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cluster up failed:\n{text[-3000:]}")
            await asyncio.sleep(0.2)
        ports: dict[str, list[int]] = {}
        for service, listed in re.findall(r"\|\s+(\w+)\s+(http://\S+(?:, http://\S+)*)", text):
            if service in SERVICES:
                ports[service] = [int(u.rsplit(":", 1)[1]) for u in listed.split(", ")]
        yield Deployment(f"http://127.0.0.1:{port}", ports, proc.pid, database)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await delete_namespace(namespace)
        admin = await asyncpg.connect(PG_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


async def delete_namespace(namespace: str) -> None:
    """Delete every queue and exchange named `<namespace>.…` (the services' consumers change
    as magasin grows, so the names are read from the broker rather than listed here)."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await listing.communicate()
    queues = [q for q in out.decode().split() if q.startswith(f"{namespace}.")]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for exchange in ("events", "dlx"):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(f"{namespace}.{exchange}")
