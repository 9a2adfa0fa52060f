"""CPU per saga of the distributed deployment, per process, from /proc (Linux): issue 11's
"CPU per sale ≤ 15 ms in all processes".

`Usage.start(deployment)` snapshots the CPU time of every `magasin serve` process of the
deployment (found by the ports `bench/cluster_up.py` reports), of the other processes under
`magasin cluster up` (the gateway's nginx master and workers, and the supervisor itself:
every saga's requests pass the gateway), of the PostgreSQL backends
serving its database, and of the RabbitMQ broker, and the sagas the transaction service
finished so far (`magasin_sagas_finished_total`); `per_saga()` returns the differences
divided by the sagas finished in between. PostgreSQL backends that appeared or ended in
between are counted from when they were seen; the broker is shared with whatever else
uses it on this machine, so its share is an upper bound.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from cluster_up import Deployment, descendants

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def service_pids(deployment: Deployment) -> dict[str, int]:
    """`service[:port]` -> pid of each `magasin serve` process of the deployment."""
    wanted = {str(port): service for service, ports in deployment.ports.items()
              for port in ports}
    found: dict[str, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = _cmdline(pid)
        if "serve" in args and "--port" in args:
            port = args[args.index("--port") + 1]
            if port in wanted:
                several = len(deployment.ports[wanted[port]]) > 1
                found[f"{wanted[port]}:{port}" if several else wanted[port]] = int(pid)
    return found


def other_pids(deployment: Deployment, services: dict[str, int]) -> dict[str, list[int]]:
    """The deployment's processes that are not services: the gateway (nginx's master and
    workers) and `magasin cluster up` itself with the helpers honcho forks for each process
    it supervises."""
    found: dict[str, list[int]] = {}
    taken = set(services.values())
    for pid in descendants(deployment.pid):
        if pid in taken:
            continue
        args = _cmdline(str(pid))
        gateway = bool(args) and "nginx" in Path(args[0].split()[0]).name
        found.setdefault("gateway (nginx)" if gateway else "cluster up", []).append(pid)
    return found


def broker_pid() -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if any(arg.endswith("beam.smp") for arg in _cmdline(pid)[:1]):
            return int(pid)
    return None


def busy_seconds() -> float:
    """CPU seconds the machine's cores have been busy since boot (/proc/stat's first line:
    user, nice, system, irq, softirq and steal; not idle or iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS


OTHER_LOAD_WARNING = 0.25
"""Cores of other work during a phase above which a benchmark warns that its figures are low."""


class OtherLoad:
    """The CPU the rest of the machine used while a phase of a benchmark ran, in cores: the
    busy time of every core less this process's (the load generator), the measured
    processes' (`pids`, asked at both ends: one that started meanwhile counts from zero)
    and the RabbitMQ broker's. Near 0 on a quiet machine; well above, the phase shared the
    two cores with something else (a package being installed, another benchmark), and its
    throughput and latencies are worse for it than the code's: the first runs of the
    sixteenth session, with `apt-get` still running, measured half the throughput of the
    runs after it."""

    def __init__(self, pids: Callable[[], Awaitable[list[int]]]) -> None:
        self._pids = pids
        self._broker = broker_pid()
        self._at = (0.0, 0.0, 0.0)
        self._measured: dict[int, float] = {}

    async def _readings(self) -> dict[int, float]:
        pids = await self._pids() + ([self._broker] if self._broker is not None else [])
        return {pid: cpu_seconds(pid) for pid in pids}

    async def start(self) -> OtherLoad:
        self._measured = await self._readings()
        self._at = (time.perf_counter(), busy_seconds(), time.process_time())
        return self

    async def cores(self, phase: str) -> float:
        """The other work's cores since `start`; warns on stderr, naming `phase`, above
        OTHER_LOAD_WARNING."""
        wall, busy, own = time.perf_counter(), busy_seconds(), time.process_time()
        measured = sum(t - self._measured.get(pid, 0.0)
                       for pid, t in (await self._readings()).items())
        other = ((busy - self._at[1]) - (own - self._at[2]) - measured) / (wall - self._at[0])
        if other > OTHER_LOAD_WARNING:
            print(f"bench: other work used {other:.2f} cores during {phase}: its figures are "
                  "lower than the code's", file=sys.stderr)
        return round(max(other, 0.0), 2)


def _database_url(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in env:
        if entry.startswith(b"MAGASIN_DATABASE_URL="):
            return entry.split(b"=", 1)[1].decode()
    raise RuntimeError(f"process {pid} has no MAGASIN_DATABASE_URL")


class Usage:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        services = service_pids(deployment)
        self.pids = {name: [pid] for name, pid in services.items()}
        self.pids |= other_pids(deployment, services)
        self.broker = broker_pid()
        self.database_url = _database_url(next(iter(services.values())))
        self.before: dict[str, float] = {}
        self.backends: dict[int, float] = {}
        self.sagas_before = 0.0

    @classmethod
    async def start(cls, deployment: Deployment) -> Usage:
        usage = cls(deployment)
        usage.before = usage._processes()
        usage.backends = {pid: cpu_seconds(pid) for pid in await usage._backend_pids()}
        usage.sagas_before = await usage._sagas_finished()
        return usage

    def _processes(self) -> dict[str, float]:
        cpu = {name: sum(map(cpu_seconds, pids)) for name, pids in self.pids.items()}
        if self.broker is not None:
            cpu["rabbitmq (shared)"] = cpu_seconds(self.broker)
        return cpu

    async def _backend_pids(self) -> list[int]:
        name = self.database_url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.database_url.rsplit("/", 1)[0] + "/postgres")
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    async def _sagas_finished(self) -> float:
        total = 0.0
        async with httpx.AsyncClient(timeout=10) as client:
            for port in self.deployment.ports.get("transaction", []):
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                for line in text.splitlines():
                    if line.startswith("magasin_sagas_finished_total"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    async def per_saga(self) -> dict[str, Any]:
        """CPU ms per saga finished since `start`, per process and in all."""
        sagas = await self._sagas_finished() - self.sagas_before
        after = self._processes()
        backends_now = await self._backend_pids()
        pg = sum(cpu_seconds(pid) - self.backends.get(pid, 0.0) for pid in backends_now)
        spent = {name: after[name] - self.before.get(name, 0.0) for name in after}
        spent["postgresql backends"] = pg
        if sagas <= 0:
            return {"cpu_sagas_counted": 0}
        per = {name: round(s * 1000 / sagas, 2) for name, s in spent.items()}
        return {
            "cpu_sagas_counted": int(sagas),
            "cpu_ms_per_saga_by_process": per,
            "cpu_ms_per_saga": round(sum(s for n, s in spent.items()
                                         if not n.endswith("(shared)")) * 1000 / sagas, 2),
            "cpu_ms_per_saga_with_broker": round(sum(spent.values()) * 1000 / sagas, 2),
        }
