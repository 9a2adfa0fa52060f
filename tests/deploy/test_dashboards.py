"""Grafana provisioning: the three dashboards, and every query names a metric magasin exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from magasin.observability import metrics
from tests.deploy.conftest import DEPLOY
from tests.deploy.promql import metric_names

DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_OWN = {"up"}
"""Series Prometheus itself adds to every scrape target."""


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def prometheus_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(board):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel.get("datasource") or {}
            if source.get("type") == "prometheus":
                yield panel["title"], target["expr"]


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(magasin_x_bucket{le="+Inf", '
            'route=~"a|b"}[$__rate_interval]))) / on (route) group_left sum(up) > 0.5 '
            'and (vector(0) or magasin_y) == bool 1')
    assert metric_names(expr) == {"magasin_x_bucket", "up", "magasin_y"}


def test_grafana_provisions_the_three_dashboards_and_both_datasources() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {"Event-Driven Architecture", "Sagas", "Distributed Tracing"}
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text()
    )["datasources"]
    assert {s["uid"]: s["type"] for s in sources} == {"prometheus": "prometheus",
                                                        "jaeger": "jaeger"}


@pytest.mark.parametrize("board_file", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_names_only_metrics_magasin_exports(board_file: Path) -> None:
    board = json.loads(board_file.read_text())
    exported = metrics.names() | PROMETHEUS_OWN
    queries = list(prometheus_queries(board))
    assert queries, "a dashboard without a Prometheus query"
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"panel {title!r} reads no metric: {expr}"
        assert names <= exported, f"panel {title!r} reads unknown {names - exported}"


def test_every_alert_rule_reads_only_metrics_magasin_exports() -> None:
    exported = metrics.names() | PROMETHEUS_OWN
    for rules_file in (DEPLOY / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(rules_file.read_text())["groups"]:
            for rule in group["rules"]:
                names = metric_names(rule["expr"])
                assert names and names <= exported, (rule["alert"], names - exported)


def test_the_tracing_dashboard_links_to_jaeger_and_shows_trace_exemplars() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "magasin-tracing.json").read_text())
    assert any("16686" in link.get("url", "") for link in board["links"])
    assert any(target.get("exemplar") for panel in panels(board)
               for target in panel.get("targets", []))
    assert any((panel.get("datasource") or {}).get("type") == "jaeger"
               for panel in panels(board))
