"""``kmsguard monitoring cloudwatch apply`` against moto's CloudWatch over HTTP (kmsguard.testing's server)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from kmsguard.cli.main import cli
from kmsguard.metrics import CloudWatchExport
from kmsguard.monitoring import cloudwatch as cw
from kmsguard.monitoring import prometheus
from kmsguard.monitoring.thresholds import Thresholds
from kmsguard.testing.moto_server import MotoServer, free_port

from .exported import fed_registry

CLASSES = ("general", "pii", "payment")
REGIONS = ("us-east-1", "eu-west-1")
APIS = ("GenerateDataKey", "Encrypt", "Decrypt", "ReEncrypt")
DOCS = Path(__file__).parents[2] / "docs" / "monitoring.md"


@pytest.fixture
def home(tmp_path: Path, kms_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kmsguard home (AWS backend, two regions) whose [metrics] publish to moto's CloudWatch, in a namespace
    of this test's own."""
    home = tmp_path / "home"
    home.mkdir()
    namespace = f"kmsguard-test-{tmp_path.name}"
    (home / "kmsguard.toml").write_text(
        f'backend = "aws"\n[aws]\nregions = {list(REGIONS)!r}\n'.replace("'", '"')
        + f'[metrics]\nnamespace = "{namespace}"\nregion = "us-east-1"\nendpoint_url = "{kms_server.url}"\n'
        '[audit]\nsink = "none"\n'
    )
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "KMSGUARD_HOME": str(home), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "KMSGUARD_CONFIG", "AWS_ENDPOINT_URL", "KMSGUARD_BACKEND", "KMSGUARD_REGIONS"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def client(kms_server: MotoServer, home: Path) -> Any:
    return boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=kms_server.url)


def _run(*args: str) -> Result:
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dashboard", "kg-test", *args])
    assert result.exit_code == 0, result.output
    return result


def _lines(result: Result) -> list[str]:
    return result.output.strip().splitlines()


def _expected_alarms(prefix: str) -> set[str]:
    """Every alarm apply makes for CLASSES and REGIONS, written out (not computed by the module under test)."""
    names = {f"{prefix}-{op}-{c}-{kind}" for op in cw.OPERATIONS for c in CLASSES for kind in ("error-ratio",
                                                                                                "latency-p99")}
    names |= {f"{prefix}-{kind}-{r}" for r in REGIONS for kind in ("kms-throttling", "breaker-open", "failing-over")}
    names |= {f"{prefix}-kms-{api}-{r}-latency-p99" for api in APIS for r in REGIONS}
    names |= {f"{prefix}-{op}-strict-audit-refusals" for op in cw.OPERATIONS}
    names |= {f"{prefix}-cache-hit-ratio-{c}" for c in CLASSES}
    names |= {f"{prefix}-{n}" for n in ("all-regions-failing", "audit-delivery-stalled", "audit-backlog-growing",
                                        "audit-records-dropped", "selftest-failing", "key-rotation-off",
                                        "service-errors", "export-dropping")}
    return names


def test_apply_creates_the_dashboard_and_alarms_and_a_second_run_changes_nothing(client: Any) -> None:
    prefix = f"kg-{id(client)}"
    topic = "arn:aws:sns:us-east-1:123456789012:oncall"
    first = _lines(_run("--alarm-prefix", prefix, "--alarm-topic", topic))
    assert first[0] == "dashboard kg-test: created"
    created = {line.split()[1].rstrip(":") for line in first if line.startswith("alarm ") and line.endswith("created")}
    assert created == _expected_alarms(prefix)
    assert first[-1].startswith(f"{len(created) + 1} changed")

    second = _lines(_run("--alarm-prefix", prefix, "--alarm-topic", topic))
    assert all(line.endswith(": unchanged") for line in second[:-1]), second
    assert len(second) == len(first)
    assert second[-1] == "no changes: all up to date"

    body = json.loads(client.get_dashboard(DashboardName="kg-test")["DashboardBody"])
    titles = {w["properties"]["title"] for w in body["widgets"]}
    assert {"KMS throttles per minute by region", "Circuit breakers open", "Data-key cache hit ratio",
            "Audit backlog (records)"} <= titles
    alarms = [a for page in client.get_paginator("describe_alarms").paginate(AlarmNamePrefix=prefix)
              for a in page["MetricAlarms"]]
    assert {a["AlarmName"] for a in alarms} == _expected_alarms(prefix)
    assert all(a["AlarmActions"] == [topic] and a["OKActions"] == [topic] for a in alarms)


