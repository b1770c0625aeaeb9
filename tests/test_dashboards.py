"""deploy/grafana/ and deploy/prometheus/: every query they hold uses metrics a proxy really exports.

Each expression is parsed with a PromQL parser (promql-parser, the Prometheus parser's Rust port), so
function names, label names, keywords, durations and strings are never taken for metric names. Every
selector's metric must be in the scrape of a proxy that has served nothing yet (which is why every
family is scraped from the start, with zeros), and every label value a selector names exactly must be
one of that metric's series. The rules are also checked by Prometheus' own `promtool check rules`.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from tests.conftest import require_tool
from tests.servers import ROOT, ServerProcess, start_proxy

DASHBOARD = ROOT / "deploy" / "grafana" / "workflow-bff.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# Series Prometheus makes itself for every target, not the target's /metrics.
PROMETHEUS_OWN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Labels Prometheus adds to every series of a target.
TARGET_LABELS = frozenset({"job", "instance"})
# Grafana's interval variables, which a PromQL parser does not know; any duration stands for them.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)")
LITERAL_ALTERNATIVES = re.compile(r"[\w:-]+(\|[\w:-]+)*")

Series = dict[str, list[dict[str, str]]]  # sample name -> the label sets it is scraped with


@pytest.fixture(scope="module")
def fresh(emulator: ServerProcess) -> Iterator[ServerProcess]:
    """A proxy that has served no request yet."""
    server = start_proxy(emulator.url)
    yield server
    server.stop()


def scrape(url: str) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in _panels(dashboard["panels"]) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["query"]["query"])
            assert match is not None, variable  # Grafana's label_values(selector, label): the selector is PromQL
            queries.append(match.group(1))
    return queries


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def selectors(expr: str) -> Iterator[promql_parser.VectorSelector]:
    """Every series selector in an expression, wherever it is nested."""
    yield from _selectors(promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr)))


def _selectors(node: object) -> Iterator[promql_parser.VectorSelector]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _selectors(arg)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _selectors(node.expr)
        if node.param is not None:
            yield from _selectors(node.param)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        yield from _selectors(node.expr)


def problems(expr: str, series: Series) -> list[str]:
    """What in `expr` the scrape does not have: a metric, or a label value it names exactly."""
    found: list[str] = []
    for selector in selectors(expr):
        matchers = list(selector.matchers.matchers)
        name = selector.name or next((m.value for m in matchers if m.name == "__name__"), None)
        if name is None:
            found.append(f"{selector}: names no metric")
            continue
        if name in PROMETHEUS_OWN:
            continue
        if name not in series:
            found.append(f"{name}: not in /metrics")
            continue
        for matcher in matchers:
            if matcher.name in TARGET_LABELS | {"__name__"} or "$" in matcher.value:
                continue
            scraped = {labels.get(matcher.name) for labels in series[name]}
            if matcher.op == promql_parser.MatchOp.Equal:
                wanted = [matcher.value]
            elif matcher.op == promql_parser.MatchOp.Re and LITERAL_ALTERNATIVES.fullmatch(matcher.value):
                wanted = matcher.value.split("|")
            else:  # a pattern (`5..`) or a negation may rightly match nothing yet
                continue
            found += [f'{name}{{{matcher.name}="{value}"}}: no such series' for value in wanted if value not in scraped]
    return found


def test_every_dashboard_query_uses_only_metrics_a_fresh_proxy_exports(fresh: ServerProcess) -> None:
    queries = dashboard_queries()
    series = scrape(fresh.url)
    # `bff_requests_total` has a series once a request was answered: the scrape above is one.
    series.update(scrape(fresh.url))

    assert len(queries) > 20
    assert {problem for expr in queries for problem in problems(expr, series)} == set()


def test_every_alert_rule_uses_only_metrics_a_fresh_proxy_exports(fresh: ServerProcess) -> None:
    queries = alert_queries()
    series = scrape(fresh.url)
    series.update(scrape(fresh.url))

    assert len(queries) >= 10
    assert {problem for expr in queries for problem in problems(expr, series)} == set()


def test_the_check_finds_a_metric_or_a_label_value_that_does_not_exist() -> None:
    series: Series = {"bff_upstream_errors_total": [{"kind": "5xx"}], "bff_mints_total": [{"outcome": "ok"}]}
    expr = (
        'sum by (kind) (rate(bff_upstream_errors_total{kind=~"5xx|cut", job="$job"}[$__rate_interval]))'
        ' / on() group_left sum(rate(bff_mints_totl[5m])) > bool 0 and absent(up{job="bff"})'
        ' or histogram_quantile(0.9, rate(bff_mints_total{outcome="ok", status=~"5.."}[1h] offset 1d))'
    )

    assert problems(expr, series) == [
        'bff_upstream_errors_total{kind="cut"}: no such series',
        "bff_mints_totl: not in /metrics",
    ]


def test_the_dashboard_asks_for_its_data_source_and_every_panel_uses_it() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    panels = [panel for panel in _panels(dashboard["panels"]) if panel["type"] != "row"]

    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in panels)
    assert all(target["datasource"]["uid"] == "${datasource}" for panel in panels for target in panel["targets"])
    assert len({panel["id"] for panel in _panels(dashboard["panels"])}) == len(list(_panels(dashboard["panels"])))
    # Every family the proxy exports is on the dashboard.
    shown = {selector.name for expr in dashboard_queries() for selector in selectors(expr)}
    exported = {family.name for family in Metrics().registry.collect()}
    assert {name for name in exported if not any(s.startswith(name) for s in shown)} == set()


def test_every_alert_says_what_to_do() -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]

    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
