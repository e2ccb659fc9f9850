"""Metrics: one Prometheus registry per Guard stack, and CloudWatch exporters.

:class:`Metrics` is both the :class:`~kmsguard.telemetry.Telemetry` that ``stack``
hands to every keyring (KMS calls, retries, throttles, latency, cache events,
failovers, levels such as the audit queue) and an operation observer (count and
duration of every operation by operation, classification and outcome).

Labels are names only — operation, classification (after the policy accepted it, so
one of the configured few; "none" before), outcome, error code, API, region. Never
context values, principals, key material or data, so a metric cannot leak what it counts.

CloudWatch: ``[metrics] emf`` writes embedded-metric-format JSON lines (for a log
agent or Lambda to turn into metrics), ``[metrics] cloudwatch = true`` publishes with
PutMetricData. Both are fed by one bounded buffer that a background thread drains
every ``flush_interval``; the caller only appends to it, and what does not fit is
dropped and counted (``kmsguard_cloudwatch_dropped_total``), never waited for. At each
flush the same thread also reads this registry (as a scrape would) and publishes the
series the alerts watch under CloudWatch names (:data:`MIRRORS`): counters as their
increase since the last flush, levels as they are. Nothing is added to an operation.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kmsguard.config import Settings
from kmsguard.config_table import ConfigTable
from kmsguard.errors import ConfigurationError
from kmsguard.fastpath import OperationEvent
from kmsguard.histogram import Histogram as Series
from kmsguard.histogram import HitTally
from kmsguard.operation import EventKind
from kmsguard.telemetry import Telemetry

if TYPE_CHECKING:
    from kmsguard.audit.record import AuditRecord
    from kmsguard.aws.admin import KeyStatus

log = logging.getLogger("kmsguard.metrics")
_GAUGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_OP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_KMS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: CloudWatch's limits: values per PutMetricData call (as the issue sets it) and per datum.
MAX_VALUES_PER_CALL = 1000
MAX_VALUES_PER_DATUM = 150
EMF_MAX_VALUES = 100


class Metrics(Telemetry):
    """The Prometheus registry and everything that feeds it."""

    def __init__(self, exporter: CloudWatchExport | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.operation_stats = OperationStats()
        r.register(self.operation_stats)
        self.operation_errors = Counter(
            "kmsguard_operation_errors",
            "Failed operations by classification and error code",
            ("operation", "classification", "code"),
            registry=r,
        )
        kms = ("api", "region")
        self.kms_calls = Counter("kmsguard_kms_calls", "KMS API calls", (*kms, "outcome"), registry=r)
        self.kms_retries = Counter("kmsguard_kms_retries", "KMS retries (attempts beyond the first)", kms, registry=r)
        self.kms_throttles = Counter("kmsguard_kms_throttles", "KMS throttling responses", kms, registry=r)
        self.kms_seconds = Histogram(
            "kmsguard_kms_latency_seconds", "KMS call latency incl. retries", kms, buckets=_KMS_BUCKETS, registry=r
        )
        self.cache_events = CacheEvents()
        r.register(self.cache_events)
        self.failovers = Counter("kmsguard_failovers", "Region failovers", ("from_region", "to_region"), registry=r)
        self.hedges = Counter(
            "kmsguard_hedges", "KMS calls repeated in another region (hedges)", ("from_region", "to_region"), registry=r
        )
        self.hedge_wins = Counter(
            "kmsguard_hedge_wins", "Hedges answered before their tries", ("from_region", "to_region"), registry=r
        )
        self.cloudwatch_dropped = Counter(
            "kmsguard_cloudwatch_dropped", "Operation samples CloudWatch export dropped", registry=r
        )
        self.breaker_states = BreakerStates()
        r.register(self.breaker_states)
        self.key_rotation = Gauge(
            "kmsguard_key_rotation_enabled",
            "1 when the classification's key rotates automatically in the region, 0 when it does not",
            ("classification", "region"),
            registry=r,
        )
        self.selftest_failures = Gauge(
            "kmsguard_selftest_failed_checks",
            "Checks that failed in the last self-test run, by whether they are critical",
            ("critical",),
            registry=r,
        )
        self.http_requests = Counter(
            "kmsguard_http_requests",
            "HTTP requests answered, by method, route template and status",
            ("method", "route", "status"),
            registry=r,
        )
        self._gauges: dict[str, Gauge] = {}
        self._gauge_lock = threading.Lock()
        self.exporter = exporter
        if exporter is not None:
            exporter.on_drop = self.export_dropped  # stack.build_telemetry: to every Telemetry
            exporter.levels = self.cloudwatch_levels

    # ------------------------------------------------------------------ Observer (hot path)

    def observe(self, event: OperationEvent) -> None:
        kind: EventKind = event.kind
        cls = kind.classification or "none"
        self.operation_stats.observe((kind.operation, cls, kind.outcome), event.duration)
        if kind.error_code is not None:  # errors only: the label costs a successful operation nothing
            self.operation_errors.labels(kind.operation, cls, kind.error_code).inc()
        if self.exporter is not None:
            self.exporter.add(kind.operation, kind.outcome == "ok", kind.classification, event.duration)

    def count_recorded(self, record: AuditRecord) -> None:
        """Count an operation read back from the audit trail (``kmsguard metrics`` in a one-shot process)."""
        cls = record.classification or "none"
        self.operation_stats.observe((record.operation, cls, record.outcome), record.duration_us / 1e6)
        if record.error_code is not None:
            self.operation_errors.labels(record.operation, cls, record.error_code).inc()
        if record.cache_hit is not None:
            self.cache_events.count("hit" if record.cache_hit else "miss", cls)

    def hit_recorder(self) -> HitTally:
        """Cache hits (see kmsguard.operation.EventKind) go into the same series as full operations."""
        lookup = lambda kind: self.operation_stats.series(_hit_series(kind))  # noqa: E731
        return HitTally(lookup) if self.exporter is None else _ExportedHits(lookup, self.exporter)

    # ------------------------------------------------------------------ Telemetry

    def kms_call(
        self, api: str, region: str, outcome: str, duration: float, attempts: int = 1, throttles: int = 0
    ) -> None:
        self.kms_calls.labels(api, region, outcome).inc()
        self.kms_seconds.labels(api, region).observe(duration)
        if attempts > 1:
            self.kms_retries.labels(api, region).inc(attempts - 1)
        if throttles:
            self.kms_throttles.labels(api, region).inc(throttles)

    def cache_event(self, event: str, classification: str) -> None:
        self.cache_events.count(event, classification)

    def cache_hits(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.cache_events.hit_sources.append(source)

    def cache_entries(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.cache_events.entry_sources.append(source)

    def failover(self, from_region: str, to_region: str) -> None:
        self.failovers.labels(from_region, to_region).inc()

    def hedge(self, from_region: str, to_region: str) -> None:
        self.hedges.labels(from_region, to_region).inc()

    def hedge_won(self, from_region: str, to_region: str) -> None:
        self.hedge_wins.labels(from_region, to_region).inc()

    def breakers(self, source: Callable[[], Mapping[str, str]]) -> None:
        self.breaker_states.sources.append(source)

    def key_statuses(self, rows: Iterable[KeyStatus]) -> None:
        for row in rows:
            if row.rotation_enabled is not None:
                self.key_rotation.labels(row.classification, row.region).set(1 if row.rotation_enabled else 0)

    def selftest_finished(self, failed_critical: int, failed_other: int) -> None:
        self.selftest_failures.labels("true").set(failed_critical)
        self.selftest_failures.labels("false").set(failed_other)

    def http_request(self, method: str, route: str, status: str) -> None:
        self.http_requests.labels(method, route, status).inc()

    def export_dropped(self, samples: float) -> None:
        self.cloudwatch_dropped.inc(samples)

    def gauge(self, name: str, value: float) -> None:
        g = self._gauges.get(name)
        if g is None:
            if not _GAUGE_NAME.fullmatch(name):
                return
            with self._gauge_lock:
                g = self._gauges.get(name) or Gauge(f"kmsguard_{name}", name.replace("_", " "), registry=self.registry)
                self._gauges[name] = g
        g.set(value)

    # ------------------------------------------------------------------ export

    def exposition(self) -> bytes:
        """The Prometheus text format: what ``kmsguard metrics`` prints and a scrape endpoint serves."""
        return generate_latest(self.registry)

    def cloudwatch_levels(self) -> Levels:
        """The registry read as :data:`MIRRORS` and :data:`KMS_LATENCY` name it, for the CloudWatch export.

        A CloudWatch series exists as soon as its Prometheus family has a sample with its
        labels; the mirror's filter decides only what it counts (so ``KmsErrors`` is 0, not
        absent, while every call succeeds).
        """
        mirrors: dict[str, list[Mirror]] = {}
        for m in MIRRORS:
            mirrors.setdefault(m.sample, []).append(m)
        totals: dict[tuple[str, Dims, float | None], float] = {}
        levels: dict[tuple[str, Dims], float] = {}
        buckets: dict[Dims, list[tuple[float, float]]] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == _KMS_LATENCY_BUCKET:
                    api_region: Dims = (("Api", sample.labels["api"]), ("Region", sample.labels["region"]))
                    buckets.setdefault(api_region, []).append((float(sample.labels["le"]), sample.value))
                for m in mirrors.get(sample.name, ()):
                    dims = tuple((dim, sample.labels[label]) for label, dim in m.dims)
                    value = sample.value if m.where is None or m.where(sample.labels) else 0.0
                    if m.counter:
                        totals[(m.metric, dims, None)] = totals.get((m.metric, dims, None), 0.0) + value
                    else:
                        levels[(m.metric, dims)] = levels.get((m.metric, dims), 0.0) + value
        for api_region, cumulative in buckets.items():  # each call at its bucket's upper bound, in milliseconds
            below = 0.0
            for le, n in sorted(cumulative):
                bound = KMS_LATENCY_OVERFLOW_MS if le == float("inf") else le * 1000.0
                totals[(KMS_LATENCY, api_region, bound)] = n - below
                below = n
        return Levels(totals, levels)

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()


def of(observers: Iterable[object]) -> Metrics | None:
    """The Metrics among a Guard's observers (``metrics.of(guard.observers)``), if metrics are on."""
    return next((o for o in observers if isinstance(o, Metrics)), None)


