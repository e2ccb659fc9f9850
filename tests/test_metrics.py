"""The metrics registry, the EMF lines and the CloudWatch publisher (against moto's server over HTTP)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmsguard.fastpath import OperationEvent
from kmsguard.metrics import (
    EMF_MAX_VALUES,
    MAX_VALUES_PER_CALL,
    MAX_VALUES_PER_DATUM,
    CloudWatchExport,
    Metrics,
    Point,
    Sample,
    batches,
    emf_lines,
    metric_data,
    point_data,
    point_lines,
)
from kmsguard.operation import Operation
from kmsguard.testing.moto_server import MotoServer, free_port


def finished(
    name: str = "encrypt", cls: str = "general", error: Exception | None = None, duration: float | None = None
) -> OperationEvent:
    op = Operation(name, cls, {}, "p")
    op.finish(error)
    if duration is not None:
        op.duration = duration
    return op.event()


def test_telemetry_feeds_the_registry() -> None:
    m = Metrics()
    m.kms_call("GenerateDataKey", "eu-west-1", "ok", 0.02, attempts=3, throttles=2)
    m.cache_hits(lambda: {"pii": 5})
    m.cache_hits(lambda: {"pii": 2, "general": 1})
    m.cache_event("evict", "pii")
    m.failover("eu-west-1", "eu-central-1")
    m.gauge("audit_queue_depth", 7)
    m.gauge("Bad Name!", 1)  # ignored: not a metric name
    text = m.exposition().decode()
    assert 'kmsguard_kms_calls_total{api="GenerateDataKey",outcome="ok",region="eu-west-1"} 1.0' in text
    assert 'kmsguard_kms_retries_total{api="GenerateDataKey",region="eu-west-1"} 2.0' in text
    assert 'kmsguard_kms_throttles_total{api="GenerateDataKey",region="eu-west-1"} 2.0' in text
    assert 'kmsguard_kms_latency_seconds_count{api="GenerateDataKey",region="eu-west-1"} 1.0' in text
    assert 'kmsguard_cache_events_total{classification="pii",event="evict"} 1.0' in text
    assert 'kmsguard_cache_events_total{classification="pii",event="hit"} 7.0' in text
    assert 'kmsguard_cache_events_total{classification="general",event="hit"} 1.0' in text
    assert 'kmsguard_failovers_total{from_region="eu-west-1",to_region="eu-central-1"} 1.0' in text
    assert "kmsguard_audit_queue_depth 7.0" in text
    assert "Bad" not in text


def test_operations_by_operation_classification_and_outcome() -> None:
    from kmsguard.errors import KeyDisabled

    m = Metrics()
    for _ in range(3):
        m.observe(finished())
    m.observe(finished("decrypt", "pii", KeyDisabled()))
    text = m.exposition().decode()
    assert 'kmsguard_operations_total{classification="general",operation="encrypt",outcome="ok"} 3.0' in text
    assert 'kmsguard_operations_total{classification="pii",operation="decrypt",outcome="error"} 1.0' in text
    assert 'kmsguard_operation_errors_total{classification="pii",code="KEY_DISABLED",operation="decrypt"} 1.0' in text


def test_emf_lines_carry_the_named_metrics_and_dimensions() -> None:
    samples = [Sample("encrypt", True, "payment", 1.5)] * 150 + [Sample("decrypt", False, "pii", 2.0)]
    lines = [json.loads(line) for line in emf_lines("kg-test", samples, 1_700_000_000_000)]
    assert len(lines) == 3  # 150 values split at EMF's 100 per document, plus the other dimension set
    doc = lines[0]
    directive = doc["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "kg-test"
    assert directive["Dimensions"] == [["Operation", "Success", "KeyType"]]
    assert {m["Name"] for m in directive["Metrics"]} == {"OperationDuration", "OperationCount"}
    assert (doc["Operation"], doc["Success"], doc["KeyType"]) == ("encrypt", "true", "payment")
    assert doc["OperationCount"] == 100 and len(doc["OperationDuration"]) == 100
    assert lines[2]["Success"] == "false" and lines[2]["OperationCount"] == 1


def test_put_metric_data_batches_hold_at_most_1000_values() -> None:
    samples = [Sample(op, ok, "general", float(i % 700)) for i in range(5000) for op, ok in [("encrypt", True)]]
    samples += [Sample(f"op{i % 40}", i % 2 == 0, "pii", float(i)) for i in range(3000)]
    calls = batches(metric_data(samples))
    assert len(calls) > 1
    for call in calls:
        assert sum(len(d.get("Values", ())) or 1 for d in call) <= MAX_VALUES_PER_CALL
        assert all(len(d.get("Values", ())) <= 150 for d in call)
    counted = sum(d["Value"] for call in calls for d in call if d["MetricName"] == "OperationCount")
    assert counted == 8000
    durations = sum(sum(d["Counts"]) for call in calls for d in call if d["MetricName"] == "OperationDuration")
    assert durations == 8000


def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    m = Metrics(CloudWatchExport("ns", emf=io.StringIO(), flush_interval=3600, max_buffer=5))
    for _ in range(8):
        m.observe(finished())
    assert m.exporter is not None and m.exporter.dropped == 3
    assert "kmsguard_cloudwatch_dropped_total 3.0" in m.exposition().decode()
    m.close()


def test_cache_hits_reach_the_cloudwatch_export_too(tmp_path: Path) -> None:
    from kmsguard import Guard
    from kmsguard.keyrings.caching import CachingKeyring
    from kmsguard.keyrings.local import KEY_FILE_NAME, LocalKeyring
    from kmsguard.policy import Policy

    names = ("general", "pii", "payment")
    keyring = LocalKeyring.create(tmp_path / KEY_FILE_NAME, names)
    policy = Policy.defaults({n: f"local:{n}" for n in names})
    emf = io.StringIO()
    m = Metrics(CloudWatchExport("ns", emf=emf, flush_interval=3600))
    guard = Guard(policy, CachingKeyring(keyring, policy, telemetry=m), observers=[m])
    for _ in range(6):  # a miss, a hit in full, then hits through the lane
        guard.encrypt(b"x", "general")
    assert m.exporter is not None
    m.exporter.flush()
    docs = [json.loads(line) for line in emf.getvalue().splitlines()]
    values = [v for doc in docs for v in doc.get("OperationDuration", ())]
    assert len(values) == 6
    # The cache's own counts, read at the flush: one miss, five hits.
    cache = {(name, doc["KeyType"]): doc[name] for doc in docs for name in ("CacheHits", "CacheMisses") if name in doc}
    assert cache == {("CacheHits", "general"): 5.0, ("CacheMisses", "general"): 1.0}
    m.close()


def _emf(emf: io.StringIO) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in emf.getvalue().splitlines()]
    emf.seek(0)
    emf.truncate()
    return docs


def test_operational_metrics_are_published_as_increases_and_levels() -> None:
    emf = io.StringIO()
    m = Metrics(CloudWatchExport("ns", emf=emf, flush_interval=3600))
    assert m.exporter is not None
    for _ in range(2):
        m.kms_call("GenerateDataKey", "us-east-1", "ok", 0.012)
    m.gauge("audit_queue_depth", 5)
    m.exporter.flush()
    first = _emf(emf)
    m.kms_call("GenerateDataKey", "us-east-1", "ThrottlingException", 0.7, throttles=1)
    m.gauge("audit_queue_depth", 3)
    m.exporter.flush()
    second = _emf(emf)

    def values(docs: list[dict[str, Any]], name: str) -> list[float]:
        out = [d[name] for d in docs if name in d]
        return [v for x in out for v in (x if isinstance(x, list) else [x])]

    assert values(first, "KmsCalls") == [2.0] and values(second, "KmsCalls") == [1.0]  # increases, not totals
    assert values(first, "KmsErrors") == [0.0] and values(second, "KmsErrors") == [1.0]
    assert values(first, "KmsThrottles") == [] and values(second, "KmsThrottles") == [1.0]  # from its first on
    # Each call at its latency bucket's upper bound, in ms: 12 ms -> 25, 700 ms -> 1000.
    assert values(first, "KmsLatency") == [25.0, 25.0] and values(second, "KmsLatency") == [1000.0]
    assert values(first, "AuditQueueDepth") == [5.0] and values(second, "AuditQueueDepth") == [3.0]  # levels
    calls = next(d for d in second if "KmsCalls" in d)
    assert (calls["Api"], calls["Region"]) == ("GenerateDataKey", "us-east-1")
    assert calls["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Api", "Region"], ["Region"], []]
    m.close()


def test_rollups_carry_every_point_value() -> None:
    """Under a rollup, PutMetricData sends each point's value (as EMF's documents do), so Sum, Minimum and
    Maximum over the rollup are those over the points."""
    points = [
        Point("KmsCalls", (("Api", "Decrypt"), ("Region", "us-east-1")), {3.0: 1}),
        Point("KmsCalls", (("Api", "Encrypt"), ("Region", "us-east-1")), {3.0: 1}),
        Point("KmsCalls", (("Api", "Decrypt"), ("Region", "eu-west-1")), {4.0: 1}),
    ]
    data = {(d["MetricName"], tuple(x["Value"] for x in d["Dimensions"])): d for d in point_data(points)}
    assert sorted(data) == [
        ("KmsCalls", ()),
        ("KmsCalls", ("Decrypt", "eu-west-1")),
        ("KmsCalls", ("Decrypt", "us-east-1")),
        ("KmsCalls", ("Encrypt", "us-east-1")),
        ("KmsCalls", ("eu-west-1",)),
        ("KmsCalls", ("us-east-1",)),
    ]
    assert (data[("KmsCalls", ("us-east-1",))]["Values"], data[("KmsCalls", ("us-east-1",))]["Counts"]) == (
        [3.0], [2.0]
    )
    assert data[("KmsCalls", ())]["Values"] == [3.0, 4.0] and data[("KmsCalls", ())]["Counts"] == [2.0, 1.0]


@given(st.lists(st.tuples(st.sampled_from(["us-east-1", "eu-west-1"]),
                          st.dictionaries(st.floats(0, 60_000, allow_nan=False), st.integers(1, 400), max_size=30)),
                max_size=6))
def test_latency_points_keep_every_call_within_the_limits(series: list[tuple[str, dict[float, int]]]) -> None:
    points = [Point("KmsLatency", (("Api", "Decrypt"), ("Region", r)), v) for r, v in series if v]
    expected = sum(n for p in points for n in p.values.values())
    data = point_data(points)
    assert all(len(d["Values"]) <= MAX_VALUES_PER_DATUM for d in data)
    assert sum(sum(d["Counts"]) for d in data) == expected
    assert all(sum(len(d["Values"]) for d in call) <= MAX_VALUES_PER_CALL for call in batches(data))
    docs = [json.loads(line) for line in point_lines("ns", points, 0)]
    emf_values = [d["KmsLatency"] if isinstance(d["KmsLatency"], list) else [d["KmsLatency"]] for d in docs]
    assert all(len(v) <= EMF_MAX_VALUES for v in emf_values)
    assert sum(len(v) for v in emf_values) == expected


# ---------------------------------------------------------------------- moto's CloudWatch over HTTP


@pytest.fixture
def moto_url(kms_server: MotoServer) -> str:
    """The session's moto server (kmsguard.testing): it serves CloudWatch as well as KMS, over HTTP."""
    return kms_server.url


