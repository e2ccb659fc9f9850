"""A real ``kmsguard serve`` (AWS backend, two moto regions behind fault proxies) with ``[metrics] cloudwatch =
true`` and ``emf``: what it publishes to moto's CloudWatch, read back over HTTP with ListMetrics and
GetMetricData, and what its EMF lines carry, after traffic with a throttle, an outage and a failover."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3

from kmsguard.monitoring import cloudwatch as cw
from kmsguard.testing.region import TEST_ACCESS_KEY, TEST_SECRET_KEY, KmsRegion

from .test_cloudwatch import CLASSES, Series, _used, listed, shapes
from .test_prometheus_scrape import CONTEXT_VALUE, PLAINTEXT, _serve, _traffic

REGIONS = ("us-east-1", "eu-west-1")


def _value(client: Any, namespace: str, metric: str, dims: dict[str, str], stat: str) -> float | None:
    """``stat`` of one series over the last ten minutes (None: no data). GetMetricStatistics, since moto's
    GetMetricData does not keep namespaces apart when dimensions are given (this test's ListMetrics check
    below pins the exact series)."""
    now = datetime.now(UTC)
    answer = client.get_metric_statistics(
        Namespace=namespace, MetricName=metric, Dimensions=[{"Name": k, "Value": v} for k, v in dims.items()],
        StartTime=now - timedelta(minutes=10), EndTime=now + timedelta(minutes=5), Period=900, Statistics=[stat],
    )
    values = [point[stat] for point in answer["Datapoints"]]
    return max(values) if values else None


def test_the_service_publishes_what_the_alarms_watch(tmp_path: Path, kms_regions: Callable[..., list[KmsRegion]]
                                                     ) -> None:
    east, west = kms_regions(*REGIONS)
    namespace = f"kg-ops-{uuid.uuid4().hex[:10]}"
    home = tmp_path / "home"
    service = _serve(home, east, west, (
        f'[metrics]\ncloudwatch = true\nemf = "emf.jsonl"\nnamespace = "{namespace}"\nflush_interval = 0.2\n'
        f'region = "us-east-1"\nendpoint_url = "{east.server.url}"\n'  # moto itself: the outage is KMS's only
    ))
    client = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=east.server.url,
                          aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY)
    wanted: list[tuple[str, dict[str, str], str, Callable[[float], bool]]] = [
        ("KmsThrottles", {"Region": "us-east-1"}, "Sum", lambda v: v >= 1),
        ("KmsCalls", {"Region": "eu-west-1"}, "Sum", lambda v: v >= 1),
        ("KmsErrors", {"Api": "GenerateDataKey", "Region": "us-east-1"}, "Sum", lambda v: v >= 1),
        ("KmsLatency", {"Api": "GenerateDataKey", "Region": "us-east-1"}, "SampleCount", lambda v: v >= 1),
        ("Failovers", {"FromRegion": "us-east-1"}, "Sum", lambda v: v >= 1),
        ("RegionBreakerOpen", {"Region": "us-east-1"}, "Maximum", lambda v: v == 1),
        ("RegionBreakerOpen", {"Region": "eu-west-1"}, "Maximum", lambda v: v == 0),
        ("CacheHits", {"KeyType": "general"}, "Sum", lambda v: v >= 3),
        ("CacheMisses", {"KeyType": "pii"}, "Sum", lambda v: v >= 3),
        ("StrictAuditRefusals", {"Operation": "decrypt"}, "Sum", lambda v: v == 0),
        ("StrictAuditRefusals", {"Operation": "decrypt", "KeyType": "general"}, "Sum", lambda v: v == 0),
        ("SelftestFailedChecks", {"Critical": "true"}, "Maximum", lambda v: v >= 0),
        ("AuditQueueDepth", {}, "SampleCount", lambda v: v >= 1),
        ("AuditRecordsDropped", {}, "SampleCount", lambda v: v >= 1),
        ("HttpRequests", {}, "Sum", lambda v: v >= 10),
        ("HttpErrors", {}, "Sum", lambda v: v <= 1),  # the self-test's answer may be a 503; nothing else is
        *[("KeyRotationEnabled", {"KeyType": c, "Region": r}, "Maximum", lambda v: v in (0, 1))
          for c in CLASSES for r in REGIONS],
    ]
    try:
        _traffic(service.url, east)
        deadline = time.monotonic() + 60
        while True:  # published in the background, every flush_interval
            values = {(m, tuple(d.items()), s): _value(client, namespace, m, d, s) for m, d, s, _ in wanted}
            failing = {k: v for (k, v), (*_, ok) in zip(values.items(), wanted, strict=True) if v is None or not ok(v)}
            if not failing:
                break
            assert time.monotonic() < deadline, failing
            time.sleep(0.5)
    finally:
        service.stop()

    published = listed(client, namespace)
    exact = {(namespace, m, tuple(sorted(d.items()))) for m, d, *_ in wanted}
    assert exact <= published, sorted(exact - published)
    used = _used(cw.Target(namespace, CLASSES, "us-east-1", regions=REGIONS))
    assert shapes(used) <= shapes(published), sorted(shapes(used) - shapes(published))
    rollups: set[Series] = {(namespace, m, ()) for m in ("KmsCalls", "KmsErrors", "RegionsAvailable",
                                                         "KeyRotationEnabled")}
    assert rollups <= published

    # The EMF lines carry the same metrics, dimensions and rollups.
    docs = [json.loads(line) for line in (home / "emf.jsonl").read_text().splitlines()]
    emf: dict[str, list[list[str]]] = {}
    for doc in docs:
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == namespace
            for metric in directive["Metrics"]:
                emf[metric["Name"]] = directive["Dimensions"]
    assert emf["KmsCalls"] == [["Api", "Region"], ["Region"], []]
    assert emf["KmsThrottles"] == [["Api", "Region"], ["Region"]]
    assert emf["Failovers"] == [["FromRegion"]]
    assert emf["StrictAuditRefusals"] == [["Operation", "KeyType"], ["Operation"]]
    assert emf["CacheHits"] == emf["CacheMisses"] == [["KeyType"]]
    assert emf["KeyRotationEnabled"] == [["KeyType", "Region"], []]
    assert emf["AuditQueueDepth"] == emf["RegionsAvailable"] == [[]]
    throttled = [d["KmsThrottles"] for d in docs if d.get("Region") == "us-east-1" and "KmsThrottles" in d]
    assert sum(throttled) >= 1

    # No context value or plaintext anywhere: not in a dimension, not in an EMF line.
    secrets = [PLAINTEXT, CONTEXT_VALUE, base64.b64encode(PLAINTEXT.encode()).decode()]
    names = {x for _, metric, dims in published for pair in dims for x in (metric, *pair)}
    for secret in secrets:
        assert not any(secret in n for n in names)
        assert secret not in (home / "emf.jsonl").read_text()
    assert {"us-east-1", "general", "GenerateDataKey"} <= names