def test_every_prometheus_alert_has_an_alarm_that_points_at_its_runbook(client: Any) -> None:
    prefix = f"kg-{id(client)}-r"
    _run("--alarm-prefix", prefix)
    alarms = [a for page in client.get_paginator("describe_alarms").paginate(AlarmNamePrefix=prefix)
              for a in page["MetricAlarms"]]
    alerts = {a.name for a in prometheus.alerts(Thresholds())}
    assert {a["AlarmDescription"].split(":")[0] for a in alarms} == alerts
    headings = set(re.findall(r"^### (\w+)$", DOCS.read_text(), re.MULTILINE))
    for alarm in alarms:
        alert = alarm["AlarmDescription"].split(":")[0]
        assert alert in headings
        assert alarm["AlarmDescription"].endswith(f"(runbook: docs/monitoring.md#{alert.lower()})")


def test_runbook_base_makes_the_alarms_link_to_the_hosted_docs(client: Any) -> None:
    base = "https://docs.example.internal/kmsguard/monitoring/"
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dry-run", "--runbook-base", base])
    assert result.exit_code == 0, result.output
    descriptions = [a["AlarmDescription"] for a in json.loads(result.output)["PutMetricAlarm"]]
    assert descriptions and all(d.endswith(f"(runbook: {base}#{d.split(':')[0].lower()})") for d in descriptions)


def test_a_changed_threshold_updates_the_alarms_only(client: Any) -> None:
    prefix = f"kg-{id(client)}-t"
    _run("--alarm-prefix", prefix)
    lines = _lines(_run("--alarm-prefix", prefix, "--error-ratio", "0.2", "--throttle-ratio", "0.3"))
    assert "dashboard kg-test: unchanged" in lines
    updated = {line.split()[1].rstrip(":") for line in lines if line.endswith(": updated")}
    assert updated == {f"{prefix}-{op}-{cls}-error-ratio" for op in cw.OPERATIONS for cls in CLASSES} | {
        f"{prefix}-kms-throttling-{r}" for r in REGIONS
    }
    ratio = client.describe_alarms(AlarmNames=[f"{prefix}-encrypt-pii-error-ratio"])["MetricAlarms"][0]
    assert ratio["Threshold"] == 0.2
    throttling = client.describe_alarms(AlarmNames=[f"{prefix}-kms-throttling-eu-west-1"])["MetricAlarms"][0]
    assert throttling["Threshold"] == 0.3


def test_dry_run_prints_the_requests_and_sends_nothing(client: Any, home: Path) -> None:
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dry-run", "--dashboard", "kg-dry"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["PutDashboard"]["DashboardName"] == "kg-dry"
    assert {a["AlarmName"] for a in plan["PutMetricAlarm"]} == _expected_alarms("kmsguard")
    widgets = {w["properties"]["title"]: w["properties"] for w in plan["PutDashboard"]["DashboardBody"]["widgets"]}
    generated = widgets["Data keys generated per minute (GenerateDataKey)"]["metrics"]
    named = [m[1:6] for m in generated if isinstance(m[0], str)]
    assert named == [[metric, "Api", "GenerateDataKey", "Region", r] for r in REGIONS
                     for metric in ("KmsCalls", "KmsErrors")]
    assert [m[0]["label"] for m in generated if isinstance(m[0], dict)] == list(REGIONS)
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.get_dashboard(DashboardName="kg-dry")

    # The local backend calls no KMS: no KMS or region alarms, no such rows.
    text = (home / "kmsguard.toml").read_text()
    (home / "kmsguard.toml").write_text(text.replace('backend = "aws"\n', ""))
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    local = {a["AlarmName"] for a in plan["PutMetricAlarm"]}
    assert local == {n for n in _expected_alarms("kmsguard") if not any(r in n for r in REGIONS)} - {
        "kmsguard-all-regions-failing"
    }
    titles = [w["properties"]["title"] for w in plan["PutDashboard"]["DashboardBody"]["widgets"]]
    assert not any(t.startswith("KMS") or "GenerateDataKey" in t for t in titles)
    assert "Cache misses and hits per minute" in titles


