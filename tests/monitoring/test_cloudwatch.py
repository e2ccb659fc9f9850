"""``kmsguard monitoring cloudwatch apply`` against moto's CloudWatch over HTTP (kmsguard.testing's server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result

from kmsguard.cli.main import _register, cli
from kmsguard.metrics import CloudWatchExport
from kmsguard.monitoring import cloudwatch as cw
from kmsguard.testing.moto_server import MotoServer, free_port

CLASSES = ("general", "pii", "payment")


@pytest.fixture
def home(tmp_path: Path, kms_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kmsguard home whose [metrics] publish to moto's CloudWatch, in a namespace of this test's own."""
    home = tmp_path / "home"
    home.mkdir()
    namespace = f"kmsguard-test-{tmp_path.name}"
    (home / "kmsguard.toml").write_text(
        f'[metrics]\nnamespace = "{namespace}"\nregion = "us-east-1"\nendpoint_url = "{kms_server.url}"\n'
        '[audit]\nsink = "none"\n'
    )
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "KMSGUARD_HOME": str(home), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "KMSGUARD_CONFIG", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def client(kms_server: MotoServer, home: Path) -> Any:
    return boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=kms_server.url)


def _run(*args: str) -> Result:
    _register()
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dashboard", "kg-test", *args])
    assert result.exit_code == 0, result.output
    return result


def _lines(result: Result) -> list[str]:
    return result.output.strip().splitlines()


def test_apply_creates_the_dashboard_and_alarms_and_a_second_run_changes_nothing(client: Any) -> None:
    prefix = f"kg-{id(client)}"
    topic = "arn:aws:sns:us-east-1:123456789012:oncall"
    first = _lines(_run("--alarm-prefix", prefix, "--alarm-topic", topic))
    assert first[0] == "dashboard kg-test: created"
    created = [line for line in first if line.startswith("alarm ") and line.endswith(": created")]
    assert len(created) == len(cw.OPERATIONS) * len(CLASSES) * 2
    assert first[-1].startswith(f"{len(created) + 1} changed")

    second = _lines(_run("--alarm-prefix", prefix, "--alarm-topic", topic))
    assert all(line.endswith(": unchanged") for line in second[:-1]), second
    assert second[-1] == "no changes: all up to date"

    body = json.loads(client.get_dashboard(DashboardName="kg-test")["DashboardBody"])
    assert len(body["widgets"]) == 3 * len(cw.OPERATIONS)
    alarms = client.describe_alarms(AlarmNamePrefix=prefix)["MetricAlarms"]
    assert {a["AlarmName"] for a in alarms} == {
        f"{prefix}-{op}-{cls}-{kind}"
        for op in cw.OPERATIONS
        for cls in CLASSES
        for kind in ("error-ratio", "latency-p99")
    }
    assert all(a["AlarmActions"] == [topic] and a["OKActions"] == [topic] for a in alarms)


def test_a_changed_threshold_updates_the_alarms_only(client: Any) -> None:
    prefix = f"kg-{id(client)}-t"
    _run("--alarm-prefix", prefix)
    lines = _lines(_run("--alarm-prefix", prefix, "--error-ratio", "0.2"))
    assert "dashboard kg-test: unchanged" in lines
    updated = {line.split()[1].rstrip(":") for line in lines if line.endswith(": updated")}
    assert updated == {f"{prefix}-{op}-{cls}-error-ratio" for op in cw.OPERATIONS for cls in CLASSES}
    ratio = client.describe_alarms(AlarmNames=[f"{prefix}-encrypt-pii-error-ratio"])["MetricAlarms"][0]
    assert ratio["Threshold"] == 0.2


def test_dry_run_prints_the_requests_and_sends_nothing(client: Any) -> None:
    _register()
    result = CliRunner().invoke(cli, ["monitoring", "cloudwatch", "apply", "--dry-run", "--dashboard", "kg-dry"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["PutDashboard"]["DashboardName"] == "kg-dry"
    assert len(plan["PutMetricAlarm"]) == len(cw.OPERATIONS) * len(CLASSES) * 2
    with pytest.raises(client.exceptions.ResourceNotFound):
        client.get_dashboard(DashboardName="kg-dry")


def _used(target: cw.Target) -> set[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(namespace, metric, dimensions) of every series the dashboard and alarms name."""
    used = set()
    for widget in cw.dashboard_body(target)["widgets"]:
        for m in widget["properties"]["metrics"]:
            parts = [p for p in m if isinstance(p, str)]
            used.add((parts[0], parts[1], tuple(sorted(zip(parts[2::2], parts[3::2], strict=True)))))
    for alarm in cw.alarms(target):
        metrics = [q["MetricStat"]["Metric"] for q in alarm.get("Metrics", []) if "MetricStat" in q] or [alarm]
        for m in metrics:
            dims = tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))
            used.add((m["Namespace"], m["MetricName"], dims))
    return used


def test_every_metric_and_dimension_used_is_one_kmsguard_publishes(client: Any, kms_server: MotoServer) -> None:
    """kmsguard's publisher sends one operation of each kind to moto; ListMetrics then holds every series
    the dashboard and alarms name."""
    namespace = "kmsguard-published-check"
    export = CloudWatchExport(namespace, client_factory=lambda: client, flush_interval=3600)
    try:
        for op in cw.OPERATIONS:
            for cls in CLASSES:
                export.add(op, True, cls, 0.001)
                export.add(op, False, cls, 0.002)
        export.flush()
    finally:
        export.close()
    published = set()
    for page in client.get_paginator("list_metrics").paginate(Namespace=namespace):
        for m in page["Metrics"]:
            dims = tuple(sorted((d["Name"], d["Value"]) for d in m["Dimensions"]))
            published.add((m["Namespace"], m["MetricName"], dims))
    used = _used(cw.Target(namespace, CLASSES, "us-east-1"))
    assert used and used <= published, sorted(used - published)
    # Control: a series kmsguard does not publish is caught.
    assert (namespace, "OperationCount", (("KeyType", "pii"), ("Operation", "sign"))) not in published


def test_cloudwatch_unreachable_or_unconfigured_is_one_error_line(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register()
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
