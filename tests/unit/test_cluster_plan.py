"""`magasin cluster up`'s plan: processes per service from --scale, and ports for each that
are free (or a clear refusal)."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from magasin.bootstrap import SERVICES
from magasin.cluster import (
    check_connections,
    commands,
    ensure_servers,
    environment,
    parse_scale,
    plan,
)
from magasin.config import Settings
from magasin.eventstore.connections import ServerLimits, per_cluster, refusal
from magasin.shared.errors import ConfigurationError


def test_scale_names_processes_per_service_and_every_other_runs_once() -> None:
    scale = parse_scale("transaction=2, inventory=3")

    assert scale == {**dict.fromkeys(SERVICES, 1), "transaction": 2, "inventory": 3}


@pytest.mark.parametrize("wrong", ["bank=2", "transaction=0", "transaction=two", "store"])
def test_a_scale_that_means_nothing_is_refused(wrong: str) -> None:
    with pytest.raises(ConfigurationError, match="--scale"):
        parse_scale(wrong)


def free_block(size: int) -> int:
    """The first of `size` consecutive free ports below Linux's ephemeral range (32768 up),
    where client connections of other tests cannot take one between the probe and the plan
    (a block probed from an ephemeral port failed so once in CI)."""
    for base in range(20_000, 32_000, size):
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + size):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports below 32000")


def test_each_process_gets_a_port_of_its_own_after_the_gateway_s(tmp_path: Path) -> None:
    base = free_block(7)
    settings = Settings(data_dir=tmp_path, api_keys="k")

    ports = plan(settings, "127.0.0.1", 0, parse_scale("payment=2"), base).ports
    # With 0, the kernel picks: 81 processes, none sharing a port (a port just closed may
    # be its next pick; one plan in CI gave two processes one port).
    anywhere = plan(settings, "127.0.0.1", 0, parse_scale("payment=2,transaction=75"), 0).ports

    flat = [p for service in SERVICES for p in ports[service]]
    assert flat == list(range(base, base + 7)) and len(ports["payment"]) == 2
    assert len({p for ps in anywhere.values() for p in ps}) == 81


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"port {port} is taken"):
            plan(Settings(data_dir=tmp_path, api_keys="k"), "127.0.0.1", port,
                 parse_scale(""), 0)


def test_every_process_is_exec_ed_so_that_stopping_it_reaches_it(tmp_path: Path) -> None:
    the_plan = plan(Settings(data_dir=tmp_path, api_keys="k"), "127.0.0.1", 0,
                    parse_scale("store=2"), 0)

    named = dict(commands(the_plan, tmp_path / "nginx.conf"))

    assert set(named) == {*SERVICES, "store.1", "store.2", "gateway"} - {"store"}
    assert all(command.startswith("exec ") for command in named.values())
    assert "serve store" in named["store.2"] and "daemon off;" in named["gateway"]


# -- the PostgreSQL connection budget -----------------------------------------------------

DEFAULT_SERVER = ServerLimits(max_connections=100, reserved=3, in_use=0)


def test_a_cluster_needs_pool_plus_listener_connections_per_process() -> None:
    assert per_cluster(6, 10) == 66
    assert refusal(6, 10, DEFAULT_SERVER) is None
    assert refusal(9, 9, DEFAULT_SERVER) is None  # 90 of 97


def test_a_cluster_over_the_server_s_connections_is_refused_with_the_pool_that_fits() -> None:
    reason = refusal(9, 10, DEFAULT_SERVER)

    assert reason is not None
    assert "9 processes may open 9 × (10 + 1) = 99 PostgreSQL connections" in reason
    assert "the server allows 97 (max_connections 100 − 3 reserved)" in reason
    assert "set MAGASIN_PG_POOL_MAX to 9 or less" in reason


def test_connections_other_clients_hold_do_not_refuse_a_plan() -> None:
    busy = ServerLimits(max_connections=100, reserved=3, in_use=90)

    assert refusal(6, 10, busy) is None


def test_cluster_up_refuses_a_scale_the_server_cannot_serve(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys="k")
    four = plan(settings, "127.0.0.1", 0, parse_scale("transaction=4"), 0)
    small = ServerLimits(max_connections=50, reserved=3, in_use=0)

    with pytest.raises(ConfigurationError, match=r"--scale: 9 processes may open .* = 99 "):
        check_connections(four, 10, small)
    assert check_connections(four, 4, small) is None  # 9 × 5 = 45 of 47
    busy = ServerLimits(max_connections=50, reserved=3, in_use=10)
    assert "leaving 37" in (check_connections(four, 4, busy) or "")
    env = environment(four, {})
    assert env["MAGASIN_PG_CLUSTER_PROCESSES"] == "9"


def test_a_database_url_naming_the_server_s_unix_socket_is_reachable(tmp_path: Path) -> None:
    """libpq and asyncpg take a socket directory, percent-encoded, as the URL's host."""
    with contextlib.ExitStack() as held:
        unix = held.enter_context(socket.socket(socket.AF_UNIX))
        unix.bind(str(tmp_path / ".s.PGSQL.5432"))
        unix.listen()
        broker = held.enter_context(socket.socket())
        broker.bind(("127.0.0.1", 0))
        broker.listen()
        directory = str(tmp_path).replace("/", "%2F")
        settings = Settings(database_url=f"postgresql://postgres@{directory}/magasin",
                            amqp_url=f"amqp://guest:guest@127.0.0.1:{broker.getsockname()[1]}/")
        said: list[str] = []

        ensure_servers(settings, said.append)  # reachable: nothing to start, no error

        assert said == []
        missing = Settings(database_url=f"postgresql://postgres@{directory}:5999/magasin",
                           amqp_url=settings.amqp_url)
        with pytest.raises(ConfigurationError, match="PostgreSQL is unreachable"):
            ensure_servers(missing, said.append)
