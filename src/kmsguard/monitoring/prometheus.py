"""``kmsguard monitoring prometheus-rules``: alerting and recording rules over kmsguard's metrics.

Every alert carries a ``severity`` label (``critical``: act now, data is at risk or
operations fail; ``warning``: act today) and ``summary``, ``description`` and
``runbook_url`` annotations; the runbook is the alert's section of docs/monitoring.md
(its anchor is the alert's name in lower case). The rules aggregate by ``job`` and
``instance`` so one rule file serves every deployment a Prometheus scrapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kmsguard.monitoring.thresholds import Thresholds

#: Where the runbooks are when no ``--runbook-base`` is given: the page in kmsguard's sources, a path
#: and not a link (kmsguard cannot know where a team hosts its docs: docs/monitoring.md says how to set it).
DEFAULT_RUNBOOK_BASE = "docs/monitoring.md"


def runbook_url(base: str, alert: str) -> str:
    """The runbook of ``alert``: its section of the monitoring page at ``base`` (the anchor is its name in lower
    case, as MkDocs and GitHub make it from the section's title)."""
    return f"{base}#{alert.lower()}"

#: Recording rules: name -> expression. The alerts and the dashboard's heavier panels use them.
RECORDING_RULES: dict[str, str] = {
    "kmsguard:operations:rate5m": (
        "sum by (job, instance, operation, classification, outcome) (rate(kmsguard_operations_total[5m]))"
    ),
    "kmsguard:operation_errors:ratio_rate5m": (
        'sum by (job, instance, operation, classification) (rate(kmsguard_operations_total{outcome="error"}[5m]))'
        " / sum by (job, instance, operation, classification) (rate(kmsguard_operations_total[5m]))"
    ),
    "kmsguard:operation_duration_seconds:p99_5m": (
        "histogram_quantile(0.99, sum by (job, instance, operation, classification, le)"
        " (rate(kmsguard_operation_duration_seconds_bucket[5m])))"
    ),
    "kmsguard:kms_calls:rate5m": "sum by (job, instance, api, region, outcome) (rate(kmsguard_kms_calls_total[5m]))",
    "kmsguard:kms_throttles:ratio_rate5m": (
        "sum by (job, instance, region) (rate(kmsguard_kms_throttles_total[5m]))"
        " / sum by (job, instance, region) (rate(kmsguard_kms_calls_total[5m]))"
    ),
    "kmsguard:kms_latency_seconds:p99_5m": (
        "histogram_quantile(0.99, sum by (job, instance, api, region, le)"
        " (rate(kmsguard_kms_latency_seconds_bucket[5m])))"
    ),
    "kmsguard:cache_lookups:rate15m": (
        'sum by (job, instance, classification) (rate(kmsguard_cache_events_total{event=~"hit|miss"}[15m]))'
    ),
    # Hits "or" 0 per lookup series: with misses and no hit series yet the ratio is 0, not absent.
    "kmsguard:cache_hit:ratio_rate15m": (
        '(sum by (job, instance, classification) (rate(kmsguard_cache_events_total{event="hit"}[15m]))'
        ' or 0 * sum by (job, instance, classification) (rate(kmsguard_cache_events_total{event="miss"}[15m])))'
        ' / sum by (job, instance, classification) (rate(kmsguard_cache_events_total{event=~"hit|miss"}[15m]))'
    ),
}


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


def alerts(t: Thresholds) -> list[Alert]:
    """Every alert, its expression filled in with the thresholds ``t``."""
    return [
        Alert(
            "KmsguardHighErrorRatio",
            f"kmsguard:operation_errors:ratio_rate5m > {t.error_ratio:g}",
            "5m", "critical",
            "{{ $labels.operation }} {{ $labels.classification }} failing on {{ $labels.instance }}",
            "{{ $value | humanizePercentage }} of {{ $labels.operation }} operations of {{ $labels.classification }} "
            f"data failed over 5 minutes (threshold {t.error_ratio:.0%}).",
        ),
        Alert(
            "KmsguardKmsThrottling",
            f"kmsguard:kms_throttles:ratio_rate5m > {t.throttle_ratio:g}",
            "10m", "warning",
            "KMS throttling kmsguard in {{ $labels.region }}",
            "{{ $value | humanizePercentage }} of KMS calls in {{ $labels.region }} were throttled for 10 minutes "
            f"(threshold {t.throttle_ratio:.0%}).",
        ),
        Alert(
            "KmsguardRegionBreakerOpen",
            'max by (job, instance, region) (kmsguard_region_breaker_state{state=~"open|half-open"}) == 1',
            "2m", "warning",
            "KMS region {{ $labels.region }} is cut off by its circuit breaker",
            "The circuit breaker of {{ $labels.region }} on {{ $labels.instance }} has been open or probing for "
            "2 minutes: operations are served by the other regions.",
        ),
        Alert(
            "KmsguardRegionFailingOver",
            "sum by (job, instance, from_region) (rate(kmsguard_failovers_total[5m])) > 0",
            "5m", "warning",
            "kmsguard failing over away from {{ $labels.from_region }}",
            "Operations on {{ $labels.instance }} have been moving on from {{ $labels.from_region }} to another "
            "region for 5 minutes.",
        ),
        Alert(
            "KmsguardAllRegionsFailing",
            # "Calls made unless some succeeded", not "ok rate == 0": a process that never had a successful
            # call has no outcome="ok" series, and a comparison with an absent series is absent.
            '(max by (job, instance) (kmsguard_region_breaker_state{state="closed"}) == 0)'
            " or (sum by (job, instance) (rate(kmsguard_kms_calls_total[5m])) > 0"
            ' unless sum by (job, instance) (rate(kmsguard_kms_calls_total{outcome="ok"}[5m])) > 0)',
            "2m", "critical",
            "No KMS region answers kmsguard on {{ $labels.instance }}",
            "Every region's breaker is open, or no KMS call has succeeded for 2 minutes: operations that need "
            "KMS (cache misses, every decrypt of a new data key) fail.",
        ),
        Alert(
            "KmsguardAuditDeliveryStalled",
            f"kmsguard_audit_delivery_lag_seconds > {t.audit_lag:g}",
            "2m", "critical",
            "Audit records not reaching the sink on {{ $labels.instance }}",
            "Audit records have waited {{ $value | humanizeDuration }} with no delivery progress "
            f"(threshold {t.audit_lag:g} s): the sink is down or refusing; records wait in the local spool.",
        ),
        Alert(
            "KmsguardAuditBacklogGrowing",
            f"kmsguard_audit_queue_depth > {t.audit_backlog:g} and deriv(kmsguard_audit_queue_depth[10m]) > 0",
            "10m", "warning",
            "Audit backlog growing on {{ $labels.instance }}",
            "{{ $value }} audit records wait for the sink and the backlog has grown for 10 minutes "
            f"(threshold {t.audit_backlog:g}): the sink is slower than the traffic.",
        ),
        Alert(
            "KmsguardAuditRecordsDropped",
            "delta(kmsguard_audit_dropped_records[15m]) > 0",
            "0m", "critical",
            "Audit records dropped on {{ $labels.instance }}",
            "The audit spool was full or unusable and non-strict audit records were dropped: "
            "the audit trail has a gap.",
        ),
        Alert(
            "KmsguardStrictAuditRefusals",
            "sum by (job, instance, operation, classification)"
            ' (rate(kmsguard_operation_errors_total{code="AUDIT_UNAVAILABLE"}[5m])) > 0',
            "0m", "critical",
            "{{ $labels.operation }} of {{ $labels.classification }} data refused: its audit record cannot be made "
            "durable",
            "{{ $labels.operation }} operations of {{ $labels.classification }} data (strict audit) on "
            "{{ $labels.instance }} are refused with AUDIT_UNAVAILABLE.",
        ),
        Alert(
            "KmsguardCacheHitRatioLow",
            f"kmsguard:cache_hit:ratio_rate15m < {t.cache_hit_ratio:g}"
            f" and kmsguard:cache_lookups:rate15m > {t.cache_min_rate:g}",
            "30m", "warning",
            "Data-key cache hit ratio low for {{ $labels.classification }}",
            "Only {{ $value | humanizePercentage }} of {{ $labels.classification }} data-key lookups hit the cache "
            f"for 30 minutes (threshold {t.cache_hit_ratio:.0%}): every miss is a billed KMS call.",
        ),
        Alert(
            "KmsguardKmsLatencyHigh",
            f"kmsguard:kms_latency_seconds:p99_5m > {t.kms_latency_p99:g}",
            "10m", "warning",
            "KMS {{ $labels.api }} slow in {{ $labels.region }}",
            "KMS {{ $labels.api }} p99 latency in {{ $labels.region }} has been {{ $value | humanizeDuration }} "
            f"for 10 minutes (threshold {t.kms_latency_p99:g} s).",
        ),
        Alert(
            "KmsguardOperationLatencyHigh",
            f"kmsguard:operation_duration_seconds:p99_5m > {t.operation_latency_p99:g}",
            "10m", "warning",
            "{{ $labels.operation }} of {{ $labels.classification }} data slow on {{ $labels.instance }}",
            "The p99 latency of {{ $labels.operation }} operations of {{ $labels.classification }} data has been "
            f"{{{{ $value | humanizeDuration }}}} for 10 minutes (threshold {t.operation_latency_p99:g} s).",
        ),
        Alert(
            "KmsguardSelftestFailing",
            'kmsguard_selftest_failed_checks{critical="true"} > 0',
            "0m", "critical",
            "kmsguard self-test failing on {{ $labels.instance }}",
            "{{ $value }} critical self-test checks failed in the last run of /v1/selftest.",
        ),
        Alert(
            "KmsguardKeyRotationOff",
            "kmsguard_key_rotation_enabled == 0",
            "15m", "warning",
            "Automatic rotation is off for the {{ $labels.classification }} key in {{ $labels.region }}",
            "The KMS key of {{ $labels.classification }} in {{ $labels.region }} does not rotate automatically.",
        ),
        Alert(
            "KmsguardServiceErrors",
            'sum by (job, instance) (rate(kmsguard_http_requests_total{status=~"5.."}[5m]))'
            f" / sum by (job, instance) (rate(kmsguard_http_requests_total[5m])) > {t.http_error_ratio:g}",
            "5m", "critical",
            "kmsguard service answering 5xx on {{ $labels.instance }}",
            "{{ $value | humanizePercentage }} of the service's answers were 5xx for 5 minutes "
            f"(threshold {t.http_error_ratio:.0%}).",
        ),
        Alert(
            "KmsguardCloudWatchExportDropping",
            "rate(kmsguard_cloudwatch_dropped_total[10m]) > 0",
            "10m", "warning",
            "kmsguard's CloudWatch export is dropping samples on {{ $labels.instance }}",
            "Operation samples are dropped before they reach CloudWatch: its dashboard and alarms see less traffic "
            "than there is.",
        ),
    ]


def rules(t: Thresholds | None = None, runbook_base: str = DEFAULT_RUNBOOK_BASE) -> dict[str, Any]:
    """The rule file's document: one group of recording rules, one of alerts."""
    t = t or Thresholds()
    return {
        "groups": [
            {
                "name": "kmsguard.rules",
                "rules": [{"record": name, "expr": expr} for name, expr in RECORDING_RULES.items()],
            },
            {
                "name": "kmsguard.alerts",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.for_,
                        "labels": {"severity": a.severity},
                        "annotations": {
                            "summary": a.summary,
                            "description": a.description,
                            "runbook_url": runbook_url(runbook_base, a.name),
                        },
                    }
                    for a in alerts(t)
                ],
            },
        ]
    }


def render(t: Thresholds | None = None, runbook_base: str = DEFAULT_RUNBOOK_BASE) -> str:
    """The rule file as YAML (what ``kmsguard monitoring prometheus-rules`` prints)."""
    import yaml  # here: the CLI reads DEFAULT_RUNBOOK_BASE for every monitoring command

    header = "# Generated by `kmsguard monitoring prometheus-rules`; see docs/monitoring.md.\n"
    return header + yaml.safe_dump(rules(t, runbook_base), sort_keys=False, width=1000)
