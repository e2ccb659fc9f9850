"""The metric names and labels a kmsguard registry exposes once every kind of event has been reported."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kmsguard.aws.admin import KeyStatus
from kmsguard.metrics import CloudWatchExport, Metrics
from kmsguard.operation import Operation


def fed_registry(exporter: CloudWatchExport | None = None) -> Metrics:
    """A registry that has seen one of everything kmsguard reports (in process, no KMS)."""
    m = Metrics(exporter)
    feed(m)
    return m


def feed(m: Any) -> None:
    """One of everything kmsguard reports, to ``m``: a Telemetry and operation observer (the Prometheus
    registry, the OpenTelemetry bridge)."""
    op = Operation("encrypt", "pii", {}, "tester")
    op.finish(None)
    m.observe(op.event())
    failed = Operation("decrypt", "pii", {}, "tester")
    failed.finish(type("E", (Exception,), {"code": "INVALID_CIPHERTEXT"})())
    m.observe(failed.event())
    m.kms_call("GenerateDataKey", "us-east-1", "ok", 0.01, attempts=2, throttles=1)
    m.cache_event("miss", "pii")
    m.cache_hits(lambda: {"pii": 3})
    m.cache_entries(lambda: {"pii": 1})
    m.failover("us-east-1", "eu-west-1")
    m.hedge("us-east-1", "eu-west-1")
    m.hedge_won("us-east-1", "eu-west-1")
    m.breakers(lambda: {"us-east-1": "open", "eu-west-1": "closed"})
    for name in ("audit_queue_depth", "audit_spool_bytes", "audit_delivery_lag_seconds", "audit_dropped_records"):
        m.gauge(name, 0)
    m.key_statuses([KeyStatus("pii", "us-east-1", "alias/x", rotation_enabled=False)])
    m.selftest_finished(0, 0)
    m.http_request("POST", "/v1/encrypt", "200")
    m.export_dropped(1)


def exported(text: str) -> dict[str, set[str]]:
    """metric sample name -> its label names, from a Prometheus text exposition, with the ``job``
    and ``instance`` labels Prometheus adds to every scraped series."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {"job", "instance"}).update(sample.labels)
    return out
