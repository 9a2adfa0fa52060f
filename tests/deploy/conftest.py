"""Fixtures of the deploy/ tests: where deploy/ is, and the Prometheus tools they run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import IN_CI

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
INSTALL_HINT = "run `make test` (scripts/ensure-observability-tools.sh installs it)"


def tool(name: str) -> str:
    """Path of a Prometheus tool; missing, it fails under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {INSTALL_HINT}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the deploy/ checks must run)")
        pytest.skip(message)
    return path
