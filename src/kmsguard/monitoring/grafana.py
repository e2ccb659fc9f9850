"""``kmsguard monitoring grafana-dashboard``: a Grafana dashboard (JSON model) over kmsguard's metrics.

Variables: ``datasource`` (any Prometheus), ``job``, ``instance`` and ``classification``
(all multi-select with "All"). Rows: traffic, errors, latency, KMS, cache, audit and the
HTTP service. Every panel queries kmsguard's raw metrics, so the dashboard works without
the recording rules loaded. docs/monitoring.md describes each panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Grafana's JSON model version this is written for (Grafana 10/11 upgrade older ones on load).
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Label matchers every query carries; CLS adds the classification variable where the metric has that label.
SEL = 'job=~"$job", instance=~"$instance"'
CLS = f'{SEL}, classification=~"$classification"'


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"


ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        Panel("Operations/s by operation and classification",
              "Guard operations per second, successful or not.",
              ((f"sum by (operation, classification) (rate(kmsguard_operations_total{{{CLS}}}[$__rate_interval]))",
                "{{operation}} {{classification}}"),), "ops"),
        Panel("Operations/s by outcome", "Successful and failed operations per second.",
              ((f"sum by (outcome) (rate(kmsguard_operations_total{{{CLS}}}[$__rate_interval]))", "{{outcome}}"),),
              "ops"),
    ]),
    ("Errors", [
        Panel("Errors/s by code", "Failed operations per second by kmsguard error code.",
              ((f"sum by (operation, code) (rate(kmsguard_operation_errors_total{{{CLS}}}[$__rate_interval]))",
                "{{operation}} {{code}}"),), "ops"),
        Panel("Error ratio by operation and classification", "Share of operations that failed.",
              ((f'sum by (operation, classification) (rate(kmsguard_operations_total{{{CLS}, outcome="error"}}'
                "[$__rate_interval])) / sum by (operation, classification) "
                f"(rate(kmsguard_operations_total{{{CLS}}}[$__rate_interval]))",
                "{{operation}} {{classification}}"),), "percentunit"),
    ]),
    ("Latency", [
        Panel("Operation latency p50 / p99", "From the operation duration histogram, per operation.",
              tuple(
                  (f"histogram_quantile({q}, sum by (operation, le) "
                   f"(rate(kmsguard_operation_duration_seconds_bucket{{{CLS}}}[$__rate_interval])))",
                   f"p{round(q * 100)} {{{{operation}}}}")
                  for q in (0.5, 0.99)
              ), "s"),
        Panel("KMS latency p50 / p99", "From the KMS call histogram (retries included), per API and region.",
              tuple(
                  (f"histogram_quantile({q}, sum by (api, region, le) "
                   f"(rate(kmsguard_kms_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                   f"p{round(q * 100)} {{{{api}}}} {{{{region}}}}")
                  for q in (0.5, 0.99)
              ), "s"),
    ]),
    ("KMS", [
        Panel("KMS calls/s by API, region and outcome", "Every KMS call kmsguard made, by its final outcome.",
              ((f"sum by (api, region, outcome) (rate(kmsguard_kms_calls_total{{{SEL}}}[$__rate_interval]))",
                "{{api}} {{region}} {{outcome}}"),), "reqps"),
        Panel("KMS retries and throttles/s", "Attempts beyond the first, and throttling answers, by API and region.",
              ((f"sum by (api, region) (rate(kmsguard_kms_retries_total{{{SEL}}}[$__rate_interval]))",
                "retries {{api}} {{region}}"),
               (f"sum by (api, region) (rate(kmsguard_kms_throttles_total{{{SEL}}}[$__rate_interval]))",
                "throttles {{api}} {{region}}")), "reqps"),
        Panel("Failovers/s", "Operations that moved on from a failing region to the next.",
              ((f"sum by (from_region, to_region) (rate(kmsguard_failovers_total{{{SEL}}}[$__rate_interval]))",
                "{{from_region}} -> {{to_region}}"),), "ops"),
        Panel("Circuit breakers not closed", "Instances whose breaker for a region is open or probing (half-open).",
              ((f'sum by (region, state) (kmsguard_region_breaker_state{{{SEL}, state!="closed"}})',
                "{{region}} {{state}}"),), "short"),
    ]),
    ("Cache", [
        Panel("Data-key cache hit ratio", "Hits over hits and misses, per classification: misses are KMS calls.",
              ((f'(sum by (classification) (rate(kmsguard_cache_events_total{{{CLS}, event="hit"}}[$__rate_interval]))'
                " or 0 * sum by (classification) "
                f'(rate(kmsguard_cache_events_total{{{CLS}, event="miss"}}[$__rate_interval])))'
                " / sum by (classification) "
                f'(rate(kmsguard_cache_events_total{{{CLS}, event=~"hit|miss"}}[$__rate_interval]))',
                "{{classification}}"),), "percentunit"),
        Panel("Cache misses/s",
              "Data-key cache lookups that missed, per classification: an encrypt miss generates a data key, a "
              "decrypt miss unwraps one (KMS Decrypt with the AWS backend). Classifications without key reuse "
              "never look the cache up and are not counted here.",
              ((f'sum by (classification) (rate(kmsguard_cache_events_total{{{CLS}, event="miss"}}'
                "[$__rate_interval]))", "{{classification}}"),), "ops"),
        Panel("Data keys generated/s",
              "Successful KMS GenerateDataKey calls by region (AWS backend): every new data key, cache misses and "
              "classifications without key reuse alike, each a billed call. KMS calls carry no classification: "
              "the Classification variable does not filter this panel. Empty with the local backend, whose data "
              "keys are made in process at no cost (its encrypt misses are in Cache misses/s).",
              ((f'sum by (region) (rate(kmsguard_kms_calls_total{{{SEL}, api="GenerateDataKey", outcome="ok"}}'
                "[$__rate_interval]))", "{{region}}"),), "ops"),
        Panel("Cached data keys", "Entries in the data-key caches now.",
              ((f"sum by (classification) (kmsguard_cache_entries{{{CLS}}})", "{{classification}}"),), "short"),
    ]),
    ("Audit", [
        Panel("Audit spool backlog", "Records written to the local spool and not yet delivered to the sink.",
              ((f"sum by (instance) (kmsguard_audit_queue_depth{{{SEL}}})", "{{instance}}"),), "short"),
        Panel("Audit delivery lag", "Seconds records have waited with no delivery progress (0: none wait).",
              ((f"max by (instance) (kmsguard_audit_delivery_lag_seconds{{{SEL}}})", "{{instance}}"),), "s"),
        Panel("Audit records dropped", "Non-strict records lost because the spool was full or unusable.",
              ((f"sum by (instance) (kmsguard_audit_dropped_records{{{SEL}}})", "{{instance}}"),), "short"),
        Panel("Strict audit refusals/s", "Operations refused because their audit record could not be made durable.",
              ((f"sum by (operation, classification) "
                f'(rate(kmsguard_operation_errors_total{{{CLS}, code="AUDIT_UNAVAILABLE"}}[$__rate_interval]))',
                "{{operation}} {{classification}}"),), "ops"),
    ]),
    ("Service", [
        Panel("Requests/s by status", "HTTP answers of `kmsguard serve`, by status code (empty unless serving).",
              ((f"sum by (status) (rate(kmsguard_http_requests_total{{{SEL}}}[$__rate_interval]))", "{{status}}"),),
              "reqps"),
        Panel("Requests/s by route", "HTTP answers by route template and method.",
              ((f"sum by (method, route) (rate(kmsguard_http_requests_total{{{SEL}}}[$__rate_interval]))",
                "{{method}} {{route}}"),), "reqps"),
    ]),
]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard(title: str = "kmsguard", uid: str = "kmsguard") -> dict[str, Any]:
    """The dashboard's JSON model (import it, or provision it from a file)."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = iter(range(1, 1000))
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "id": next(next_id), "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        width = 24 // min(len(row_panels), 3)
        for i, p in enumerate(row_panels):
            panels.append({
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "id": next(next_id),
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": width, "x": (i % 3) * width, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [
                    {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + n)}
                    for n, (expr, legend) in enumerate(p.targets)
                ],
            })
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "title": title,
        "uid": uid,
        "tags": ["kmsguard"],
        "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("job", "Job", "label_values(kmsguard_operations_total, job)"),
            _variable("instance", "Instance", 'label_values(kmsguard_operations_total{job=~"$job"}, instance)'),
            _variable("classification", "Classification",
                      'label_values(kmsguard_operations_total{job=~"$job", instance=~"$instance"}, classification)'),
        ]},
        "panels": panels,
    }


def render(title: str = "kmsguard", uid: str = "kmsguard") -> str:
    return json.dumps(dashboard(title, uid), indent=2) + "\n"
