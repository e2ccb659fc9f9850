"""The alert thresholds, with their defaults: one place for the Prometheus rules, the CloudWatch
alarms, the command-line flags that override them and the docs that list them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _threshold(default: float, flag_help: str) -> Any:
    return field(default=default, metadata={"help": flag_help})


@dataclass(frozen=True)
class Thresholds:
    """When each alert fires. Ratios are fractions (0.05 is 5 %), durations seconds."""

    error_ratio: float = _threshold(0.05, "Failed operations per operation and classification, as a fraction.")
    throttle_ratio: float = _threshold(0.1, "KMS calls answered with throttling, per region, as a fraction.")
    kms_latency_p99: float = _threshold(0.5, "KMS call latency p99 in seconds, per API and region.")
    operation_latency_p99: float = _threshold(1.0, "Operation latency p99 in seconds, per operation and class.")
    cache_hit_ratio: float = _threshold(0.5, "Data-key cache hit ratio below which the KMS bill grows.")
    cache_min_rate: float = _threshold(1.0, "Cache lookups per second under which the hit ratio is not judged.")
    audit_lag: float = _threshold(60.0, "Seconds audit records may wait with no delivery progress.")
    audit_backlog: float = _threshold(10000.0, "Undelivered audit records at which a growing backlog alerts.")
    http_error_ratio: float = _threshold(0.05, "Service answers with a 5xx status, as a fraction.")

    @classmethod
    def flags(cls) -> list[tuple[str, float, str]]:
        """(field name, default, help) for each threshold: the command's ``--error-ratio``, ..."""
        return [(f.name, f.default, f.metadata["help"]) for f in fields(cls)]  # type: ignore[misc]