class OperationStats(Collector):
    """Operation count and latency histogram: one compiled :class:`kmsguard.histogram.Histogram` per series.

    The same series as a prometheus_client Counter and Histogram
    (``kmsguard_operations_total``, ``kmsguard_operation_duration_seconds``), at a
    fraction of their per-operation cost: this runs once per Guard operation.
    """

    LABELS = ("operation", "classification", "outcome")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], Series] = {}

    def series(self, key: tuple[str, str, str]) -> Series:
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, Series(_OP_BUCKETS))
        return series

    def observe(self, key: tuple[str, str, str], seconds: float) -> None:
        self.series(key).add(seconds)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            series = list(self._series.items())
        count = CounterMetricFamily("kmsguard_operations", "Guard operations", labels=self.LABELS)
        latency = HistogramMetricFamily(
            "kmsguard_operation_duration_seconds", "Guard operation latency", labels=self.LABELS
        )
        bounds = [repr(b) for b in _OP_BUCKETS] + ["+Inf"]
        for key, histogram in series:
            n, total, buckets = histogram.snapshot()
            count.add_metric(list(key), n)
            latency.add_metric(list(key), list(zip(bounds, accumulate(buckets), strict=True)), total)
        yield count
        yield latency


def _hit_series(kind: EventKind) -> tuple[str, str, str]:
    return (kind.operation, kind.classification or "none", "ok")