Series = tuple[str, str, tuple[tuple[str, str], ...]]


def _used(target: cw.Target) -> set[Series]:
    """(namespace, metric, dimensions) of every series the dashboard and alarms name."""
    used = set()
    for widget in cw.dashboard_body(target)["widgets"]:
        for m in widget["properties"]["metrics"]:
            parts = [p for p in m if isinstance(p, str)]
            if parts:  # not an expression
                used.add((parts[0], parts[1], tuple(sorted(zip(parts[2::2], parts[3::2], strict=True)))))
    for alarm in cw.alarms(target):
        metrics = [q["MetricStat"]["Metric"] for q in alarm.get("Metrics", []) if "MetricStat" in q] or [alarm]
        for m in metrics:
            dims = tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))
            used.add((m["Namespace"], m["MetricName"], dims))
    return used


def listed(client: Any, namespace: str) -> set[Series]:
    """Every series of ``namespace`` that ListMetrics answers."""
    published = set()
    for page in client.get_paginator("list_metrics").paginate(Namespace=namespace):
        for m in page["Metrics"]:
            dims = tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))
            published.add((m["Namespace"], m["MetricName"], dims))
    return published


def shapes(series: set[Series]) -> set[tuple[str, tuple[str, ...]]]:
    """Metric names with their dimension names (values left out)."""
    return {(metric, tuple(name for name, _ in dims)) for _, metric, dims in series}


def test_every_metric_and_dimension_used_is_one_kmsguard_publishes(client: Any, kms_server: MotoServer) -> None:
    """kmsguard's publisher sends one operation of each kind and one of every other event to moto; ListMetrics
    then holds every series the dashboard and alarms name (for the operational metrics: every metric with its
    dimensions; which values exist depends on the traffic, see test_cloudwatch_publish)."""
    namespace = f"kmsguard-published-check-{id(client)}"
    export = CloudWatchExport(namespace, client_factory=lambda: client, flush_interval=3600)
    registry = fed_registry(export)
    try:
        for op in cw.OPERATIONS:
            for cls in CLASSES:
                export.add(op, True, cls, 0.001)
                export.add(op, False, cls, 0.002)
    finally:
        registry.close()
    published = listed(client, namespace)
    used = _used(cw.Target(namespace, CLASSES, "us-east-1", regions=REGIONS))
    operations = {s for s in used if s[1] in (cw.COUNT, cw.DURATION)}
    assert operations and operations <= published, sorted(operations - published)
    assert shapes(used) <= shapes(published), sorted(shapes(used) - shapes(published))
    # Control: a series kmsguard does not publish is caught.
    assert (namespace, "OperationCount", (("KeyType", "pii"), ("Operation", "sign"))) not in published


def test_cloudwatch_unreachable_or_unconfigured_is_one_error_line(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    (home / "kmsguard.toml").write_text(f'[metrics]\nregion = "us-east-1"\nendpoint_url = "{closed}"\n')
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: CLOUDWATCH_ERROR: CloudWatch unreachable (EndpointConnectionError)"
    ]

    (home / "kmsguard.toml").write_text("[metrics]\n")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "absent"))
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: CONFIGURATION_ERROR: metrics.region: no region for CloudWatch (set it, or AWS_REGION)"
    ]