@pytest.fixture
def cloudwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)


class CountingClient:
    """A real CloudWatch client that also remembers how many values each call carried."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.values: list[int] = []

    def put_metric_data(self, **kwargs: Any) -> Any:
        self.values.append(sum(len(d.get("Values", ())) or 1 for d in kwargs["MetricData"]))
        return self.client.put_metric_data(**kwargs)


def test_publisher_sends_batches_to_cloudwatch(moto_url: str, cloudwatch_env: None) -> None:
    namespace = f"kg-{os.getpid()}-{time.monotonic_ns()}"
    client = CountingClient(boto3.client("cloudwatch", endpoint_url=moto_url, region_name="us-east-1"))
    m = Metrics(CloudWatchExport(namespace, client_factory=lambda: client, flush_interval=3600, max_buffer=100_000))
    for i in range(3000):
        # 400 distinct durations: more than one datum's 150 values
        m.observe(finished("encrypt", "payment", duration=(i % 400) / 1e5))
    m.observe(finished("decrypt", "pii", RuntimeError()))
    m.close()
    assert client.values and max(client.values) <= MAX_VALUES_PER_CALL and len(client.values) >= 1
    pages = client.client.get_paginator("list_metrics").paginate(Namespace=namespace)
    listed = [metric for page in pages for metric in page["Metrics"]]
    names = {(x["MetricName"], tuple(sorted((d["Name"], d["Value"]) for d in x["Dimensions"]))) for x in listed}
    assert ("OperationCount", (("KeyType", "payment"), ("Operation", "encrypt"), ("Success", "true"))) in names
    assert ("OperationDuration", (("KeyType", "pii"), ("Operation", "decrypt"), ("Success", "false"))) in names
    stats = client.client.get_metric_statistics(
        Namespace=namespace,
        MetricName="OperationCount",
        Dimensions=[
            {"Name": "Operation", "Value": "encrypt"},
            {"Name": "Success", "Value": "true"},
            {"Name": "KeyType", "Value": "payment"},
        ],
        StartTime=time.time() - 600,
        EndTime=time.time() + 600,
        Period=60,
        Statistics=["Sum"],
    )
    assert sum(p["Sum"] for p in stats["Datapoints"]) == 3000
    assert m.exporter is not None and m.exporter.dropped == 0


def test_publisher_failures_are_counted_not_raised(cloudwatch_env: None) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    m = Metrics(
        CloudWatchExport(
            "ns",
            client_factory=lambda: boto3.client(
                "cloudwatch",
                endpoint_url=dead,
                region_name="us-east-1",
                config=__import__("botocore.config").config.Config(retries={"max_attempts": 1}, connect_timeout=1),
            ),
            flush_interval=3600,
        )
    )
    for _ in range(10):
        m.observe(finished())  # never blocks on the dead endpoint
    m.close()
    assert m.exporter is not None and m.exporter.dropped == 10
    assert "kmsguard_cloudwatch_dropped_total 10.0" in m.exposition().decode()


def test_operation_histogram_buckets_are_cumulative() -> None:
    m = Metrics()
    for seconds in (0.0001, 0.003, 2.0, 100.0):
        m.observe(finished(duration=seconds))
    text = m.exposition().decode()
    series = 'classification="general",le="{}",operation="encrypt",outcome="ok"'
    assert f"kmsguard_operation_duration_seconds_bucket{{{series.format('0.0001')}}} 1.0" in text  # le is inclusive
    assert f"kmsguard_operation_duration_seconds_bucket{{{series.format('0.0025')}}} 1.0" in text
    assert f"kmsguard_operation_duration_seconds_bucket{{{series.format('0.005')}}} 2.0" in text
    assert f"kmsguard_operation_duration_seconds_bucket{{{series.format('5.0')}}} 3.0" in text
    assert f"kmsguard_operation_duration_seconds_bucket{{{series.format('+Inf')}}} 4.0" in text
    labels = 'classification="general",operation="encrypt",outcome="ok"'
    assert f"kmsguard_operation_duration_seconds_sum{{{labels}}} 102.0031" in text