class _ExportedHits(HitTally):
    """Hits counted and, as full operations are, handed to the CloudWatch export."""

    def __init__(self, lookup: Callable[[EventKind], Series], exporter: CloudWatchExport) -> None:
        super().__init__(lookup)
        self.exporter = exporter

    def record(
        self, kind: EventKind, started: float, duration: float, size: int, request: int, caller_id: object
    ) -> None:
        super().record(kind, started, duration, size, request, caller_id)
        self.exporter.add(kind.operation, True, kind.classification, duration)


class CacheEvents(Collector):
    """``kmsguard_cache_events_total`` by event and classification, and ``kmsguard_cache_entries`` by classification.

    Misses and evictions are counted here as they happen; hits are read, when scraped,
    from the caches that count them (``Telemetry.cache_hits``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Tally[tuple[str, str]] = Tally()
        self.hit_sources: list[Callable[[], Mapping[str, int]]] = []
        self.entry_sources: list[Callable[[], Mapping[str, int]]] = []

    def count(self, event: str, classification: str) -> None:
        with self._lock:
            self._counts[(event, classification)] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self._counts)
        for source in list(self.hit_sources):
            for classification, hits in source().items():
                counts[("hit", classification)] = counts.get(("hit", classification), 0) + hits
        family = CounterMetricFamily(
            "kmsguard_cache_events", "Data-key cache hits/misses/evictions", labels=("event", "classification")
        )
        for (event, classification), n in sorted(counts.items()):
            family.add_metric([event, classification], n)
        yield family
        entries: dict[str, int] = {}
        for source in list(self.entry_sources):
            for classification, n in source().items():
                entries[classification] = entries.get(classification, 0) + n
        gauge = GaugeMetricFamily(
            "kmsguard_cache_entries", "Data keys cached now (encrypt and decrypt entries)", labels=("classification",)
        )
        for classification, n in sorted(entries.items()):
            gauge.add_metric([classification], n)
        yield gauge


class BreakerStates(Collector):
    """``kmsguard_region_breaker_state{region, state}``: 1 for each region's current breaker state, 0 for the others.

    Read from the multi-region keyrings when scraped (``Telemetry.breakers``), so a
    breaker that opens and closes again between scrapes is seen through its failovers.
    """

    STATES = ("closed", "open", "half-open")

    def __init__(self) -> None:
        self.sources: list[Callable[[], Mapping[str, str]]] = []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kmsguard_region_breaker_state", "Circuit breaker state per region (1: current)", labels=("region", "state")
        )
        for source in list(self.sources):
            for region, state in sorted(source().items()):
                for name in self.STATES:
                    family.add_metric([region, name], 1.0 if state == name else 0.0)
        yield family


# ---------------------------------------------------------------------- CloudWatch

Dims = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Mirror:
    """One CloudWatch metric read from the registry at each flush.

    ``sample`` is the Prometheus sample it reads, ``dims`` maps its labels to CloudWatch
    dimensions (the labels left out are summed over), ``where`` picks the samples that
    count; a counter is published as its increase since the last flush, a level as it
    is. ``rollups`` are the further dimension sets it is published under, because an
    alarm cannot aggregate over a dimension (``()``: one series for the namespace).
    """

    metric: str
    sample: str
    unit: str
    dims: tuple[tuple[str, str], ...] = ()
    counter: bool = True
    where: Callable[[Mapping[str, str]], bool] | None = None
    rollups: tuple[tuple[str, ...], ...] = ()


_API_REGION = (("api", "Api"), ("region", "Region"))
_KMS_LATENCY_BUCKET = "kmsguard_kms_latency_seconds_bucket"
#: The operational metrics, after OperationCount and OperationDuration: what the alerts
#: of kmsguard.monitoring.prometheus watch, under CloudWatch names.
MIRRORS = (
    Mirror("KmsCalls", "kmsguard_kms_calls_total", "Count", _API_REGION, rollups=(("Region",), ())),
    Mirror("KmsErrors", "kmsguard_kms_calls_total", "Count", _API_REGION,
           where=lambda labels: labels["outcome"] != "ok", rollups=((),)),
    Mirror("KmsThrottles", "kmsguard_kms_throttles_total", "Count", _API_REGION, rollups=(("Region",),)),
    Mirror("Failovers", "kmsguard_failovers_total", "Count", (("from_region", "FromRegion"),)),
    Mirror("RegionBreakerOpen", "kmsguard_region_breaker_state", "Count", (("region", "Region"),), counter=False,
           where=lambda labels: labels["state"] != "closed"),
    Mirror("RegionsAvailable", "kmsguard_region_breaker_state", "Count", counter=False,
           where=lambda labels: labels["state"] == "closed"),
    Mirror("CacheHits", "kmsguard_cache_events_total", "Count", (("classification", "KeyType"),),
           where=lambda labels: labels["event"] == "hit"),
    Mirror("CacheMisses", "kmsguard_cache_events_total", "Count", (("classification", "KeyType"),),
           where=lambda labels: labels["event"] == "miss"),
    Mirror("AuditQueueDepth", "kmsguard_audit_queue_depth", "Count", counter=False),
    Mirror("AuditSpoolBytes", "kmsguard_audit_spool_bytes", "Bytes", counter=False),
    Mirror("AuditDeliveryLag", "kmsguard_audit_delivery_lag_seconds", "Seconds", counter=False),
    Mirror("AuditRecordsDropped", "kmsguard_audit_dropped_records", "Count"),
    Mirror("StrictAuditRefusals", "kmsguard_operation_errors_total", "Count",
           (("operation", "Operation"), ("classification", "KeyType")),
           where=lambda labels: labels["code"] == "AUDIT_UNAVAILABLE", rollups=(("Operation",),)),
    Mirror("SelftestFailedChecks", "kmsguard_selftest_failed_checks", "Count", (("critical", "Critical"),),
           counter=False),
    Mirror("KeyRotationEnabled", "kmsguard_key_rotation_enabled", "None",
           (("classification", "KeyType"), ("region", "Region")), counter=False, rollups=((),)),
    Mirror("HttpRequests", "kmsguard_http_requests_total", "Count"),
    Mirror("HttpErrors", "kmsguard_http_requests_total", "Count",
           where=lambda labels: labels["status"].startswith("5")),
    Mirror("ExportDropped", "kmsguard_cloudwatch_dropped_total", "Count"),
)
#: KMS call latency by Api and Region, from kmsguard_kms_latency_seconds's buckets: each
#: call at its bucket's upper bound (an alarm's p99 is exact when its threshold is a bound).
KMS_LATENCY = "KmsLatency"
KMS_LATENCY_OVERFLOW_MS = 2 * _KMS_BUCKETS[-1] * 1000.0
_UNITS = {m.metric: m.unit for m in MIRRORS} | {KMS_LATENCY: "Milliseconds"}
_ROLLUPS = {m.metric: m.rollups for m in MIRRORS}


class Levels(NamedTuple):
    """The registry at one moment: counters' lifetime totals, keyed (metric, dims, value) where
    value is the latency bucket a count is of (None: the total is the value), and levels."""

    totals: dict[tuple[str, Dims, float | None], float]
    levels: dict[tuple[str, Dims], float]


@dataclass(frozen=True)
class Point:
    """One operational series for one flush: each value and how many times it occurred."""

    metric: str
    dims: Dims
    values: Mapping[float, float]


def dimension_sets(p: Point) -> list[Dims]:
    """The point's own dimensions, then each rollup's."""
    return [p.dims, *(tuple(d for d in p.dims if d[0] in names) for names in _ROLLUPS.get(p.metric, ()))]


def point_lines(namespace: str, points: Iterable[Point], now_ms: int) -> list[str]:
    """Embedded-metric-format documents: one per point and up to 100 values, under all its dimension sets."""
    lines = []
    for p in points:
        values = [v for v, n in sorted(p.values.items()) for _ in range(int(n))]
        for chunk in _chunks(values, EMF_MAX_VALUES):
            value = chunk[0] if len(chunk) == 1 else chunk
            lines.append(_emf_doc(namespace, now_ms, p.dims, dimension_sets(p), {p.metric: (value, _UNITS[p.metric])}))
    return lines


def _emf_doc(namespace: str, now_ms: int, dims: Dims, sets: list[Dims], metrics: dict[str, tuple[Any, str]]) -> str:
    """One EMF document: ``metrics`` maps each name to its value(s) and unit."""
    doc: dict[str, Any] = {
        "_aws": {
            "Timestamp": now_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": [[name for name, _ in d] for d in sets],
                    "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in metrics.items()],
                }
            ],
        },
        **dict(dims),
        **{name: value for name, (value, _) in metrics.items()},
    }
    return json.dumps(doc, separators=(",", ":"))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def point_data(points: Iterable[Point]) -> list[dict[str, Any]]:
    """PutMetricData datums: per metric and dimension set (rollups included), its values and counts."""
    groups: dict[tuple[str, Dims], Tally[float]] = {}
    for p in points:
        for dims in dimension_sets(p):
            groups.setdefault((p.metric, dims), Tally()).update(p.values)
    return [d for (metric, dims), tally in groups.items() for d in _value_sets(metric, _UNITS[metric], dims, tally)]


def _value_sets(metric: str, unit: str, dims: Dims, tally: Tally[float]) -> list[dict[str, Any]]:
    """Datums of at most MAX_VALUES_PER_DATUM values (each with its count) for one series."""
    cw_dims = [{"Name": n, "Value": v} for n, v in dims]
    items = sorted(tally.items())
    return [
        {
            "MetricName": metric,
            "Dimensions": cw_dims,
            "Values": [v for v, _ in chunk],
            "Counts": [float(c) for _, c in chunk],
            "Unit": unit,
        }
        for chunk in _chunks(items, MAX_VALUES_PER_DATUM)
    ]


@dataclass(frozen=True)
class Sample:
    operation: str
    success: bool
    key_type: str
    duration_ms: float


def dimensions(s: Sample) -> tuple[tuple[str, str], ...]:
    return (("Operation", s.operation), ("Success", "true" if s.success else "false"), ("KeyType", s.key_type))


def emf_lines(namespace: str, samples: Iterable[Sample], now_ms: int) -> list[str]:
    """Embedded-metric-format documents: one per dimension set and up to 100 values."""
    groups: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for s in samples:
        groups.setdefault(dimensions(s), []).append(round(s.duration_ms, 3))
    lines = []
    for dims, values in groups.items():
        for chunk in _chunks(values, EMF_MAX_VALUES):
            metrics = {"OperationDuration": (chunk, "Milliseconds"), "OperationCount": (len(chunk), "Count")}
            lines.append(_emf_doc(namespace, now_ms, dims, [dims], metrics))
    return lines


def metric_data(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """PutMetricData datums: per dimension set, OperationCount plus OperationDuration value sets."""
    groups: dict[tuple[tuple[str, str], ...], Tally[float]] = {}
    for s in samples:
        groups.setdefault(dimensions(s), Tally())[round(s.duration_ms, 1)] += 1
    data: list[dict[str, Any]] = []
    for dims, tally in groups.items():
        cw_dims = [{"Name": n, "Value": v} for n, v in dims]
        data.append({"MetricName": "OperationCount", "Dimensions": cw_dims, "Value": tally.total(), "Unit": "Count"})
        data.extend(_value_sets("OperationDuration", "Milliseconds", dims, tally))
    return data


def _values(datum: dict[str, Any]) -> int:
    return len(datum.get("Values", ())) or 1


def batches(data: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split datums into PutMetricData calls of at most MAX_VALUES_PER_CALL values each."""
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    used = 0
    for datum in data:
        n = _values(datum)
        if current and used + n > MAX_VALUES_PER_CALL:
            out.append(current)
            current, used = [], 0
        current.append(datum)
        used += n
    if current:
        out.append(current)
    return out


