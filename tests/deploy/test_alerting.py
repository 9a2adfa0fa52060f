"""The alert rules, their promtool unit tests, the Prometheus and Alertmanager configs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, tool

RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def alert_names(rules_file: Path) -> set[str]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


@pytest.mark.parametrize("tests_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_of_the_alert_rules_pass(tests_file: Path) -> None:
    result = run(tool("promtool"), "test", "rules", tests_file.name, cwd=tests_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_where_it_stays_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for tests_file in RULE_TESTS:
        for case in yaml.safe_load(tests_file.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set().union(*(alert_names(f) for f in RULES))
    assert alerts, "no alert rule found"
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_alerts_cover_the_failures_the_issue_lists() -> None:
    alerts = set().union(*(alert_names(f) for f in RULES))
    for expected in (
        "MagasinEventPublishFailureRateHigh", "MagasinEventConsumptionFailureRateHigh",
        "MagasinEventPublishLatencyHigh", "MagasinEventHandlingLatencyHigh",
        "MagasinNoEventsPublished", "MagasinNoEventsConsumed", "MagasinSagasNotFinishing",
        "MagasinSagaCompensationRateHigh", "MagasinTransactionFailureRateHigh",
        "MagasinPaymentFailureRateHigh", "MagasinInventoryUnavailableRateHigh",
        "MagasinDeadLettersPending", "MagasinProjectionLagHigh", "MagasinCircuitBreakerOpen",
        "MagasinServiceDown",
    ):
        assert expected in alerts


def test_every_alert_says_how_severe_it_is_and_what_happened() -> None:
    for rules_file in RULES:
        for group in yaml.safe_load(rules_file.read_text())["groups"]:
            for rule in group["rules"]:
                assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]


def test_the_prometheus_config_and_its_rule_files_are_valid() -> None:
    result = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULES)} rule files found" in result.stdout + result.stderr


def test_the_alertmanager_config_is_valid() -> None:
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = run(tool("amtool"), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=MagasinServiceDown"], "on-call-pager"),
        (["severity=warning", "alertname=MagasinProjectionLagHigh"], "team-chat"),
        (["alertname=SomethingElse"], "team-chat"),
    ],
)
def test_alertmanager_routes_alerts_by_severity(labels: list[str], receiver: str) -> None:
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={config}",
                 f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_the_compose_file_runs() -> None:
    from magasin.bootstrap import SERVICES

    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    magasin_job = next(j for j in config["scrape_configs"] if j["job_name"] == "magasin")
    targets = {t for sc in magasin_job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{service}:8000" for service in SERVICES}
    for service in SERVICES:
        assert compose["services"][service]["command"] == ["magasin", "serve", service]
    for needed in ("postgres", "rabbitmq", "prometheus", "alertmanager", "grafana", "jaeger"):
        assert needed in compose["services"]
