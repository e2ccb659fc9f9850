"""The OpenTelemetry bridge (kmsguard.otel) through the SDK's in-memory exporters: span names,
attributes, parenting, the KMS call spans, the metrics, and no context value or data anywhere."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric, Sum
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from kmsguard import metrics
from kmsguard.config import load_settings
from kmsguard.errors import ContextMismatch
from kmsguard.fastpath import OperationEvent
from kmsguard.guard import Guard
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.otel import OtelBridge
from kmsguard.policy import Policy
from kmsguard.stack import build_telemetry
from kmsguard.telemetry import Telemetries
from monitoring.exported import fed_registry, feed

SECRET_VALUE = "ctx-value-7f3a9c"
PLAINTEXT = b"card 4111111111111111"
SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def providers() -> None:
    """The SDK as an application would set it up, once per process (OpenTelemetry's globals are set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(SPANS))
        trace.set_tracer_provider(provider)
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


@pytest.fixture
def guard(kmsguard_aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Guard]:
    home = tmp_path / "kmsguard-home"
    home.mkdir(exist_ok=True)
    (home / "kmsguard.toml").write_text("[metrics]\notel = true\n")
    SPANS.clear()
    with Guard.from_env() as g:
        yield g


def _attributes(spans: list[ReadableSpan]) -> list[Any]:
    return [v for s in spans for v in (s.name, *(s.attributes or {}).keys(), *(s.attributes or {}).values())]


def test_an_operation_is_a_span_under_the_callers_with_a_child_per_kms_call(guard: Guard) -> None:
    caller = trace.get_tracer("app")
    context = {"purpose": SECRET_VALUE, "order": "o-1"}
    with caller.start_as_current_span("checkout") as parent:
        token = guard.encrypt(PLAINTEXT, "payment", context)
    spans = SPANS.get_finished_spans()
    (op,) = [s for s in spans if s.name == "kmsguard.encrypt"]
    assert op.parent is not None and op.parent.span_id == parent.get_span_context().span_id
    assert op.context.trace_id == parent.get_span_context().trace_id
    kms = [s for s in spans if s.name.startswith("kms.")]
    assert dict(op.attributes or {}) == {
        "kmsguard.operation": "encrypt",
        "kmsguard.classification": "payment",
        "kmsguard.outcome": "ok",
        "kmsguard.kms_calls": len(kms),
        "kmsguard.cache_hit": False,
    }
    assert "kms.GenerateDataKey" in [s.name for s in kms]
    for call in kms:
        assert call.parent is not None and call.parent.span_id == op.context.span_id
        assert call.attributes is not None and call.attributes["cloud.region"] == "us-east-1"
        assert call.attributes["rpc.method"] == call.name.removeprefix("kms.")
        assert op.start_time is not None and call.start_time is not None and op.start_time <= call.start_time
        assert op.end_time is not None and call.end_time is not None and call.end_time <= op.end_time

    SPANS.clear()
    guard.encrypt(PLAINTEXT, "payment", context)  # the cached data key: no KMS call
    (hit,) = SPANS.get_finished_spans()
    assert hit.attributes is not None and hit.attributes["kmsguard.cache_hit"] is True
    assert hit.attributes["kmsguard.kms_calls"] == 0
    assert hit.parent is None  # no caller span now: a root span

    SPANS.clear()
    with pytest.raises(ContextMismatch):
        guard.decrypt(token, {"purpose": "another-" + SECRET_VALUE, "order": "o-1"})
    (failed,) = [s for s in SPANS.get_finished_spans() if s.name == "kmsguard.decrypt"]
    assert failed.attributes is not None and failed.attributes["kmsguard.outcome"] == "error"
    assert failed.attributes["kmsguard.error_code"] == "CONTEXT_MISMATCH"
    assert failed.status.status_code is StatusCode.ERROR


def test_the_bridge_keeps_cache_hits_on_the_lanes_and_each_is_a_span(keyring: LocalKeyring) -> None:
    policy = Policy.defaults({n: f"local:{n}" for n in ("general", "pii", "payment")})
    seen: list[OperationEvent] = []

    class Collect:
        def observe(self, event: OperationEvent) -> None:
            seen.append(event)

    guard = Guard(policy, CachingKeyring(keyring, policy), observers=[OtelBridge(), Collect()])
    SPANS.clear()
    for _ in range(4):
        guard.encrypt(PLAINTEXT, "general")
    spans = SPANS.get_finished_spans()
    assert [s.attributes["kmsguard.cache_hit"] for s in spans if s.attributes] == [False, True, True, True]
    assert seen[2].kind is seen[1].kind and seen[3].kind is seen[1].kind  # served by the plan's lane


def test_no_context_value_plaintext_or_key_in_any_span(guard: Guard) -> None:
    context = {"purpose": SECRET_VALUE}
    token = guard.encrypt(PLAINTEXT, "payment", context)
    assert guard.decrypt(token, context) == PLAINTEXT
    guard.rewrap(token, context)
    spans = SPANS.get_finished_spans()
    assert {s.name for s in spans} >= {"kmsguard.encrypt", "kmsguard.decrypt", "kmsguard.rewrap"}
    text = repr(_attributes(spans)) + repr([s.events for s in spans])
    for secret in (SECRET_VALUE, PLAINTEXT.decode(), token[-24:].hex(), repr(token[-24:])[2:-1], "purpose"):
        assert secret not in text
    assert "payment" in text  # control: the scan reads what the spans carry


def test_the_metrics_go_through_the_otel_meter_too(guard: Guard) -> None:
    guard.encrypt(PLAINTEXT, "pii", {"purpose": SECRET_VALUE})
    data = READER.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name == "kmsguard":
                for metric in scope.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
    assert {"kmsguard.operation.duration", "kmsguard.kms.calls", "kmsguard.kms.latency",
            "kmsguard.cache.events"} <= set(points)
    ops = {tuple(sorted(p.attributes.items())): p.count for p in points["kmsguard.operation.duration"]}
    assert ops[(("classification", "pii"), ("operation", "encrypt"), ("outcome", "ok"))] >= 1
    assert SECRET_VALUE not in repr(points)
    # The Prometheus registry still counts alongside.
    registry = metrics.of(guard.observers)
    assert registry is not None and b'operation="encrypt"' in registry.exposition()


def _prometheus_name(metric: Metric) -> str:
    """The name OpenTelemetry's Prometheus compatibility rules give an instrument: dots to underscores, the
    unit's suffix ({annotations} dropped, s to seconds), _total for a monotonic sum."""
    name = metric.name.replace(".", "_")
    unit = re.sub(r"\{[^}]*\}", "", metric.unit or "")
    suffix = {"s": "seconds", "By": "bytes", "1": "ratio"}.get(unit, unit)
    if suffix and not name.endswith(f"_{suffix}"):
        name += f"_{suffix}"
    return name + ("_total" if isinstance(metric.data, Sum) and metric.data.is_monotonic else "")


def test_every_metric_of_the_prometheus_registry_goes_through_otel_with_its_labels() -> None:
    """The bridge and the registry, each told one of everything kmsguard reports: the same metrics under the
    names OpenTelemetry gives them in Prometheus, with the same attributes as labels."""
    reader = InMemoryMetricReader()
    feed(OtelBridge(TracerProvider(), MeterProvider(metric_readers=[reader])))
    otel: dict[str, set[str]] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                otel[_prometheus_name(metric)] = {k for p in metric.data.data_points for k in p.attributes or {}}
    prometheus: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(fed_registry().exposition().decode()):
        if family.name.endswith("_created"):  # prometheus_client's creation time of each counter's series
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        prometheus[name] = {label for sample in family.samples for label in sample.labels} - {"le"}
    assert len(prometheus) >= 20
    # An OpenTelemetry histogram carries its count: kmsguard_operations_total is kmsguard.operation.duration's.
    assert prometheus.pop("kmsguard_operations_total") == otel["kmsguard_operation_duration_seconds"]
    assert otel == prometheus


def test_the_cloudwatch_exports_drops_reach_the_bridge_too(tmp_path: Path) -> None:
    """The registry owns the CloudWatch export; with OpenTelemetry on, what it drops is counted by both."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "kmsguard.toml").write_text('[metrics]\notel = true\nemf = "emf.jsonl"\nmax_buffer = 1\n'
                                        "flush_interval = 3600\n")
    telemetry = build_telemetry(load_settings({"KMSGUARD_HOME": str(home)}))
    assert isinstance(telemetry, Telemetries)
    registry, bridge = telemetry.parts
    assert isinstance(registry, metrics.Metrics) and isinstance(bridge, OtelBridge) and registry.exporter
    try:
        for _ in range(3):
            registry.exporter.add("encrypt", True, "general", 0.001)  # the buffer holds one: two dropped
    finally:
        registry.close()
    assert "kmsguard_cloudwatch_dropped_total 2.0" in registry.exposition().decode()
    dropped = [point.value for resource in READER.get_metrics_data().resource_metrics
               for scope in resource.scope_metrics for metric in scope.metrics
               if metric.name == "kmsguard.cloudwatch.dropped" for point in metric.data.data_points]
    assert dropped and dropped[0] >= 2


def test_otel_is_on_by_setting_or_by_otel_variables(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    base = {"KMSGUARD_HOME": str(home)}

    def bridges(env: dict[str, str], config: str = "") -> list[object]:
        (home / "kmsguard.toml").write_text(config)
        telemetry = build_telemetry(load_settings({**base, **env}))
        parts = telemetry.parts if isinstance(telemetry, Telemetries) else [telemetry]
        return [p for p in parts if isinstance(p, OtelBridge)]

    assert bridges({}) == []
    assert len(bridges({}, "[metrics]\notel = true\n")) == 1
    assert len(bridges({"OTEL_SERVICE_NAME": "billing"})) == 1
    assert bridges({"OTEL_SERVICE_NAME": "billing"}, "[metrics]\notel = false\n") == []
    assert bridges({"OTEL_SERVICE_NAME": "billing", "OTEL_SDK_DISABLED": "true"}) == []


def test_async_guard_operations_are_parented_to_the_callers_span_too(guard: Guard) -> None:
    """AsyncGuard runs KMS work on its pool, in a copy of the caller's context: the span still nests."""
    from kmsguard.aio import AsyncGuard

    async def run() -> tuple[int, int]:
        aguard = AsyncGuard(guard)
        try:
            with trace.get_tracer("app").start_as_current_span("handler") as parent:
                await aguard.encrypt(PLAINTEXT, "pii", {"n": "1"})  # a cache miss: the pool
                await aguard.encrypt(PLAINTEXT, "pii", {"n": "1"})  # a cache hit: inline
            return parent.get_span_context().span_id, parent.get_span_context().trace_id
        finally:
            await aguard.close()

    parent_id, trace_id = asyncio.run(run())
    ops = [s for s in SPANS.get_finished_spans() if s.name == "kmsguard.encrypt"]
    assert len(ops) == 2
    for op in ops:
        assert op.parent is not None and op.parent.span_id == parent_id and op.context.trace_id == trace_id
    assert [op.attributes["kmsguard.cache_hit"] for op in ops if op.attributes] == [False, True]


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each export's path and protobuf body."""

    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


_SCRIPT = """
from opentelemetry import metrics, trace
from kmsguard import Guard
with Guard.from_env() as guard:
    guard.encrypt(b"x", "general", {"order": "o-1"})
trace.get_tracer_provider().force_flush()
metrics.get_meter_provider().force_flush()
"""


def test_otel_variables_alone_export_over_otlp(keyring: LocalKeyring, home: Path) -> None:
    """A process with no SDK set up of its own: OTEL_* variables make kmsguard configure one, exporting over
    OTLP/HTTP to the endpoint they name, with the service name they give."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({"KMSGUARD_HOME": str(home), "OTEL_SERVICE_NAME": "billing",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                    "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
        done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
        server.server_close()
    traces = [body for path, body in _Collector.received if path == "/v1/traces"]
    assert traces and any(path == "/v1/metrics" for path, _ in _Collector.received)
    request = ExportTraceServiceRequest()
    request.ParseFromString(traces[0])
    (resource,) = request.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    names = [span.name for scope in resource.scope_spans for span in scope.spans]
    assert service == "billing" and "kmsguard.encrypt" in names
    assert b"o-1" not in b"".join(body for _, body in _Collector.received)