class CloudWatchExport:
    """A bounded buffer of operation samples, drained by a background thread to EMF and/or PutMetricData.

    With ``levels`` (``Metrics`` sets it to its ``cloudwatch_levels``) each flush also
    publishes the operational metrics: counters as their increase since the previous
    flush (a publication that fails loses that increase, as it loses its samples).
    """

    def __init__(
        self,
        namespace: str,
        *,
        emf: IO[str] | None = None,
        client_factory: Callable[[], Any] | None = None,
        flush_interval: float = 10.0,
        max_buffer: int = 10_000,
    ) -> None:
        self.namespace = namespace
        self.emf = emf
        self.client_factory = client_factory
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.dropped = 0
        self.on_drop: Callable[[float], None] = lambda n: None
        self.levels: Callable[[], Levels] | None = None
        self._published: dict[tuple[str, Dims, float | None], float] = {}
        self._flush_lock = threading.Lock()
        self._buffer: deque[Sample] = deque()
        self._client: Any = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kmsguard-cloudwatch", daemon=True)
        self._thread.start()

    def add(self, operation: str, success: bool, classification: str | None, duration: float) -> None:
        """Hot path: one append, or a counted drop when the buffer is full."""
        if len(self._buffer) >= self.max_buffer:
            self._drop(1)
            return
        self._buffer.append(Sample(operation, success, classification or "none", duration * 1000.0))

    def flush(self) -> None:
        """Export everything buffered now and the operational metrics (the background thread does this every
        interval)."""
        with self._flush_lock:
            samples = []
            while self._buffer:
                samples.append(self._buffer.popleft())
            points = self._points()
            if not samples and not points:
                return
            if self.emf is not None:
                now_ms = int(time.time() * 1000)
                lines = emf_lines(self.namespace, samples, now_ms) + point_lines(self.namespace, points, now_ms)
                self.emf.write("".join(line + "\n" for line in lines))
                self.emf.flush()
            if self.client_factory is not None:
                self._publish(metric_data(samples) + point_data(points))

    def _points(self) -> list[Point]:
        """The operational metrics now: levels as read, counters as their increase since the last flush."""
        if self.levels is None:
            return []
        now = self.levels()
        values: dict[tuple[str, Dims], dict[float, float]] = {}
        for key, total in now.totals.items():
            metric, dims, bound = key
            increase = max(0.0, total - self._published.get(key, 0.0))
            self._published[key] = total
            if bound is None:
                values.setdefault((metric, dims), {})[increase] = 1
            elif increase:
                values.setdefault((metric, dims), {})[bound] = increase
        for (metric, dims), level in now.levels.items():
            values[(metric, dims)] = {level: 1}
        return [Point(metric, dims, v) for (metric, dims), v in sorted(values.items()) if v]

    def _publish(self, data: list[dict[str, Any]]) -> None:
        for batch in batches(data):
            try:
                if self._client is None:
                    self._client = self.client_factory() if self.client_factory else None
                self._client.put_metric_data(Namespace=self.namespace, MetricData=batch)
            except Exception as exc:
                lost = sum(int(sum(d["Counts"])) for d in batch if d["MetricName"] == "OperationDuration")
                self._drop(lost)
                log.warning("CloudWatch PutMetricData failed (%s); %d samples dropped", type(exc).__name__, lost)

    def _drop(self, n: int) -> None:
        self.dropped += n
        self.on_drop(n)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # an exporter must never take the process down
                log.exception("metrics export failed")

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(30)
        self.flush()
        if self.emf is not None and self.emf not in (sys.stdout, sys.stderr):
            self.emf.close()


