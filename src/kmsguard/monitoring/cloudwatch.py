"""``kmsguard monitoring cloudwatch apply``: a CloudWatch dashboard and alarms over what kmsguard publishes.

kmsguard publishes (kmsguard.metrics, ``[metrics] emf`` or ``cloudwatch = true``) in its
namespace ``OperationCount`` and ``OperationDuration`` by ``Operation``, ``Success`` and
``KeyType`` (the classification), and at each flush the operational metrics of
``kmsguard.metrics.MIRRORS`` (KMS calls, failovers, breakers, cache, audit, self-test,
key rotation, the service's answers). The dashboard and the alarms name exactly those,
one series per configured operation, classification, region and KMS API, or a rollup
published for the purpose, since a CloudWatch alarm cannot aggregate over a dimension.

One alarm (or one per operation, classification, region or API) for each Prometheus
alert of kmsguard.monitoring.prometheus, with its thresholds; each description names the
alert and its runbook. All count what every instance publishing to the namespace sends
(the Prometheus alerts are per instance). Where CloudWatch differs:

* KmsguardKmsLatencyHigh: ``KmsLatency`` is published from the latency histogram's
  buckets, each call at its bucket's upper bound, so the p99 is exact when the threshold
  is a bucket bound (the default 0.5 s is) and errs high otherwise;
* KmsguardAuditBacklogGrowing: ``deriv`` over 10 minutes becomes ``DIFF`` between two
  5-minute maxima of the backlog;
* KmsguardRegionFailingOver: failovers in each of two 5-minute periods (Prometheus: a
  5-minute rate above 0 for 5 minutes);
* KmsguardCloudWatchExportDropping: only drops that a later flush can report (a full
  buffer, a PutMetricData that failed and then recovered); an export that cannot reach
  CloudWatch at all cannot say so there: that alert stays Prometheus's.

The KMS and region alarms exist only with ``backend = "aws"`` (their regions come from
``[aws] regions``). Missing data (no traffic, no breaker) never alarms.

``apply`` is idempotent: the dashboard and each alarm are compared with what CloudWatch
holds and written only when they differ, so a second run changes nothing and says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError

from kmsguard.errors import AccessDenied, ConfigurationError, CredentialsError, KmsGuardError
from kmsguard.monitoring.prometheus import DEFAULT_RUNBOOK_BASE, runbook_url
from kmsguard.monitoring.thresholds import Thresholds

#: The operations Guard reports (kmsguard.guard): each gets its widgets and alarms.
OPERATIONS = ("encrypt", "decrypt", "rewrap")
#: The KMS APIs of the data path (kmsguard.keyrings.aws_kms): a latency alarm each, per region.
KMS_APIS = ("GenerateDataKey", "Encrypt", "Decrypt", "ReEncrypt")
#: The metrics and dimensions kmsguard.metrics publishes (see its ``dimensions`` and ``MIRRORS``).
COUNT, DURATION = "OperationCount", "OperationDuration"
DIMENSIONS = ("Operation", "Success", "KeyType")
PERIOD = 60
EVALUATION_PERIODS = 5


@dataclass(frozen=True)
class Target:
    """What ``apply`` writes: names, the namespace published to, the classifications and KMS regions,
    where alarms notify."""

    namespace: str
    classifications: Sequence[str]
    region: str
    dashboard: str = "kmsguard"
    alarm_prefix: str = "kmsguard"
    alarm_topic: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    regions: Sequence[str] = ()
    runbook_base: str = DEFAULT_RUNBOOK_BASE


Dims = Mapping[str, str]


def _line(t: Target, metric: str, dims: Dims, **options: Any) -> list[Any]:
    """A dashboard widget's metric: namespace, name, each dimension and its value, then options."""
    return [t.namespace, metric, *(x for kv in dims.items() for x in kv), *([options] if options else [])]


def _ratio_lines(t: Target, n: int, part: tuple[str, Dims], rest: tuple[str, Dims], label: str) -> list[list[Any]]:
    """A ratio part / (part + rest) as a widget's expression over two hidden metrics."""
    return [
        _line(t, *part, id=f"p{n}", visible=False, stat="Sum"),
        _line(t, *rest, id=f"q{n}", visible=False, stat="Sum"),
        [{"expression": f"FILL(p{n}, 0) / (FILL(p{n}, 0) + FILL(q{n}, 0))", "label": label, "id": f"r{n}"}],
    ]


