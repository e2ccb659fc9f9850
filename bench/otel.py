"""What the OpenTelemetry bridge adds to a cache-hit 1 KiB encrypt, against the same Guard with the
Prometheus registry alone (kmsguard's default observer), in the same run.

The bridge runs on the SDK as an application would set it up: a TracerProvider with a
BatchSpanProcessor (its exporter discards the batches, so export costs nothing here) and a
MeterProvider with a reader that is never collected during the timing. The bridge is an
ordinary observer: cache hits stay on Guard's lanes and reach it as events, a span each.
"""

from __future__ import annotations

import os
import tempfile
import timeit
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.common import table
from kmsguard import Guard
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.local import LocalKeyring
from kmsguard.metrics import Metrics
from kmsguard.otel import OtelBridge
from kmsguard.policy import Policy
from kmsguard.telemetry import Telemetries

SIZE = 1024
NUMBER = 5_000
REPEAT = 9


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        names = ("general", "pii", "payment")
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json", names)
        policy = Policy.defaults({n: f"local:{n}" for n in names})
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(_Discard()))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

        prometheus = Metrics()
        plain = Guard(policy, CachingKeyring(keyring, policy, telemetry=prometheus), observers=[prometheus])
        metrics = Metrics()
        bridge = OtelBridge(tracer_provider, meter_provider)
        both = Telemetries([metrics, bridge])
        traced = Guard(policy, CachingKeyring(keyring, policy, telemetry=both), observers=[metrics, bridge])
        data = os.urandom(SIZE)
        context = {"tenant": "t-42"}
        for guard in (plain, traced):
            guard.encrypt(data, "general", context)  # warm the cache

        best_plain = best_traced = float("inf")
        for _ in range(REPEAT):  # alternating, so load hits both alike
            t = timeit.timeit(lambda: plain.encrypt(data, "general", context), number=NUMBER)
            best_plain = min(best_plain, t / NUMBER * 1e6)
            t = timeit.timeit(lambda: traced.encrypt(data, "general", context), number=NUMBER)
            best_traced = min(best_traced, t / NUMBER * 1e6)
        tracer_provider.shutdown()
        meter_provider.shutdown()
    return {"prometheus_us": best_plain, "otel_us": best_traced, "ratio": best_plain / best_traced}


def main() -> None:
    r = measure()
    print(f"{SIZE} B encrypt on a cache hit, best of {REPEAT} x {NUMBER:,} calls, alternating")
    print(table(["Prometheus only us", "+ OpenTelemetry us", "ratio (Prometheus/+OTel)"],
                [[f"{r['prometheus_us']:.2f}", f"{r['otel_us']:.2f}", f"{r['ratio']:.2f}"]]))


if __name__ == "__main__":
    main()
