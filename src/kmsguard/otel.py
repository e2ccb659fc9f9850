"""OpenTelemetry bridge (``kmsguard[otel]``): the metrics through the OTel metrics API, and spans.

On when ``[metrics] otel = true``, or when any standard ``OTEL_*`` variable is set and the
extra is installed (``OTEL_SDK_DISABLED=true`` keeps it off). :class:`OtelBridge` is a
:class:`~kmsguard.telemetry.Telemetry` (KMS calls, cache, failovers, levels) and an
operation observer, next to the Prometheus registry (``stack`` hands both the same events).

Spans: one per operation, ``kmsguard.<operation>``, a child of the caller's current span
(observers run on the caller's thread, in its context), with a child ``kms.<API>`` span per
KMS call the operation made. The operation's span is made when the operation has finished
(observers see finished operations, :class:`~kmsguard.fastpath.OperationEvent`), with its
real start and end times. KMS calls are held until then under the running operation
(kmsguard.operation.current), which is still current while Guard tells its observers; a
cache hit served by a plan's lane makes no KMS call and runs under none. Attributes are
names and counts: never a context value, plaintext, ciphertext or key.

The bridge is an ordinary observer: Guard's cache-hit lanes stay on, and each hit reaches
it as an event (kmsguard.fastpath.EventSink).

Metrics: every metric of the Prometheus registry (kmsguard.metrics), named so that
OpenTelemetry's Prometheus conversion (dots to underscores, the unit's suffix, ``_total``
for a counter) gives the registry's own name, with the same attributes as its labels:
``kmsguard.kms.calls`` is ``kmsguard_kms_calls_total``. ``kmsguard_operations_total`` is the
count of ``kmsguard.operation.duration``. tests/test_otel.py holds the two to one set.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from kmsguard import __version__, operation
from kmsguard.fastpath import OperationEvent
from kmsguard.telemetry import Telemetry

if TYPE_CHECKING:
    from kmsguard.aws.admin import KeyStatus

#: KMS calls held for operations still running; beyond this many operations, the oldest are forgotten
#: (an operation that never finishes must not hold memory forever).
_MAX_PENDING = 10_000


@dataclass(frozen=True)
class _KmsCall:
    api: str
    region: str
    outcome: str
    attempts: int
    start_ns: int
    end_ns: int


class OtelBridge(Telemetry):
    """kmsguard's metrics and spans through the global (or given) OpenTelemetry providers. Thread-safe."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self.tracer = trace.get_tracer("kmsguard", __version__, tracer_provider)
        meter = otel_metrics.get_meter("kmsguard", __version__, meter_provider=meter_provider)
        self._meter = meter
        # Its count is the number of operations (OpenTelemetry's convention: no separate counter to pay for).
        self._duration = meter.create_histogram("kmsguard.operation.duration", "s", "Guard operations and latency")
        self._errors = meter.create_counter("kmsguard.operation.errors", "{operation}", "Failed operations by code")
        self._kms_calls = meter.create_counter("kmsguard.kms.calls", "{call}", "KMS API calls")
        self._kms_retries = meter.create_counter("kmsguard.kms.retries", "{attempt}", "KMS attempts beyond the first")
        self._kms_throttles = meter.create_counter("kmsguard.kms.throttles", "{answer}", "KMS throttling answers")
        self._kms_duration = meter.create_histogram("kmsguard.kms.latency", "s", "KMS call latency incl. retries")
        self._failovers = meter.create_counter("kmsguard.failovers", "{failover}", "Region failovers")
        self._hedges = meter.create_counter("kmsguard.hedges", "{call}", "KMS calls repeated in another region")
        self._hedge_wins = meter.create_counter("kmsguard.hedge_wins", "{call}", "Hedges answered first")
        self._http_requests = meter.create_counter(
            "kmsguard.http.requests", "{request}", "HTTP requests answered, by method, route template and status"
        )
        self._export_dropped = meter.create_counter(
            "kmsguard.cloudwatch.dropped", "{sample}", "Operation samples CloudWatch export dropped"
        )
        self._lock = threading.Lock()
        self._cache_counts: Tally[tuple[str, str]] = Tally()
        self._hit_sources: list[Callable[[], Mapping[str, int]]] = []
        self._entry_sources: list[Callable[[], Mapping[str, int]]] = []
        self._breaker_sources: list[Callable[[], Mapping[str, str]]] = []
        self._levels: dict[str, float] = {}
        self._rotation: dict[tuple[str, str], int] = {}
        self._selftest: dict[str, int] = {}
        self._pending: dict[object, list[_KmsCall]] = {}
        meter.create_observable_counter(
            "kmsguard.cache.events", [self._observe_cache], "{event}", "Data-key cache hits, misses, evictions"
        )
        meter.create_observable_gauge(
            "kmsguard.cache.entries", [self._observe_entries], "{key}", "Data keys cached now"
        )
        meter.create_observable_gauge(
            "kmsguard.region.breaker_state", [self._observe_breakers], "", "1 for each region's breaker state"
        )
        meter.create_observable_gauge(
            "kmsguard.key.rotation_enabled", [self._observe_rotation], "",
            "1 when the classification's key rotates automatically in the region, 0 when it does not",
        )
        meter.create_observable_gauge(
            "kmsguard.selftest.failed_checks", [self._observe_selftest], "{check}",
            "Checks that failed in the last self-test run, by whether they are critical",
        )

    # ------------------------------------------------------------------ Observer

    def observe(self, event: OperationEvent) -> None:
        name, outcome, error_code = event.operation, event.outcome, event.error_code
        classification = event.classification or "none"
        labels = {"operation": name, "classification": classification, "outcome": outcome}
        self._duration.record(event.duration, labels)
        if error_code is not None:
            self._errors.add(1, {"operation": name, "classification": classification, "code": error_code})
        running = operation.current.get()
        calls: list[_KmsCall] = []
        if running is not None:
            with self._lock:
                calls = self._pending.pop(running, calls)
        attributes: dict[str, str | bool | int] = {
            "kmsguard.operation": name,
            "kmsguard.classification": classification,
            "kmsguard.outcome": outcome,
            "kmsguard.kms_calls": event.kms_calls,
        }
        if error_code is not None:
            attributes["kmsguard.error_code"] = error_code
        cache_hit = event.cache_hit
        if cache_hit is not None:
            attributes["kmsguard.cache_hit"] = cache_hit
        start = int(event.started_at * 1e9)
        span = self.tracer.start_span(
            f"kmsguard.{name}", kind=SpanKind.INTERNAL, attributes=attributes, start_time=start
        )
        parent = trace.set_span_in_context(span)
        for call in calls:
            self._call_span(call, parent)
        if outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, error_code))
        span.end(end_time=start + int(event.duration * 1e9))

    def _call_span(self, call: _KmsCall, parent: Any = None) -> None:
        span = self.tracer.start_span(
            f"kms.{call.api}",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=call.start_ns,
            attributes={
                "rpc.system": "aws-api",
                "rpc.service": "KMS",
                "rpc.method": call.api,
                "cloud.region": call.region,
                "kmsguard.outcome": call.outcome,
                "kmsguard.attempts": call.attempts,
            },
        )
        if call.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, call.outcome))
        span.end(end_time=call.end_ns)

    # ------------------------------------------------------------------ Telemetry

    def kms_call(
        self, api: str, region: str, outcome: str, duration: float, attempts: int = 1, throttles: int = 0
    ) -> None:
        labels = {"api": api, "region": region}
        self._kms_calls.add(1, {**labels, "outcome": outcome})
        self._kms_duration.record(duration, labels)
        if attempts > 1:
            self._kms_retries.add(attempts - 1, labels)
        if throttles:
            self._kms_throttles.add(throttles, labels)
        end = time.time_ns()
        call = _KmsCall(api, region, outcome, attempts, end - int(duration * 1e9), end)
        key = operation.current.get()
        if key is None:  # not inside an operation (a readiness probe, the audit key): a span of its own
            self._call_span(call)
            return
        with self._lock:
            if key not in self._pending and len(self._pending) >= _MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending.setdefault(key, []).append(call)

    def cache_event(self, event: str, classification: str) -> None:
        with self._lock:
            self._cache_counts[(event, classification)] += 1

    def cache_hits(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._hit_sources.append(source)

    def cache_entries(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._entry_sources.append(source)

    def breakers(self, source: Callable[[], Mapping[str, str]]) -> None:
        self._breaker_sources.append(source)

    def failover(self, from_region: str, to_region: str) -> None:
        self._failovers.add(1, {"from_region": from_region, "to_region": to_region})

    def hedge(self, from_region: str, to_region: str) -> None:
        self._hedges.add(1, {"from_region": from_region, "to_region": to_region})

    def hedge_won(self, from_region: str, to_region: str) -> None:
        self._hedge_wins.add(1, {"from_region": from_region, "to_region": to_region})

    def key_statuses(self, rows: Iterable[KeyStatus]) -> None:
        with self._lock:
            for row in rows:
                if row.rotation_enabled is not None:
                    self._rotation[(row.classification, row.region)] = 1 if row.rotation_enabled else 0

    def selftest_finished(self, failed_critical: int, failed_other: int) -> None:
        with self._lock:
            self._selftest.update({"true": failed_critical, "false": failed_other})

    def http_request(self, method: str, route: str, status: str) -> None:
        self._http_requests.add(1, {"method": method, "route": route, "status": status})

    def export_dropped(self, samples: float) -> None:
        self._export_dropped.add(samples)

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            new = name not in self._levels
            self._levels[name] = value
        if new:
            self._meter.create_observable_gauge(f"kmsguard.{name}", [lambda _: self._observe_level(name)])

    # ------------------------------------------------------------------ observable instruments

    def _observe_level(self, name: str) -> Iterable[Observation]:
        with self._lock:
            return [Observation(self._levels[name])]

    def _observe_cache(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = dict(self._cache_counts)
        for source in list(self._hit_sources):
            for classification, hits in source().items():
                counts[("hit", classification)] = counts.get(("hit", classification), 0) + hits
        return [Observation(n, {"event": e, "classification": c}) for (e, c), n in sorted(counts.items())]

    def _observe_entries(self, _: CallbackOptions) -> Iterable[Observation]:
        entries: Tally[str] = Tally()
        for source in list(self._entry_sources):
            entries.update(source())
        return [Observation(n, {"classification": c}) for c, n in sorted(entries.items())]

    def _observe_rotation(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(v, {"classification": c, "region": r}) for (c, r), v in sorted(self._rotation.items())]

    def _observe_selftest(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(n, {"critical": critical}) for critical, n in sorted(self._selftest.items())]

    def _observe_breakers(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for source in list(self._breaker_sources):
            for region, state in sorted(source().items()):
                out += [Observation(1 if state == s else 0, {"region": region, "state": s})
                        for s in ("closed", "open", "half-open")]
        return out


# ---------------------------------------------------------------------- configuration


def build_bridge(env: Mapping[str, str]) -> OtelBridge:
    """The bridge over the global providers; when the application set none and the environment names an
    OTLP endpoint, the SDK's providers with OTLP/HTTP exporters configured from the environment first."""
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    if any(env.get(name) for name in endpoints):
        _configure_sdk(env)
    return OtelBridge()


def _configure_sdk(env: Mapping[str, str]) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and \
            env.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    if type(otel_metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider" and \
            env.get("OTEL_METRICS_EXPORTER", "otlp") != "none":
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        otel_metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
