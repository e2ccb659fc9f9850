"""The generated Prometheus rules: promtool accepts them, and each alert fires on the series it is
for and stays quiet on healthy ones (``promtool test rules``, every alert both ways)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmsguard.cli.main import cli
from kmsguard.monitoring import prometheus
from kmsguard.monitoring.thresholds import Thresholds

from .exported import exported, fed_registry
from .promql import missing

L = 'job="kmsguard", instance="h:1"'
BASE = {"job": "kmsguard", "instance": "h:1"}


@dataclass
class Case:
    """An alert, series that make it fire (with the labels it fires with), and series that must not."""

    alert: str
    eval_time: str
    fires: dict[str, str]
    labels: dict[str, str]
    quiet: list[dict[str, str]] = field(default_factory=list)


def _buckets(metric: str, labels: str, counts: dict[str, str]) -> dict[str, str]:
    return {f'{metric}{{{L}, {labels}, le="{le}"}}': values for le, values in counts.items()}


CASES = [
    Case("KmsguardHighErrorRatio", "15m",
         {f'kmsguard_operations_total{{{L}, operation="encrypt", classification="pii", outcome="ok"}}': "0+60x30",
          f'kmsguard_operations_total{{{L}, operation="encrypt", classification="pii", outcome="error"}}': "0+10x30"},
         {"operation": "encrypt", "classification": "pii"},
         [{f'kmsguard_operations_total{{{L}, operation="encrypt", classification="pii", outcome="ok"}}': "0+60x30",
           f'kmsguard_operations_total{{{L}, operation="encrypt", classification="pii", outcome="error"}}': "0+1x30"}]),
    Case("KmsguardKmsThrottling", "20m",
         {f'kmsguard_kms_calls_total{{{L}, api="GenerateDataKey", region="us-east-1", outcome="ok"}}': "0+100x30",
          f'kmsguard_kms_throttles_total{{{L}, api="GenerateDataKey", region="us-east-1"}}': "0+30x30"},
         {"region": "us-east-1"},
         [{f'kmsguard_kms_calls_total{{{L}, api="GenerateDataKey", region="us-east-1", outcome="ok"}}': "0+100x30",
           f'kmsguard_kms_throttles_total{{{L}, api="GenerateDataKey", region="us-east-1"}}': "0+2x30"}]),
    Case("KmsguardRegionBreakerOpen", "10m",
         {f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="open"}}': "1x20",
          f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="closed"}}': "0x20",
          f'kmsguard_region_breaker_state{{{L}, region="us-east-1", state="open"}}': "0x20",
          f'kmsguard_region_breaker_state{{{L}, region="us-east-1", state="closed"}}': "1x20"},
         {"region": "eu-west-1"},
         [{f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="open"}}': "0x20",
           f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="closed"}}': "1x20"}]),
    Case("KmsguardRegionFailingOver", "15m",
         {f'kmsguard_failovers_total{{{L}, from_region="us-east-1", to_region="eu-west-1"}}': "0+5x30"},
         {"from_region": "us-east-1"},
         [{f'kmsguard_failovers_total{{{L}, from_region="us-east-1", to_region="eu-west-1"}}': "5x30"}]),
    Case("KmsguardAllRegionsFailing", "10m",
         {f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="closed"}}': "0x20",
          f'kmsguard_region_breaker_state{{{L}, region="us-east-1", state="closed"}}': "0x20"},
         {},
         [{f'kmsguard_region_breaker_state{{{L}, region="eu-west-1", state="closed"}}': "0x20",
           f'kmsguard_region_breaker_state{{{L}, region="us-east-1", state="closed"}}': "1x20"},
          {f'kmsguard_kms_calls_total{{{L}, api="Decrypt", region="us-east-1", outcome="ok"}}': "0+10x20",
           f'kmsguard_kms_calls_total{{{L}, api="Decrypt", region="us-east-1", outcome="KEY_UNAVAILABLE"}}':
           "0+1x20"}]),
    # A single region (no breakers): no KMS call succeeds any more.
    Case("KmsguardAllRegionsFailing", "10m",
         {f'kmsguard_kms_calls_total{{{L}, api="Decrypt", region="us-east-1", outcome="ok"}}': "5x20",
          f'kmsguard_kms_calls_total{{{L}, api="Decrypt", region="us-east-1", outcome="KEY_UNAVAILABLE"}}': "0+10x20"},
         {}),
    # A single-region process that started during the outage: no outcome="ok" series at all. Quiet when
    # the failed calls stopped (no calls made), and when some calls succeed.
    Case("KmsguardAllRegionsFailing", "10m",
         {f'kmsguard_kms_calls_total{{{L}, api="GenerateDataKey", region="us-east-1", outcome="KEY_UNAVAILABLE"}}':
          "0+10x20"},
         {},
         [{f'kmsguard_kms_calls_total{{{L}, api="GenerateDataKey", region="us-east-1", outcome="KEY_UNAVAILABLE"}}':
           "10x20"},
          {f'kmsguard_kms_calls_total{{{L}, api="GenerateDataKey", region="us-east-1", outcome="KEY_UNAVAILABLE"}}':
           "0+10x20",
           f'kmsguard_kms_calls_total{{{L}, api="Decrypt", region="us-east-1", outcome="ok"}}': "0+1x20"}]),
    Case("KmsguardAuditDeliveryStalled", "10m",
         {f"kmsguard_audit_delivery_lag_seconds{{{L}}}": "0+60x20"}, {},
         [{f"kmsguard_audit_delivery_lag_seconds{{{L}}}": "0.2x20"}]),
    Case("KmsguardAuditBacklogGrowing", "30m",
         {f"kmsguard_audit_queue_depth{{{L}}}": "10000+1000x40"}, {},
         [{f"kmsguard_audit_queue_depth{{{L}}}": "20000x40"}, {f"kmsguard_audit_queue_depth{{{L}}}": "0+100x40"}]),
    Case("KmsguardAuditRecordsDropped", "10m",
         {f"kmsguard_audit_dropped_records{{{L}}}": "0 0 0 0 0 3 3 3 3 3 3 3"}, {},
         [{f"kmsguard_audit_dropped_records{{{L}}}": "0x20"}, {f"kmsguard_audit_dropped_records{{{L}}}": "7x20"}]),
    Case("KmsguardStrictAuditRefusals", "10m",
         {f'kmsguard_operation_errors_total{{{L}, operation="encrypt", classification="payment", '
          'code="AUDIT_UNAVAILABLE"}': "0+2x20"},
         {"operation": "encrypt", "classification": "payment"},
         [{f'kmsguard_operation_errors_total{{{L}, operation="encrypt", classification="payment", '
           'code="CONTEXT_MISMATCH"}': "0+2x20"}]),
    Case("KmsguardCacheHitRatioLow", "60m",
         {f'kmsguard_cache_events_total{{{L}, event="hit", classification="general"}}': "0+60x80",
          f'kmsguard_cache_events_total{{{L}, event="miss", classification="general"}}': "0+120x80"},
         {"classification": "general"},
         [{f'kmsguard_cache_events_total{{{L}, event="hit", classification="general"}}': "0+600x80",
           f'kmsguard_cache_events_total{{{L}, event="miss", classification="general"}}': "0+60x80"},
          # Too little traffic to judge.
          {f'kmsguard_cache_events_total{{{L}, event="hit", classification="general"}}': "0+6x80",
           f'kmsguard_cache_events_total{{{L}, event="miss", classification="general"}}': "0+12x80"}]),
    # Every lookup misses and no hit series exists yet: the ratio is 0, not absent.
    Case("KmsguardCacheHitRatioLow", "60m",
         {f'kmsguard_cache_events_total{{{L}, event="miss", classification="pii"}}': "0+120x80"},
         {"classification": "pii"},
         [{f'kmsguard_cache_events_total{{{L}, event="miss", classification="pii"}}': "0+12x80"}]),
    Case("KmsguardKmsLatencyHigh", "20m",
         _buckets("kmsguard_kms_latency_seconds_bucket", 'api="Decrypt", region="us-east-1"',
                  {"0.05": "0x30", "0.5": "0x30", "1.0": "0+10x30", "+Inf": "0+10x30"}),
         {"api": "Decrypt", "region": "us-east-1"},
         [_buckets("kmsguard_kms_latency_seconds_bucket", 'api="Decrypt", region="us-east-1"',
                   {"0.05": "0+10x30", "0.5": "0+10x30", "1.0": "0+10x30", "+Inf": "0+10x30"})]),
    Case("KmsguardOperationLatencyHigh", "20m",
         _buckets("kmsguard_operation_duration_seconds_bucket",
                  'operation="decrypt", classification="payment", outcome="ok"',
                  {"0.01": "0x30", "1.0": "0x30", "2.5": "0+10x30", "+Inf": "0+10x30"}),
         {"operation": "decrypt", "classification": "payment"},
         [_buckets("kmsguard_operation_duration_seconds_bucket",
                   'operation="decrypt", classification="payment", outcome="ok"',
                   {"0.01": "0+10x30", "1.0": "0+10x30", "2.5": "0+10x30", "+Inf": "0+10x30"})]),
    Case("KmsguardSelftestFailing", "5m",
         {f'kmsguard_selftest_failed_checks{{{L}, critical="true"}}': "1x10"}, {"critical": "true"},
         [{f'kmsguard_selftest_failed_checks{{{L}, critical="true"}}': "0x10",
           f'kmsguard_selftest_failed_checks{{{L}, critical="false"}}': "2x10"}]),
    Case("KmsguardKeyRotationOff", "30m",
         {f'kmsguard_key_rotation_enabled{{{L}, classification="pii", region="us-east-1"}}': "0x40"},
         {"classification": "pii", "region": "us-east-1"},
         [{f'kmsguard_key_rotation_enabled{{{L}, classification="pii", region="us-east-1"}}': "1x40"}]),
    Case("KmsguardServiceErrors", "15m",
         {f'kmsguard_http_requests_total{{{L}, method="POST", route="/v1/encrypt", status="200"}}': "0+100x30",
          f'kmsguard_http_requests_total{{{L}, method="POST", route="/v1/encrypt", status="503"}}': "0+20x30"},
         {},
         [{f'kmsguard_http_requests_total{{{L}, method="POST", route="/v1/encrypt", status="200"}}': "0+100x30",
           f'kmsguard_http_requests_total{{{L}, method="POST", route="/v1/encrypt", status="503"}}': "0+1x30",
           f'kmsguard_http_requests_total{{{L}, method="POST", route="/v1/encrypt", status="400"}}': "0+50x30"}]),
    Case("KmsguardCloudWatchExportDropping", "20m",
         {f"kmsguard_cloudwatch_dropped_total{{{L}}}": "0+5x30"}, {},
         [{f"kmsguard_cloudwatch_dropped_total{{{L}}}": "0x30"}]),
]


def _severity(alert: str) -> str:
    return next(a.severity for a in prometheus.alerts(Thresholds()) if a.name == alert)


def _unit_tests(cases: list[Case]) -> list[dict[str, object]]:
    tests: list[dict[str, object]] = []
    for case in cases:
        exp = {**BASE, **case.labels, "severity": _severity(case.alert)}
        runs = [(case.fires, [{"exp_labels": exp}])] + [(q, []) for q in case.quiet]
        for series, expected in runs:
            tests.append({
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": expected}],
            })
    return tests


def _rule_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kmsguard-rules.yml"
    path.write_text(text)
    return path


def test_promtool_accepts_the_generated_rules(promtool: str, tmp_path: Path) -> None:
    path = _rule_file(tmp_path, prometheus.render())
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_summary_and_a_runbook_anchor_in_the_docs() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "monitoring.md").read_text()
    anchors = {m.lower() for m in re.findall(r"^#+ (Kmsguard\w+)\s*$", docs, re.M)}
    doc = prometheus.rules(runbook_base="https://docs.example/monitoring/")
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["annotations"]["runbook_url"] == f"https://docs.example/monitoring/#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"docs/monitoring.md has no section for {rule['alert']}"


def test_every_alert_fires_on_its_series_and_not_on_healthy_ones(promtool: str, tmp_path: Path) -> None:
    """``promtool test rules`` over the generated rules, with their annotations left out (their text
    holds the alert's value; ``promtool check rules`` above checks the templates)."""
    doc = prometheus.rules()
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = _rule_file(tmp_path, yaml.safe_dump(doc))
    assert {c.alert for c in CASES} == {a.name for a in prometheus.alerts(Thresholds())}, "an alert has no case"
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                     "tests": _unit_tests(CASES)}))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_harness_sees_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    """Control: a case whose healthy series are the firing ones fails, so the test above can fail."""
    doc = prometheus.rules()
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = _rule_file(tmp_path, yaml.safe_dump(doc))
    wrong = [Case(c.alert, c.eval_time, c.fires, c.labels, [c.fires]) for c in CASES[:1]]
    tests = tmp_path / "tests.yml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                     "tests": _unit_tests(wrong)}))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode != 0


@pytest.mark.parametrize("flag, value, expr", [("--error-ratio", "0.2", "kmsguard:operation_errors:ratio_rate5m > 0.2"),
                                               ("--audit-lag", "300", "kmsguard_audit_delivery_lag_seconds > 300")])
def test_thresholds_come_from_flags(flag: str, value: str, expr: str) -> None:
    result = CliRunner().invoke(cli, ["monitoring", "prometheus-rules", flag, value])
    assert result.exit_code == 0, result.output
    exprs = [r["expr"] for g in yaml.safe_load(result.output)["groups"] for r in g["rules"]]
    assert expr in exprs


def test_rules_refer_only_to_exported_metrics_and_labels() -> None:
    names = exported(fed_registry().exposition().decode())
    for group in prometheus.rules()["groups"]:
        for rule in group["rules"]:
            assert missing(rule["expr"], names) == [], rule.get("alert") or rule.get("record")