def _rows(t: Target) -> list[list[tuple[str, list[list[Any]], str]]]:
    """The dashboard's rows of (title, metrics, default stat)."""
    classes, regions = t.classifications, t.regions
    rows = []
    for op in OPERATIONS:
        latency = [
            _line(t, DURATION, {"Operation": op, "Success": "true", "KeyType": c}, stat=stat, label=f"{c} {stat}")
            for c in classes
            for stat in ("p50", "p99")
        ]
        rows.append([
            (f"{op}: operations per minute",
             [_line(t, COUNT, {"Operation": op, "Success": "true", "KeyType": c}) for c in classes], "Sum"),
            (f"{op}: failed operations per minute",
             [_line(t, COUNT, {"Operation": op, "Success": "false", "KeyType": c}) for c in classes], "Sum"),
            (f"{op}: latency (ms)", latency, "p99"),
        ])
    if regions:
        rows.append([
            ("KMS calls per minute by region", [_line(t, "KmsCalls", {"Region": r}) for r in regions], "Sum"),
            ("KMS throttles per minute by region", [_line(t, "KmsThrottles", {"Region": r}) for r in regions], "Sum"),
            ("KMS latency p99 (ms)",
             [_line(t, "KmsLatency", {"Api": a, "Region": r}) for a in KMS_APIS for r in regions], "p99"),
        ])
        rows.append([
            ("Circuit breakers open", [_line(t, "RegionBreakerOpen", {"Region": r}) for r in regions], "Maximum"),
            ("Failovers per minute (from region)", [_line(t, "Failovers", {"FromRegion": r}) for r in regions], "Sum"),
            ("KMS calls failed per minute; regions available",
             [_line(t, "KmsErrors", {}), _line(t, "RegionsAvailable", {}, stat="Minimum")], "Sum"),
        ])
    hit_ratio = [
        line
        for n, c in enumerate(classes)
        for line in _ratio_lines(t, n, ("CacheHits", {"KeyType": c}), ("CacheMisses", {"KeyType": c}), c)
    ]
    lookups = [_line(t, metric, {"KeyType": c}, label=f"{c} {what}")
               for metric, what in (("CacheMisses", "misses"), ("CacheHits", "hits")) for c in classes]
    cache = [("Data-key cache hit ratio", hit_ratio, "Sum"), ("Cache misses and hits per minute", lookups, "Sum")]
    if regions:  # successful GenerateDataKey calls: KmsCalls less KmsErrors (the local backend calls no KMS)
        generated = [
            line
            for n, r in enumerate(regions)
            for line in (
                _line(t, "KmsCalls", {"Api": "GenerateDataKey", "Region": r}, id=f"c{n}", visible=False, stat="Sum"),
                _line(t, "KmsErrors", {"Api": "GenerateDataKey", "Region": r}, id=f"e{n}", visible=False, stat="Sum"),
                [{"expression": f"FILL(c{n}, 0) - FILL(e{n}, 0)", "label": r, "id": f"g{n}"}],
            )
        ]
        cache.append(("Data keys generated per minute (GenerateDataKey)", generated, "Sum"))
    rows.append(cache)
    rows.append([
        ("Audit backlog (records)", [_line(t, "AuditQueueDepth", {})], "Maximum"),
        ("Audit delivery lag (s)", [_line(t, "AuditDeliveryLag", {})], "Maximum"),
        ("Audit spool (bytes)", [_line(t, "AuditSpoolBytes", {})], "Maximum"),
    ])
    rows.append([
        ("Audit records dropped; strict audit refusals per minute",
         [_line(t, "AuditRecordsDropped", {}),
          *(_line(t, "StrictAuditRefusals", {"Operation": op}) for op in OPERATIONS)],
         "Sum"),
        ("Failed self-test checks; keys without rotation",
         [_line(t, "SelftestFailedChecks", {"Critical": "true"}), _line(t, "KeyRotationEnabled", {}, stat="Minimum")],
         "Maximum"),
        ("Service answers per minute: all, 5xx", [_line(t, "HttpRequests", {}), _line(t, "HttpErrors", {})], "Sum"),
    ])
    return rows


