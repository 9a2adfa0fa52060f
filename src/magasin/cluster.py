"""`magasin cluster up`: the whole distributed deployment from one command.

PostgreSQL and RabbitMQ are started if they are local and down (scripts/ensure-services.sh),
the database is created, every service runs as `magasin serve <service>` processes (each
with its outbox relay) on ports of their own and the gateway (nginx) on one port in front
of them, all under honcho's process manager; once every process answers, the demo data is
seeded through the gateway and the URL and API key are printed. Ctrl-C (or SIGTERM) stops
every process; so does any process exiting, as in foreman.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from honcho.manager import Manager
from honcho.printer import Message

from magasin.bootstrap import SERVICES, api_keys, distributed_store
from magasin.config import Settings
from magasin.eventstore.connections import ServerLimits, per_cluster, refusal, server_limits
from magasin.gateway import nginx, render
from magasin.shared.errors import ConfigurationError

READY_TIMEOUT = 90.0
_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def parse_scale(text: str) -> dict[str, int]:
    """`transaction=2,inventory=2` -> processes per service (every service at least one)."""
    scale = dict.fromkeys(SERVICES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        if name not in scale:
            raise ConfigurationError(f"--scale: unknown service {name!r}; one of {SERVICES}")
        if not count.isdigit() or int(count) < 1:
            raise ConfigurationError(f"--scale: {part!r} needs a count of at least 1")
        scale[name] = int(count)
    return scale


@dataclass(frozen=True)
class Plan:
    """What `cluster up` runs: the gateway's port, each service's processes' ports, where
    the gateway's files go, and the API keys."""

    host: str
    port: int
    ports: Mapping[str, list[int]]
    directory: Path
    keys: frozenset[str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def process_count(self) -> int:
        return sum(len(p) for p in self.ports.values())


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _any_port(host: str, held: contextlib.ExitStack) -> int:
    """A free port of the kernel's choice, kept bound (in `held`) until the plan is made:
    a port just closed may be the kernel's next pick, and two processes would get it."""
    sock = held.enter_context(socket.socket())
    sock.bind((host, 0))
    port: int = sock.getsockname()[1]
    return port


def plan(settings: Settings, host: str, port: int, scale: Mapping[str, int],
         service_port_base: int | None) -> Plan:
    """Ports for everything (service processes from `service_port_base`, the gateway's
    port + 1 by default, 0 = any free port), refusing ports already taken."""
    if not _free(host, port):
        raise ConfigurationError(f"port {port} is taken: choose another with --port")
    base = port + 1 if service_port_base is None else service_port_base
    ports: dict[str, list[int]] = {}
    following = base
    with contextlib.ExitStack() as held:
        for service in SERVICES:
            ports[service] = []
            for _ in range(scale[service]):
                if base == 0:
                    ports[service].append(_any_port(host, held))
                    continue
                if not _free(host, following):
                    raise ConfigurationError(
                        f"port {following} is taken: choose --service-ports (0 = any free port)")
                ports[service].append(following)
                following += 1
    # The cluster keeps its generated key where embedded mode does: `magasin demo` finds it.
    keys = api_keys(settings, "embedded")
    return Plan(host, port, ports, settings.data_dir.resolve() / "cluster", keys)


# -- the servers and the database ------------------------------------------------------------


def _socket_directory(url: str) -> str | None:
    """The directory of the server's Unix socket when `url` names one as its host,
    percent-encoded (`postgresql://user@%2Fvar%2Frun%2Fpostgresql/db`, as libpq and
    asyncpg read it), else None."""
    host = unquote(urlsplit(url).netloc.rpartition("@")[2])
    if host.startswith("/"):
        return host.rsplit(":", 1)[0]  # without the port, if the URL gives one
    return None


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    directory = _socket_directory(url)
    try:
        if directory is not None:
            # libpq's name for the socket of the server listening on that port.
            with socket.socket(socket.AF_UNIX) as unix:
                unix.settimeout(2)
                unix.connect(f"{directory}/.s.PGSQL.{parts.port or default_port}")
            return True
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _local(url: str) -> bool:
    return (_socket_directory(url) is not None
            or urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"))


def ensure_servers(settings: Settings, say: Any) -> None:
    """Start the local PostgreSQL and RabbitMQ if they are down (scripts/ensure-services.sh,
    as `make test` does); fail clearly if either stays unreachable."""
    servers = ((settings.database_url, 5432, "PostgreSQL"), (settings.amqp_url, 5672, "RabbitMQ"))
    down = [(url, name) for url, port, name in servers if not _reachable(url, port)]
    script = _SCRIPTS / "ensure-services.sh"
    if down and all(_local(url) for url, _ in down) and script.exists():
        say(f"starting {' and '.join(name for _, name in down)} ({script.name})")
        subprocess.run(["bash", str(script)], check=False)
    for url, port, name in servers:
        if not _reachable(url, port):
            raise ConfigurationError(f"{name} is unreachable at {urlsplit(url).netloc}")


async def ensure_database(database_url: str) -> tuple[bool, ServerLimits]:
    """CREATE DATABASE when it does not exist; returns whether it did and the server's
    connection limits (the connection asking them not counted as in use)."""
    import asyncpg

    name = urlsplit(database_url).path.lstrip("/") or "postgres"
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres", timeout=10)
    try:
        created = False
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
            created = True
        limits = await server_limits(admin)
        return created, replace(limits, in_use=limits.in_use - 1)
    finally:
        await admin.close()


def check_connections(cluster_plan: Plan, pool_max: int, limits: ServerLimits) -> str | None:
    """Refuse (ConfigurationError) a plan whose processes may open more PostgreSQL
    connections than the server allows; a warning when other clients' connections leave
    less than it needs right now, None otherwise."""
    reason = refusal(cluster_plan.process_count, pool_max, limits)
    if reason is not None:
        raise ConfigurationError(f"--scale: {reason}")
    needed = per_cluster(cluster_plan.process_count, pool_max)
    if needed <= limits.free:
        return None
    return (f"{cluster_plan.process_count} processes may open {needed} PostgreSQL "
            f"connections; other clients hold {limits.in_use} of the server's "
            f"{limits.usable} now, leaving {limits.free}")


async def _store_service_is_empty(settings: Settings) -> bool:
    """Whether the store service has recorded nothing yet: its own log (write side), not a
    read model, which may still be catching up after a restart."""
    async with distributed_store(settings, "store") as store:
        return await store.last_position() == 0


# -- the processes -----------------------------------------------------------------------------


def commands(plan: Plan, conf: Path) -> list[tuple[str, str]]:
    """(name, shell command) of every process; `exec` so that the shell honcho starts is
    replaced by the process itself."""
    python = shlex.quote(sys.executable)
    out = []
    for service, ports in plan.ports.items():
        for i, port in enumerate(ports, 1):
            name = service if len(ports) == 1 else f"{service}.{i}"
            out.append((name, f"exec {python} -m magasin serve {service} "
                              f"--host {shlex.quote(plan.host)} --port {port}"))
    out.append(("gateway", "exec " + shlex.join(nginx.command(conf))))
    return out


def environment(plan: Plan, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env["MAGASIN_API_KEYS"] = ",".join(sorted(plan.keys))
    # Each process checks at start-up that the server can serve the whole cluster.
    env["MAGASIN_PG_CLUSTER_PROCESSES"] = str(plan.process_count)
    env.setdefault("MAGASIN_LOG_FORMAT", "console")  # read by a person, through honcho
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ClusterManager(Manager):  # type: ignore[misc]
    """honcho's Manager, which runs `setup` in a thread once every process is started (not
    before: honcho forks one helper per process, which a running thread makes unsafe) and
    remembers why the cluster stopped."""

    def __init__(self, setup: Any) -> None:
        super().__init__()
        self.setup = setup
        self.failure: str | None = None
        self.stopping = threading.Event()

    def say(self, text: str) -> None:
        self.events.put(Message(type="line", data=text + "\n", time=datetime.datetime.now(),
                                name="cluster", colour=None))

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.say(f"error: {reason}")
        self.terminate()

    def terminate(self) -> None:
        self.stopping.set()
        super().terminate()

    def _start(self) -> None:
        super()._start()
        threading.Thread(target=self.setup, args=(self,), name="cluster-setup",
                         daemon=True).start()


def _wait_ready(manager: ClusterManager, urls: list[str]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        for url in urls:
            while True:
                if manager.stopping.is_set():
                    return False
                try:
                    if client.get(url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    manager.fail(f"{url} did not answer in {READY_TIMEOUT:.0f} s")
                    return False
                time.sleep(0.1)
    return True


def up(settings: Settings, cluster_plan: Plan, demo_data: bool,
       env: Mapping[str, str]) -> int:
    """Run the cluster until Ctrl-C; returns the exit code (0 after Ctrl-C or SIGTERM)."""
    directory = cluster_plan.directory / "gateway"
    upstreams = {s: [f"127.0.0.1:{p}" for p in ports] for s, ports in cluster_plan.ports.items()}
    conf = render.write(
        render.local(directory, cluster_plan.port, upstreams, settings, host=cluster_plan.host),
        directory)
    nginx.check(conf)

    def setup(manager: ClusterManager) -> None:
        try:
            services = [f"http://127.0.0.1:{p}/health"
                        for ports in cluster_plan.ports.values() for p in ports]
            if not _wait_ready(manager, [*services, f"{cluster_plan.url}/health"]):
                return
            key = sorted(cluster_plan.keys)[0]
            if demo_data and asyncio.run(_store_service_is_empty(settings)):
                asyncio.run(_seed(cluster_plan.url, key, settings.currency))
                manager.say("seeded demo stores, catalog and stock (through the gateway)")
            manager.say(_banner(cluster_plan, key))
        except Exception as exc:  # whatever went wrong, stop the cluster and say why
            manager.fail(f"setting the cluster up failed: {exc!r}")

    manager = ClusterManager(setup)
    full_env = environment(cluster_plan, env)
    for name, command in commands(cluster_plan, conf):
        manager.add_process(name, command, env=full_env)
    manager.loop()
    if manager.failure is not None:
        return 1
    # honcho records 130/143 when it stopped everything on SIGINT/SIGTERM: a clean stop.
    return 0 if manager.returncode in (130, 143) else 1


async def _seed(url: str, key: str, currency: str) -> None:
    from magasin.demo import seed_over_http

    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=30) as c:
        await seed_over_http(c, currency)


def _banner(cluster_plan: Plan, key: str) -> str:
    lines = [f"magasin distributed: {cluster_plan.url}  (API docs at /docs)",
             f"API key: {key}  (header X-API-Key)"]
    for service, ports in cluster_plan.ports.items():
        listed = ", ".join(f"http://127.0.0.1:{p}" for p in ports)
        lines.append(f"  {service:<12} {listed}")
    lines.append("Ctrl-C stops every process.")
    return "\n".join(lines)
