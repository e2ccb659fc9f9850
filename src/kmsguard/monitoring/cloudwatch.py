"""``kmsguard monitoring cloudwatch apply``: a CloudWatch dashboard and alarms over what kmsguard publishes.

kmsguard publishes (kmsguard.metrics, ``[metrics] emf`` or ``cloudwatch = true``) two
metrics in its namespace, ``OperationCount`` and ``OperationDuration``, with the
dimensions ``Operation``, ``Success`` and ``KeyType`` (the classification). The
dashboard and the alarms name exactly those, one series per operation and configured
classification, since CloudWatch alarms cannot aggregate over a dimension.

Alarms, per operation and classification, equivalent to the Prometheus alerts that this
data can express (the rest need the Prometheus metrics; docs/monitoring.md):

* ``<prefix>-<op>-<class>-error-ratio``: failed over all operations above
  ``Thresholds.error_ratio`` for 5 one-minute periods (KmsguardHighErrorRatio);
* ``<prefix>-<op>-<class>-latency-p99``: the p99 of successful operations above
  ``Thresholds.operation_latency_p99`` for 5 periods.

``apply`` is idempotent: the dashboard and each alarm are compared with what CloudWatch
holds and written only when they differ, so a second run changes nothing and says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError

from kmsguard.errors import AccessDenied, ConfigurationError, CredentialsError, KmsGuardError
from kmsguard.monitoring.thresholds import Thresholds

#: The operations Guard reports (kmsguard.guard): each gets its widgets and alarms.
OPERATIONS = ("encrypt", "decrypt", "rewrap")
#: The metrics and dimensions kmsguard.metrics publishes (see its ``dimensions``).
COUNT, DURATION = "OperationCount", "OperationDuration"
DIMENSIONS = ("Operation", "Success", "KeyType")
PERIOD = 60
EVALUATION_PERIODS = 5


@dataclass(frozen=True)
class Target:
    """What ``apply`` writes: names, the namespace published to, the classifications, where alarms notify."""

    namespace: str
    classifications: Sequence[str]
    region: str
    dashboard: str = "kmsguard"
    alarm_prefix: str = "kmsguard"
    alarm_topic: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)


def _metric(namespace: str, name: str, operation: str, success: bool, cls: str) -> list[str]:
    return [namespace, name, "Operation", operation, "Success", "true" if success else "false", "KeyType", cls]


def dashboard_body(t: Target) -> dict[str, Any]:
    """The PutDashboard body: per operation, a row of traffic, errors and latency widgets."""
    widgets: list[dict[str, Any]] = []
    y = 0
    for op in OPERATIONS:
        traffic = [_metric(t.namespace, COUNT, op, True, c) for c in t.classifications]
        errors = [_metric(t.namespace, COUNT, op, False, c) for c in t.classifications]
        latency = [
            [*_metric(t.namespace, DURATION, op, True, c), {"stat": stat, "label": f"{c} {stat}"}]
            for c in t.classifications
            for stat in ("p50", "p99")
        ]
        for x, (title, metrics, stat) in enumerate(
            [
                (f"{op}: operations per minute", traffic, "Sum"),
                (f"{op}: failed operations per minute", errors, "Sum"),
                (f"{op}: latency (ms)", latency, "p99"),
            ]
        ):
            widgets.append(
                {
                    "type": "metric",
                    "x": x * 8,
                    "y": y,
                    "width": 8,
                    "height": 6,
                    "properties": {
                        "title": title,
                        "region": t.region,
                        "view": "timeSeries",
                        "stat": stat,
                        "period": PERIOD,
                        "metrics": metrics,
                    },
                }
            )
        y += 6
    return {"widgets": widgets}


def _stat(namespace: str, name: str, op: str, success: bool, cls: str, stat: str, id_: str) -> dict[str, Any]:
    dims = {"Operation": op, "Success": "true" if success else "false", "KeyType": cls}
    return {
        "Id": id_,
        "ReturnData": False,
        "MetricStat": {
            "Metric": {
                "Namespace": namespace,
                "MetricName": name,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()],
            },
            "Period": PERIOD,
            "Stat": stat,
        },
    }


def alarms(t: Target) -> list[dict[str, Any]]:
    """The PutMetricAlarm requests, in a stable order."""
    actions: dict[str, Any] = {}
    if t.alarm_topic:
        actions = {"AlarmActions": [t.alarm_topic], "OKActions": [t.alarm_topic]}
    out: list[dict[str, Any]] = []
    for op in OPERATIONS:
        for cls in t.classifications:
            failed = _stat(t.namespace, COUNT, op, False, cls, "Sum", "failed")
            ok = _stat(t.namespace, COUNT, op, True, cls, "Sum", "ok")
            out.append(
                {
                    "AlarmName": f"{t.alarm_prefix}-{op}-{cls}-error-ratio",
                    "AlarmDescription": f"KmsguardHighErrorRatio: {op} of {cls} data failing "
                    "(runbook: docs/monitoring.md#kmsguardhigherrorratio)",
                    "ActionsEnabled": True,
                    **actions,
                    "Metrics": [
                        failed,
                        ok,
                        {
                            "Id": "ratio",
                            "Label": "failed / all",
                            "ReturnData": True,
                            "Expression": "FILL(failed, 0) / (FILL(failed, 0) + FILL(ok, 0))",
                        },
                    ],
                    "EvaluationPeriods": EVALUATION_PERIODS,
                    "DatapointsToAlarm": EVALUATION_PERIODS,
                    "Threshold": t.thresholds.error_ratio,
                    "ComparisonOperator": "GreaterThanThreshold",
                    "TreatMissingData": "notBreaching",
                }
            )
            out.append(
                {
                    "AlarmName": f"{t.alarm_prefix}-{op}-{cls}-latency-p99",
                    "AlarmDescription": f"KmsguardOperationLatencyHigh: {op} of {cls} data slow "
                    "(runbook: docs/monitoring.md#kmsguardoperationlatencyhigh)",
                    "ActionsEnabled": True,
                    **actions,
                    "Namespace": t.namespace,
                    "MetricName": DURATION,
                    "Dimensions": [
                        {"Name": "Operation", "Value": op},
                        {"Name": "Success", "Value": "true"},
                        {"Name": "KeyType", "Value": cls},
                    ],
                    "ExtendedStatistic": "p99",
                    "Period": PERIOD,
                    "Unit": "Milliseconds",
                    "EvaluationPeriods": EVALUATION_PERIODS,
                    "DatapointsToAlarm": EVALUATION_PERIODS,
                    "Threshold": t.thresholds.operation_latency_p99 * 1000.0,
                    "ComparisonOperator": "GreaterThanThreshold",
                    "TreatMissingData": "notBreaching",
                }
            )
    return out


# ---------------------------------------------------------------------- apply


class CloudWatchError(KmsGuardError):
    """CloudWatch did not answer, or refused a request for a reason other than access."""

    code = "CLOUDWATCH_ERROR"
    http_status = 502
    retryable = True


@contextmanager
def aws_errors() -> Iterator[None]:
    """botocore's exceptions as kmsguard errors (one line from the CLI): the AWS error code, never a payload."""
    try:
        yield
    except NoRegionError:
        raise ConfigurationError("metrics.region: no region for CloudWatch (set it, or AWS_REGION)") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise CredentialsError("no AWS credentials found for CloudWatch") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "unknown")
        operation = exc.operation_name
        if "AccessDenied" in code or code in ("UnauthorizedOperation", "AuthFailure"):
            raise AccessDenied(f"CloudWatch refused {operation}: {code}") from None
        raise CloudWatchError(f"CloudWatch {operation} failed: {code}") from None
    except BotoCoreError as exc:
        raise CloudWatchError(f"CloudWatch unreachable ({type(exc).__name__})") from None