# ---------------------------------------------------------------------- configuration

_FIELDS = {
    "enabled", "namespace", "emf", "cloudwatch", "region", "endpoint_url", "flush_interval", "max_buffer", "otel"
}


def cloudwatch_client(settings: Settings) -> tuple[str, Any]:
    """The ``[metrics]`` namespace and a CloudWatch client for its ``region`` and ``endpoint_url``."""
    metrics = ConfigTable(settings.section("metrics"), "metrics", _FIELDS)
    namespace = metrics.string("namespace", "kmsguard")
    region = metrics.string("region", "") or None
    endpoint = metrics.string("endpoint_url", "") or None
    return namespace, _cloudwatch_client(region, endpoint)


def build_metrics(settings: Settings) -> Metrics | None:
    """The ``[metrics]`` table::

    [metrics]
    enabled = true            # the Prometheus registry (default on)
    namespace = "kmsguard"    # CloudWatch namespace
    emf = "stdout"            # or a file path (relative to $KMSGUARD_HOME); unset: no EMF lines
    cloudwatch = false        # publish with PutMetricData in the background
    region = "us-east-1"      # for the publisher (default: the AWS SDK's)
    endpoint_url = "..."      # for the publisher (tests, VPC endpoints)
    flush_interval = 10       # seconds between exports
    max_buffer = 10000        # samples held between exports; beyond, dropped and counted
    otel = true               # also through OpenTelemetry (kmsguard[otel]; unset: on when OTEL_* variables are)
    """
    metrics = ConfigTable(settings.section("metrics"), "metrics", _FIELDS)
    enabled = metrics.boolean("enabled", True)
    namespace = metrics.string("namespace", "kmsguard")
    emf_target = metrics.string("emf", "")
    publish = metrics.boolean("cloudwatch", False)
    region = metrics.string("region", "") or None
    endpoint = metrics.string("endpoint_url", "") or None
    flush_interval = metrics.number("flush_interval", 10.0, above=0)
    max_buffer = metrics.integer("max_buffer", 10_000, minimum=1)
    if not enabled:
        return None
    exporter = None
    if emf_target or publish:
        emf: IO[str] | None = None
        if emf_target == "stdout":
            emf = sys.stdout
        elif emf_target:
            path = settings.home / emf_target
            path.parent.mkdir(parents=True, exist_ok=True)
            emf = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the process lifetime
        factory = (lambda: _cloudwatch_client(region, endpoint)) if publish else None
        exporter = CloudWatchExport(
            namespace, emf=emf, client_factory=factory, flush_interval=flush_interval, max_buffer=max_buffer
        )
    return Metrics(exporter)


def build_otel(settings: Settings) -> Telemetry | None:
    """The OpenTelemetry bridge (kmsguard.otel), when ``[metrics] otel = true``, or when it is unset and
    any ``OTEL_*`` variable is (``OTEL_SDK_DISABLED=true`` aside) and the ``kmsguard[otel]`` extra is installed."""
    explicit = ConfigTable(settings.section("metrics"), "metrics", _FIELDS).optional_boolean("otel")
    env = settings.env
    by_env = env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true" and any(n.startswith("OTEL_") for n in env)
    if not (by_env if explicit is None else explicit):
        return None
    try:
        from kmsguard import otel
    except ImportError:
        if explicit:
            raise ConfigurationError("metrics.otel: needs OpenTelemetry: pip install 'kmsguard[otel]'") from None
        return None
    return otel.build_bridge(env)


def _cloudwatch_client(region: str | None, endpoint_url: str | None) -> Any:
    import boto3

    return boto3.client("cloudwatch", region_name=region, endpoint_url=endpoint_url)