def dashboard_body(t: Target) -> dict[str, Any]:
    """The PutDashboard body: a row per operation (traffic, errors, latency), then KMS and regions (AWS backend),
    cache, audit, self-test, key rotation and the service."""
    widgets = [
        {
            "type": "metric",
            "x": x * 8,
            "y": y * 6,
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
        for y, row in enumerate(_rows(t))
        for x, (title, metrics, stat) in enumerate(row)
    ]
    return {"widgets": widgets}


def _cw_dims(dims: Dims) -> list[dict[str, str]]:
    return [{"Name": k, "Value": v} for k, v in dims.items()]


def _query(t: Target, id_: str, metric: str, dims: Dims, stat: str, period: int = PERIOD) -> dict[str, Any]:
    """One metric of a metric-math alarm."""
    return {
        "Id": id_,
        "ReturnData": False,
        "MetricStat": {
            "Metric": {"Namespace": t.namespace, "MetricName": metric, "Dimensions": _cw_dims(dims)},
            "Period": period,
            "Stat": stat,
        },
    }


def _math(expression: str, label: str, *queries: dict[str, Any]) -> dict[str, Any]:
    """A metric-math alarm's Metrics: the queries, and the expression it compares with its threshold."""
    return {"Metrics": [*queries, {"Id": "e", "Label": label, "ReturnData": True, "Expression": expression}]}


def _single(t: Target, metric: str, dims: Dims, stat: str, period: int = PERIOD, unit: str = "") -> dict[str, Any]:
    """A one-metric alarm's fields; ``stat`` a statistic (Sum, Maximum, ...) or a percentile (p99)."""
    return {
        "Namespace": t.namespace,
        "MetricName": metric,
        "Dimensions": _cw_dims(dims),
        **({"ExtendedStatistic": stat} if stat.startswith("p") else {"Statistic": stat}),
        "Period": period,
        **({"Unit": unit} if unit else {}),
    }


def _alarm(
    t: Target, name: str, alert: str, what: str, spec: dict[str, Any], threshold: float, periods: int,
    datapoints: int | None = None, comparison: str = "GreaterThanThreshold",
) -> dict[str, Any]:
    actions = {"AlarmActions": [t.alarm_topic], "OKActions": [t.alarm_topic]} if t.alarm_topic else {}
    return {
        "AlarmName": f"{t.alarm_prefix}-{name}",
        "AlarmDescription": f"{alert}: {what} (runbook: {runbook_url(t.runbook_base, alert)})",
        "ActionsEnabled": True,
        **actions,
        **spec,
        "EvaluationPeriods": periods,
        "DatapointsToAlarm": datapoints or periods,
        "Threshold": float(threshold),
        "ComparisonOperator": comparison,
        "TreatMissingData": "notBreaching",
    }


def alarms(t: Target) -> list[dict[str, Any]]:
    """The PutMetricAlarm requests, in a stable order: one per Prometheus alert and series it watches."""
    th = t.thresholds
    out: list[dict[str, Any]] = []
    for op in OPERATIONS:
        for cls in t.classifications:
            dims = {"Operation": op, "KeyType": cls}
            failed = _query(t, "failed", COUNT, {**dims, "Success": "false"}, "Sum")
            ok = _query(t, "ok", COUNT, {**dims, "Success": "true"}, "Sum")
            ratio = _math("FILL(failed, 0) / (FILL(failed, 0) + FILL(ok, 0))", "failed / all", failed, ok)
            out.append(_alarm(t, f"{op}-{cls}-error-ratio", "KmsguardHighErrorRatio", f"{op} of {cls} data failing",
                              ratio, th.error_ratio, EVALUATION_PERIODS))
            p99 = _single(t, DURATION, {**dims, "Success": "true"}, "p99", unit="Milliseconds")
            out.append(_alarm(t, f"{op}-{cls}-latency-p99", "KmsguardOperationLatencyHigh",
                              f"{op} of {cls} data slow", p99, th.operation_latency_p99 * 1000.0, EVALUATION_PERIODS))
    for region in t.regions:
        r = {"Region": region}
        throttled = _math("FILL(throttles, 0) / calls", "throttled / calls",
                          _query(t, "throttles", "KmsThrottles", r, "Sum"), _query(t, "calls", "KmsCalls", r, "Sum"))
        out.append(_alarm(t, f"kms-throttling-{region}", "KmsguardKmsThrottling",
                          f"KMS throttling kmsguard in {region}", throttled, th.throttle_ratio, 10))
        out.append(_alarm(t, f"breaker-open-{region}", "KmsguardRegionBreakerOpen",
                          f"KMS region {region} cut off by its circuit breaker",
                          _single(t, "RegionBreakerOpen", r, "Maximum"), 0, 2))
        out.append(_alarm(t, f"failing-over-{region}", "KmsguardRegionFailingOver",
                          f"operations failing over away from {region}",
                          _single(t, "Failovers", {"FromRegion": region}, "Sum", period=300), 0, 2))
        for api in KMS_APIS:
            latency = _single(t, "KmsLatency", {"Api": api, "Region": region}, "p99", unit="Milliseconds")
            out.append(_alarm(t, f"kms-{api}-{region}-latency-p99", "KmsguardKmsLatencyHigh",
                              f"KMS {api} slow in {region}", latency, th.kms_latency_p99 * 1000.0, 10))
    if t.regions:
        failing = _math(
            "IF(FILL(calls, 0) > 0 AND FILL(errors, 0) >= FILL(calls, 0), 1, 0) + IF(FILL(available, 1) == 0, 1, 0)",
            "no KMS call succeeds, or no breaker closed",
            _query(t, "calls", "KmsCalls", {}, "Sum"), _query(t, "errors", "KmsErrors", {}, "Sum"),
            _query(t, "available", "RegionsAvailable", {}, "Minimum"),
        )
        out.append(_alarm(t, "all-regions-failing", "KmsguardAllRegionsFailing", "no KMS region answers kmsguard",
                          failing, 0, 2))
    out.append(_alarm(t, "audit-delivery-stalled", "KmsguardAuditDeliveryStalled",
                      "audit records not reaching the sink",
                      _single(t, "AuditDeliveryLag", {}, "Maximum", unit="Seconds"), th.audit_lag, 2))
    growing = _math(f"IF(depth > {th.audit_backlog:g} AND DIFF(depth) > 0, 1, 0)", "backlog over threshold, growing",
                    _query(t, "depth", "AuditQueueDepth", {}, "Maximum", period=300))
    out.append(_alarm(t, "audit-backlog-growing", "KmsguardAuditBacklogGrowing", "audit backlog growing",
                      growing, 0, 2))
    out.append(_alarm(t, "audit-records-dropped", "KmsguardAuditRecordsDropped", "audit records dropped",
                      _single(t, "AuditRecordsDropped", {}, "Sum", period=300), 0, 3, datapoints=1))
    for op in OPERATIONS:
        out.append(_alarm(t, f"{op}-strict-audit-refusals", "KmsguardStrictAuditRefusals",
                          f"{op} refused: its audit record cannot be made durable",
                          _single(t, "StrictAuditRefusals", {"Operation": op}, "Sum"), 0, 1))
    lookups = th.cache_min_rate * 900
    for cls in t.classifications:
        k = {"KeyType": cls}
        ratio = _math(
            f"IF(FILL(hits, 0) + FILL(misses, 0) > {lookups:g}, FILL(hits, 0) / (FILL(hits, 0) + FILL(misses, 0)), 1)",
            "hits / lookups",
            _query(t, "hits", "CacheHits", k, "Sum", period=900),
            _query(t, "misses", "CacheMisses", k, "Sum", period=900),
        )
        out.append(_alarm(t, f"cache-hit-ratio-{cls}", "KmsguardCacheHitRatioLow",
                          f"data-key cache hit ratio low for {cls}", ratio, th.cache_hit_ratio, 2,
                          comparison="LessThanThreshold"))
    out.append(_alarm(t, "selftest-failing", "KmsguardSelftestFailing", "kmsguard self-test failing",
                      _single(t, "SelftestFailedChecks", {"Critical": "true"}, "Maximum"), 0, 1))
    out.append(_alarm(t, "key-rotation-off", "KmsguardKeyRotationOff", "automatic rotation off for a key",
                      _single(t, "KeyRotationEnabled", {}, "Minimum", period=300), 1, 3,
                      comparison="LessThanThreshold"))
    errors = _math("FILL(errors, 0) / requests", "5xx / all", _query(t, "errors", "HttpErrors", {}, "Sum"),
                   _query(t, "requests", "HttpRequests", {}, "Sum"))
    out.append(_alarm(t, "service-errors", "KmsguardServiceErrors", "kmsguard service answering 5xx", errors,
                      th.http_error_ratio, 5))
    out.append(_alarm(t, "export-dropping", "KmsguardCloudWatchExportDropping",
                      "the CloudWatch export is dropping samples", _single(t, "ExportDropped", {}, "Sum"), 0, 10))
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
        "Dimensions", "Statistic", "ExtendedStatistic", "Period", "Unit", "EvaluationPeriods", "DatapointsToAlarm",
        "Threshold", "ComparisonOperator", "TreatMissingData", "Metrics",
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
