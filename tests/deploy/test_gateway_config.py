"""The gateway's configuration for both targets passes nginx's own check, deploy/gateway/ is
the current rendering of the template, and deploy/compose.yaml is a valid compose file
whose gateway fronts every service."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from magasin.bootstrap import build_service
from magasin.config import Settings
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.gateway import nginx, render
from magasin.gateway.routes import SERVICES, consumer_service
from magasin.service import ServiceContext
from tests.conftest import IN_CI
from tests.deploy.conftest import DEPLOY

GATEWAY_DIR = DEPLOY / "gateway"


def nginx_binary() -> str:
    try:
        return nginx.binary()
    except Exception as exc:
        message = f"{exc} (make test runs scripts/ensure-gateway.sh)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def test_the_local_gateway_configuration_passes_nginx_t(tmp_path: Path) -> None:
    nginx_binary()
    upstreams = {s: [f"127.0.0.1:{9100 + i}", f"127.0.0.1:{9200 + i}"]
                 for i, s in enumerate(SERVICES)}
    conf = render.write(render.local(tmp_path, 9080, upstreams, Settings()), tmp_path)

    nginx.check(conf)  # raises with nginx's report when it is not valid

    text = conf.read_text()
    assert "server 127.0.0.1:9100 max_fails=1" in text and "server 127.0.0.1:9205" in text


def test_a_broken_configuration_fails_nginx_t(tmp_path: Path) -> None:
    nginx_binary()
    conf = render.write(render.local(tmp_path, 9080, {}, Settings()), tmp_path)
    conf.write_text(conf.read_text().replace("proxy_pass http://store;", "proxy_pass;", 1))

    with pytest.raises(Exception, match="nginx -t failed"):
        nginx.check(conf)


def test_the_compose_gateway_configuration_passes_nginx_t(tmp_path: Path) -> None:
    """The committed file as the nginx container reads it: in a private mount namespace,
    deploy/gateway/ is at /etc/nginx/magasin, the services' names resolve (nginx resolves
    upstreams when it checks), and the image's `nginx` user and /var/cache/nginx exist."""
    binary = nginx_binary()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed to mount deploy/gateway where compose does")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {' '.join(SERVICES)}\n")
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + "nginx:x:4101:4101::/:/bin/false\n")
    group.write_text(Path("/etc/group").read_text() + "nginx:x:4101:\n")
    script = textwrap.dedent(f"""\
        set -e
        mount --bind {hosts} /etc/hosts
        mount --bind {passwd} /etc/passwd
        mount --bind {group} /etc/group
        mount -t tmpfs tmpfs /etc/nginx
        mkdir /etc/nginx/magasin
        mount --bind {GATEWAY_DIR} /etc/nginx/magasin
        mount -t tmpfs tmpfs /var/cache
        mkdir /var/cache/nginx
        exec {binary} -t -p /etc/nginx/ -c /etc/nginx/magasin/nginx.conf
    """)
    done = subprocess.run(["unshare", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, check=False)
    if "unshare failed" in done.stderr or "Operation not permitted" in done.stderr:
        if IN_CI:
            pytest.fail(f"cannot make a mount namespace: {done.stderr}")
        pytest.skip(f"cannot make a mount namespace: {done.stderr}")
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_deploy_gateway_is_the_current_rendering_of_the_template() -> None:
    expected = render.render(render.compose(Settings()))
    stale = [name for name, text in expected.items()
             if not (GATEWAY_DIR / name).exists() or (GATEWAY_DIR / name).read_text() != text]
    assert not stale, (f"deploy/gateway/ is out of date ({stale}): run "
                       "`magasin gateway render --target compose --out deploy/gateway`")


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose specification's schema it ships (vendored from
    compose-spec), offline."""
    exe = shutil.which("check-jsonschema") or str(
        Path(__file__).resolve().parents[2] / ".venv" / "bin" / "check-jsonschema")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, check=False)


def test_the_compose_file_follows_the_compose_specification() -> None:
    done = compose_check(DEPLOY / "compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_compose_file_breaking_the_specification_is_refused(tmp_path: Path) -> None:
    broken = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broken["services"]["gateway"]["depends_on"] = {"transaction": {"condition": "ready"}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))

    done = compose_check(path)

    assert done.returncode != 0
    assert "ready" in done.stdout + done.stderr


def test_the_compose_gateway_is_the_one_way_in_to_every_service() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["ports"] == ["8080:8080"]
    assert "./gateway:/etc/nginx/magasin:ro" in gateway["volumes"]
    assert set(gateway["depends_on"]) == set(SERVICES)
    for service in SERVICES:
        assert "ports" not in services[service], f"{service} is published past the gateway"
    conf = (GATEWAY_DIR / "nginx.conf").read_text()
    for service in SERVICES:
        assert f"server {service}:{render.COMPOSE_PORT} " in conf


def test_every_consumer_is_named_after_its_service(tmp_path: Path) -> None:
    """The gateway routes dead letters by this rule (a letter's id starts with its
    consumer's name): a consumer named otherwise would be unreachable through it."""
    settings = Settings(data_dir=tmp_path)
    for service in SERVICES:
        ctx = ServiceContext(SqliteEventStore(tmp_path / f"{service}.db"), settings,
                             mode="distributed")
        for consumer in build_service(service, ctx).consumers:
            assert consumer_service(consumer) == service, consumer
            assert consumer_service(f"{consumer}:some-message-id") == service
