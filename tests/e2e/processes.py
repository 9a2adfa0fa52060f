"""Distributed magasin for end-to-end tests: each service as its own OS process
(`python -m magasin serve <service>`) on a dedicated PostgreSQL database and RabbitMQ
namespace, which can be killed, restarted and torn down again."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from magasin.config import Settings
from magasin.gateway import nginx, render
from magasin.gateway.routes import SERVICES as ALL_SERVICES
from magasin.messaging.partitioning import configured_partitions

SERVICES = ("store", "inventory", "payment", "transaction")
OPTIONAL_SERVICES = ("audit", "eventstore")
"""Services a test may spawn on top of the four of the saga."""
CONSUMERS = (
    "store", "inventory", "payment", "transaction", "transaction.catalog",
    "transaction.notifier", "transaction.orchestrator", "transaction.steps", "audit",
    "eventstore",
)
"""Every consumer the four services subscribe (N RabbitMQ partition queues each)."""
HEALTH_TIMEOUT = 30.0


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes ports from for outgoing connections and `port=0` binds."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()
"""The ports free_port gave in this run. A process given one does not listen on it until it
has started, so the probe alone would find it free for the next caller: two processes of a
cluster then raced for one port (in a CI run, a payment process and a transaction process
got the same one; the transaction process died on the bind, the payment process answered
its health check, and the gateway sent sales to the payment service)."""


def free_port() -> int:
    """A port nobody listens on right now, outside the kernel's ephemeral range, and not
    given before in this run (see _HANDED_OUT): a process killed and started again on it
    finds it free. (A port from that range, the kernel's pick for port 0, may meanwhile
    become the source port of any outgoing connection, or another server's `port=0`: the
    restart would then fail, or a client reach a stranger.)"""
    low, _ = _ephemeral_ports()
    while True:
        port = random.randrange(max(1024, low - 12_000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: another pick
        _HANDED_OUT.add(port)
        return port


class ServiceProcess:
    """One `magasin serve <service>` process; its output goes to `log_path` (appended to
    across restarts, so a crash and the recovery read as one story)."""

    def __init__(self, service: str, port: int, env: Mapping[str, str], log_path: Path,
                 cwd: Path) -> None:
        self.service = service
        self.port = port
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.command = ["serve", service]
        """Arguments of `python -m magasin` (`["up", "--no-demo-data"]` for embedded)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return self.log_path.stem

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is running already")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts} of {self.name} "
                      f"on port {self.port} =====\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "magasin", *self.command, "--port", str(self.port)],
                env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def _health_failure(self) -> str | None:
        if not self.alive:
            code = self.popen.returncode if self.popen else None
            return f"{self.name} exited with {code} before it was healthy:\n{self.tail()}"
        return None

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Block until GET /health answers 200 (for sync fixtures)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if (failure := self._health_failure()) is not None:
                    raise RuntimeError(failure)
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not healthy in {timeout}s:\n{self.tail()}")
                time.sleep(0.1)

    async def healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Wait until GET /health answers 200, without blocking the event loop."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if (failure := self._health_failure()) is not None:
                    raise RuntimeError(failure)
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not healthy in {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name} killed (SIGKILL) =====\n".encode())

    def terminate(self, grace: float = 15.0) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if it takes longer than `grace`."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


class Gateway:
    """The real gateway (nginx, as `magasin cluster up` runs it) on a free port, its files
    and access log under `directory`, in front of the processes `upstreams()` names (by
    service); `reload()` re-renders for what it names then. `settings` sets its limits."""

    def __init__(self, directory: Path, upstreams: Callable[[], Mapping[str, list[str]]],
                 settings: Settings) -> None:
        self.directory = directory
        self.upstreams = upstreams
        self.settings = settings
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "nginx.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def config(self) -> Path:
        local = render.local(self.directory, self.port, self.upstreams(), self.settings)
        return render.write(local, self.directory)

    def start(self) -> None:
        conf = self.config()
        nginx.check(conf)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                nginx.command(conf), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while True:  # listening once a connection is accepted
            if self.popen.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.popen.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx not listening in {HEALTH_TIMEOUT}s:\n{self.tail()}")
            time.sleep(0.05)

    def reload(self) -> None:
        """New configuration, no dropped request: nginx's SIGHUP (new workers take over)."""
        if self.popen is not None and self.popen.poll() is None:
            self.config()
            self.popen.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)  # nginx: fast shutdown
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"


