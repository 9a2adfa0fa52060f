"""nginx's configuration of the gateway, rendered from one template for two targets: the
local cluster (`magasin cluster up`, the tests: upstreams are the processes' ports) and
compose (`deploy/gateway/`: upstreams are the services' names)."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from magasin.config import Settings
from magasin.gateway.routes import PREFIXES, SERVICES, STREAMS

Target = Literal["local", "compose"]
JS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
"""Where both Debian's libnginx-mod-http-js and the official nginx image keep njs."""
COMPOSE_DIR = "/etc/nginx/magasin"
"""Where compose mounts deploy/gateway/ in the nginx container."""
COMPOSE_PORT = 8000
"""The port every service listens on inside its container."""
CONFIG = "nginx.conf"


@dataclass(frozen=True)
class GatewayConfig:
    """What differs between two gateways: where it listens, the processes behind each
    service, where its files live, and the limits (from Settings)."""

    target: Target
    listen: str
    upstreams: Mapping[str, Sequence[str]]
    files_dir: str
    """Where the rendered files (nginx.conf, magasin.js, the docs pages) are read from."""
    temp_dir: str
    pid: str
    error_log: str
    access_log: str
    rate_per_s: int = 1000
    burst: int = 2000
    max_body: str = "1m"
    timeout_s: int = 30
    stream_timeout_s: int = 3600
    connect_timeout_s: int = 2
    max_fails: int = 1
    fail_timeout_s: int = 5
    workers: str = "1"
    user: str | None = None
    fanout_buffer: str = "16m"
    services: Sequence[str] = field(default_factory=lambda: SERVICES)

    retry_after_s: int = 1
    """The rate is per second, so a refused key has room again within a second."""


def _limits(settings: Settings) -> dict[str, int | str]:
    return {
        "rate_per_s": settings.gateway_rate_per_s, "burst": settings.gateway_burst,
        "max_body": settings.gateway_max_body, "timeout_s": settings.gateway_timeout_s,
        "stream_timeout_s": settings.gateway_stream_timeout_s,
    }


def local(directory: Path, port: int, upstreams: Mapping[str, Sequence[str]],
          settings: Settings, host: str = "127.0.0.1") -> GatewayConfig:
    """A gateway run by this user on `host:port`, its files under `directory` (a service
    without any process behind it answers 502)."""
    directory = directory.resolve()
    # Run as root (CI, containers), nginx would hand its workers to `nobody`, who cannot read
    # files under a private directory: the workers keep the invoking user.
    user = getpass.getuser() if os.geteuid() == 0 else None
    return GatewayConfig(
        target="local", listen=f"{host}:{port}",
        upstreams={s: list(upstreams.get(s, ())) for s in SERVICES},
        files_dir=str(directory), temp_dir=str(directory / "temp"),
        pid=str(directory / "nginx.pid"), error_log="stderr",
        access_log=f"{directory / 'access.log'} magasin", user=user,
        **_limits(settings),  # type: ignore[arg-type]
    )


def compose(settings: Settings) -> GatewayConfig:
    """The gateway of deploy/compose.yaml: the official nginx image, deploy/gateway/
    mounted at COMPOSE_DIR, one upstream name per service (each of its replicas)."""
    return GatewayConfig(
        target="compose", listen="8080",
        upstreams={s: [f"{s}:{COMPOSE_PORT}"] for s in SERVICES},
        files_dir=COMPOSE_DIR, temp_dir="/var/cache/nginx", pid="/var/run/nginx.pid",
        error_log="stderr", access_log="/dev/stdout magasin", workers="auto", user="nginx",
        **_limits(settings),  # type: ignore[arg-type]
    )


def render(config: GatewayConfig) -> dict[str, str]:
    """The gateway's files by name: nginx.conf, magasin.js and the API docs pages."""
    from fastapi.openapi.docs import (
        get_redoc_html,
        get_swagger_ui_html,
        get_swagger_ui_oauth2_redirect_html,
    )
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("magasin.gateway", "templates"), undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    values = {
        **{name: getattr(config, name) for name in config.__dataclass_fields__},
        "js_module": JS_MODULE,
        "prefixes": PREFIXES, "streams": STREAMS,
    }
    title = "magasin"
    return {
        CONFIG: env.get_template("nginx.conf.j2").render(values),
        "magasin.js": env.get_template("magasin.js.j2").render(values),
        # The pages embedded mode serves (FastAPI's own), on the merged document.
        "docs.html": bytes(get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect").body).decode(),
        "oauth2-redirect.html": bytes(get_swagger_ui_oauth2_redirect_html().body).decode(),
        "redoc.html": bytes(get_redoc_html(
            openapi_url="/openapi.json", title=f"{title} - ReDoc").body).decode(),
    }


def write(config: GatewayConfig, directory: Path) -> Path:
    """Render into `directory` (and create the temporary directories of a local gateway);
    returns the path of nginx.conf."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render(config).items():
        (directory / name).write_text(text)
    if config.target == "local":
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (Path(config.temp_dir) / sub).mkdir(parents=True, exist_ok=True)
    return directory / CONFIG