def _comparable(alarm: dict[str, Any]) -> dict[str, Any]:
    """The fields of an alarm that ``alarms`` sets, as DescribeAlarms answers them, normalised for comparison."""
    keys = {
        "AlarmName", "AlarmDescription", "ActionsEnabled", "AlarmActions", "OKActions", "Namespace", "MetricName",
        "Dimensions", "ExtendedStatistic", "Period", "Unit", "EvaluationPeriods", "DatapointsToAlarm", "Threshold",
        "ComparisonOperator", "TreatMissingData", "Metrics",
    }
    out = {k: v for k, v in alarm.items() if k in keys and v not in (None, [], "")}
    out.setdefault("ActionsEnabled", True)
    if "Threshold" in out:
        out["Threshold"] = float(out["Threshold"])
    if "Dimensions" in out:
        out["Dimensions"] = sorted((d["Name"], d["Value"]) for d in out["Dimensions"])
    if "Metrics" in out:
        out["Metrics"] = [_comparable_query(q) for q in out["Metrics"]]
    return out


def _comparable_query(q: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in q.items() if k in ("Id", "Expression", "Label", "ReturnData", "MetricStat") and v != ""}
    out.setdefault("ReturnData", True)
    stat = out.get("MetricStat")
    if stat is not None:
        metric = stat["Metric"]
        out["MetricStat"] = {
            "Metric": (metric["Namespace"], metric["MetricName"], sorted((d["Name"], d["Value"]) for d in metric.get(
                "Dimensions", []))),
            "Period": stat["Period"],
            "Stat": stat["Stat"],
        }
    return out


