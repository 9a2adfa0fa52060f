"""The nginx binary: found, asked to check a configuration, and run in the foreground with
a prefix of its own (never the system's service)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from magasin.shared.errors import ConfigurationError

INSTALL_HINT = ("nginx and its njs module are needed: `bash scripts/ensure-gateway.sh` "
                "(apt-get install nginx libnginx-mod-http-js)")


def binary() -> str:
    """Path of nginx (Debian keeps it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ConfigurationError(f"nginx not found: {INSTALL_HINT}")
    return found


def command(config: Path) -> list[str]:
    """nginx in the foreground, with the configuration's directory as its prefix."""
    return [binary(), "-p", str(config.parent), "-c", str(config), "-g", "daemon off;"]


def check(config: Path) -> str:
    """`nginx -t` of `config`; returns its report, raises ConfigurationError if invalid."""
    done = subprocess.run(
        [binary(), "-t", "-q", "-p", str(config.parent), "-c", str(config)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise ConfigurationError(f"nginx -t failed for {config}:\n{done.stderr}")
    return done.stderr