class Cluster:
    """The processes of one distributed magasin, all sharing `env`, and the gateways in
    front of them."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.processes: list[ServiceProcess] = []
        self.gateways: list[Gateway] = []

    def add_gateway(self, **limits: Any) -> Gateway:
        """Start one more gateway in front of this cluster; `limits` override the default
        Settings (`gateway_rate_per_s=5`, say)."""
        directory = self.workdir / f"gateway-{len(self.gateways) + 1}"
        gateway = Gateway(directory, self.upstreams, Settings(**limits))
        gateway.start()
        self.gateways.append(gateway)
        return gateway

    def upstreams(self) -> dict[str, list[str]]:
        """The live processes' addresses by service (one without any: none)."""
        return {s: [f"127.0.0.1:{p.port}" for p in self.processes if p.service == s]
                for s in ALL_SERVICES}

    @property
    def gateway(self) -> Gateway:
        """The first gateway: the one URL the tests' client uses."""
        return self.gateways[0]

    def spawn(self, service: str) -> ServiceProcess:
        """Start one more process of `service` on a free port (wait with `healthy()`)."""
        if service not in SERVICES + OPTIONAL_SERVICES:
            raise ValueError(f"unknown service {service!r}")
        count = sum(p.service == service for p in self.processes)
        log_path = self.workdir / f"{service}-{count + 1}.log"
        process = ServiceProcess(service, free_port(), self.env, log_path, self.workdir)
        self.processes.append(process)
        process.start()
        for gateway in self.gateways:
            gateway.reload()
        return process

    def first(self, service: str) -> ServiceProcess:
        return next(p for p in self.processes if p.service == service)

    def url(self, service: str) -> str:
        """Base URL of the first process of `service`."""
        return self.first(service).url

    def retire(self, process: ServiceProcess) -> None:
        """Stop one process gracefully and forget it."""
        self.processes.remove(process)
        for gateway in self.gateways:
            gateway.reload()
        process.terminate()

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for process in self.processes:
            if process.alive and process.popen is not None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.terminate()

    def logs(self, lines: int = 60) -> str:
        return "\n".join(
            [f"----- {p.name} ({p.log_path}) -----\n{p.tail(lines)}" for p in self.processes]
            + [f"----- gateway ({g.log_path}) -----\n{g.tail(lines)}" for g in self.gateways]
        )


@contextlib.contextmanager
def running_cluster(
    pg_database: str,
    amqp_url: str,
    workdir: Path,
    *,
    kind: str,
    services: tuple[str, ...],
    env: Mapping[str, str],
    retry_attempts: int,
    keep_logs: Path | None = None,
    gateway: Mapping[str, Any] | None = None,
) -> Iterator[Cluster]:
    """`services`, one healthy process each, on a PostgreSQL database and a RabbitMQ
    namespace of their own (named after `kind` and the test run), removed afterwards; with
    `keep_logs`, the processes' logs are copied there and the database and queues kept;
    with `gateway` (Settings overrides of its limits, may be empty), the real gateway in
    front of them (`cluster.gateway.url`)."""
    from tests.conftest import RUN_ID, run_sync

    suffix = uuid.uuid4().hex[:8]
    database = f"magasin_{kind}_{RUN_ID}_{suffix}"
    namespace = f"magasin-{kind}-{RUN_ID}-{suffix}"
    database_url = run_sync(create_database(pg_database, database))
    running = Cluster({
        **env, "MAGASIN_DATABASE_URL": database_url, "MAGASIN_DATABASE_SCHEMA": "",
        "MAGASIN_AMQP_URL": amqp_url, "MAGASIN_AMQP_NAMESPACE": namespace,
    }, workdir)
    try:
        for service in services:
            running.spawn(service)
        for process in running.processes:
            process.wait_healthy()
        if gateway is not None:
            running.add_gateway(**gateway)
        yield running
    finally:
        running.stop()
        if keep_logs is not None:
            shutil.copytree(workdir, keep_logs / suffix)
        else:
            try:
                run_sync(delete_topology(amqp_url, namespace, retry_attempts))
            finally:
                run_sync(drop_database(pg_database, database))


async def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `server_url`; returns its URL."""
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{server_url.rsplit('/', 1)[0]}/{name}"


async def drop_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def consumer_count(amqp_url: str, queue: str) -> int:
    """How many consumers are attached to `queue` right now."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0
    finally:
        await connection.close()


async def _queues_named(prefix: str) -> list[str]:
    """Queue names starting with `prefix`, as `rabbitmqctl` lists them (empty without it)."""
    try:
        listing = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return []
    out, _ = await listing.communicate()
    return [name for name in out.decode().split() if name.startswith(prefix)]


async def delete_topology(amqp_url: str, namespace: str, retry_attempts: int) -> None:
    """Delete the exchanges and queues the services declared under `namespace`."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        names: set[str] = set()
        for consumer in CONSUMERS:
            queue = f"{namespace}.{consumer}"
            names |= {f"{queue}.dlq", f"{queue}.log"}  # .log: consumers of the whole log
            for partition in range(configured_partitions()):
                names |= {f"{queue}.p{partition}"}
                names |= {f"{queue}.p{partition}.retry.{level}"
                          for level in range(1, retry_attempts)}
        # A consumer may have a longer retry policy of its own (payment does): ask the
        # broker for whatever else was declared under this namespace.
        names |= set(await _queues_named(f"{namespace}."))
        for name in sorted(names):
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{namespace}.events")
        await channel.exchange_delete(f"{namespace}.dlx")
        await channel.exchange_delete(f"{namespace}.log")
    finally:
        await connection.close()
