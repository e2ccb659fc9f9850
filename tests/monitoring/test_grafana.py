"""The generated Grafana dashboard: valid JSON model, a query in every panel, only exported metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner

from kmsguard.cli.main import cli
from kmsguard.monitoring import grafana

from .exported import exported, fed_registry
from .promql import grafana_to_promql, missing, references


def _dashboard() -> dict:
    result = CliRunner().invoke(cli, ["monitoring", "grafana-dashboard", "--title", "Payments kmsguard"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_dashboard_has_the_variables_and_rows_on_call_expects() -> None:
    d = _dashboard()
    assert d["title"] == "Payments kmsguard" and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "classification"):
        assert variables[name]["type"] == "query" and variables[name]["multi"]
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Errors", "Latency", "KMS", "Cache", "Audit", "Service"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_query_over_exported_metrics_and_labels() -> None:
    names = exported(fed_registry().exposition().decode())
    panels = [p for p in _dashboard()["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = grafana_to_promql(target["expr"])
            assert references(expr).selectors, f"{panel['title']}: no kmsguard metric in {expr}"
            assert missing(expr, names) == [], panel["title"]
            assert "$datasource" not in expr and target["datasource"]["uid"] == "${datasource}"


def test_the_check_sees_a_metric_that_is_not_exported() -> None:
    """Control: a panel over a misspelt metric or label is caught."""
    names = exported(fed_registry().exposition().decode())
    assert missing("rate(kmsguard_operation_total[5m])", names) == ["metric kmsguard_operation_total"]
    assert missing('sum by (code) (kmsguard_operations_total{region="x"})', names) == [
        "label region of kmsguard_operations_total",
        "label code (by) of kmsguard_operations_total",
    ]


def test_panel_queries_are_labelled_by_the_variables() -> None:
    """Job and instance everywhere; the classification wherever every metric of the query has that label."""
    names = exported(fed_registry().exposition().decode())
    filtered = 0
    for row, panels in grafana.ROWS:
        for panel in panels:
            for expr, _ in panel.targets:
                assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, (row, panel.title)
                metrics = references(grafana_to_promql(expr)).selectors
                if all("classification" in names[m] for m in metrics):
                    selectors = len(re.findall(r"\bkmsguard_\w+\{", expr))
                    assert expr.count('classification=~"$classification"') == selectors, (row, panel.title)
                    filtered += 1
    assert filtered >= 10


def _expr(title: str) -> str:
    (panel,) = [p for _, panels in grafana.ROWS for p in panels if p.title == title]
    ((expr, _),) = panel.targets
    return grafana_to_promql(expr)


def test_data_keys_generated_are_generate_data_key_calls_not_cache_misses(promtool: str, tmp_path: Path) -> None:
    """The two panels evaluated by promtool over the same series: a decrypt miss (a KMS Decrypt) is a cache
    miss and no new data key; a failed GenerateDataKey made none either."""
    kms = 'kmsguard_kms_calls_total{job="kmsguard", instance="h:1", region="us-east-1", '
    series = {
        kms + 'api="GenerateDataKey", outcome="ok"}': "0+120x10",
        kms + 'api="GenerateDataKey", outcome="KEY_UNAVAILABLE"}': "0+60x10",
        kms + 'api="Decrypt", outcome="ok"}': "0+240x10",
        'kmsguard_cache_events_total{job="kmsguard", instance="h:1", event="miss", classification="pii"}': "0+360x10",
    }
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [], "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "promql_expr_test": [
            {"expr": _expr("Data keys generated/s"), "eval_time": "10m",
             "exp_samples": [{"labels": '{region="us-east-1"}', "value": 2}]},
            {"expr": _expr("Cache misses/s"), "eval_time": "10m",
             "exp_samples": [{"labels": '{classification="pii"}', "value": 6}]},
        ],
    }]}))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