@dataclass(frozen=True)
class Change:
    kind: str  # "dashboard" or "alarm"
    name: str
    action: str  # "created", "updated" or "unchanged"


def apply(client: Any, t: Target) -> list[Change]:
    """Create or update the dashboard and every alarm; what is already as wanted is left alone."""
    changes = [_apply_dashboard(client, t)]
    wanted = alarms(t)
    existing = {a["AlarmName"]: a for a in _describe(client, [a["AlarmName"] for a in wanted])}
    for alarm in wanted:
        name = alarm["AlarmName"]
        have = existing.get(name)
        if have is not None and _comparable(have) == _comparable(alarm):
            changes.append(Change("alarm", name, "unchanged"))
            continue
        client.put_metric_alarm(**alarm)
        changes.append(Change("alarm", name, "created" if have is None else "updated"))
    return changes


def _apply_dashboard(client: Any, t: Target) -> Change:
    body = dashboard_body(t)
    try:
        current = json.loads(client.get_dashboard(DashboardName=t.dashboard)["DashboardBody"])
    except client.exceptions.ResourceNotFound:
        current = None
    if current == body:
        return Change("dashboard", t.dashboard, "unchanged")
    client.put_dashboard(DashboardName=t.dashboard, DashboardBody=json.dumps(body, separators=(",", ":")))
    return Change("dashboard", t.dashboard, "created" if current is None else "updated")


def _describe(client: Any, names: Iterable[str]) -> list[dict[str, Any]]:
    names = list(names)
    found: list[dict[str, Any]] = []
    for start in range(0, len(names), 100):  # DescribeAlarms takes at most 100 names
        pages = client.get_paginator("describe_alarms").paginate(
            AlarmNames=names[start : start + 100], AlarmTypes=["MetricAlarm"]
        )
        for page in pages:
            found.extend(page.get("MetricAlarms", []))
    return found


def plan(t: Target) -> dict[str, Any]:
    """What ``--dry-run`` prints: the requests ``apply`` would send when nothing exists yet."""
    return {
        "PutDashboard": {"DashboardName": t.dashboard, "DashboardBody": dashboard_body(t)},
        "PutMetricAlarm": alarms(t),
    }
