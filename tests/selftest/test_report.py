"""The report as a format: every report validates against the shipped schema, and its verdict follows the rules."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from kmsguard.selftest.report import STATUSES, Report, Result, percentile

from .conftest import validate

results = st.builds(
    Result,
    id=st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
    title=st.text(min_size=1, max_size=40),
    critical=st.booleans(),
    status=st.sampled_from(STATUSES),
    detail=st.text(min_size=1, max_size=80),
    subject=st.none() | st.text(max_size=20),
    duration_ms=st.floats(min_value=0, max_value=1e7),
)


@given(st.lists(results, max_size=30), st.booleans(), st.sampled_from(["selftest", "smoke"]))
def test_every_report_matches_the_schema_and_its_verdict(items: list[Result], strict: bool, kind: str) -> None:
    report = Report(kind, strict=strict, results=list(items), facts={"backend": "local"})
    doc = json.loads(json.dumps(report.to_dict()))
    validate(doc)
    critical_failed = any(r.critical and r.status == "fail" for r in items)
    anything_wrong = any(r.status in ("warn", "fail") for r in items)
    assert doc["ok"] is (not critical_failed and not (strict and anything_wrong))
    assert doc["exit_code"] == (0 if doc["ok"] else 1)
    flags = [c["critical"] for c in doc["checks"]]
    assert flags == sorted(flags, reverse=True), "critical results first"
    assert sum(doc["counts"].values()) == len(items)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200))
def test_percentiles_are_samples_and_ordered(samples: list[float]) -> None:
    p50, p95, p99 = (percentile(samples, q) for q in (0.5, 0.95, 0.99))
    assert p50 in samples and p99 in samples
    assert min(samples) <= p50 <= p95 <= p99 <= max(samples)
    assert percentile(samples, 1.0) == max(samples)


def test_percentile_by_nearest_rank() -> None:
    assert percentile([], 0.99) == 0.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


def test_status_of_is_the_worst_result() -> None:
    report = Report("selftest")
    for status in ("pass", "skip", "warn"):
        report.add(Result("keys", "t", True, status, "d", status))  # type: ignore[arg-type]
    assert report.status_of("keys") == "warn" and report.status_of("audit") is None
    report.add(Result("keys", "t", True, "fail", "d", "x"))
    assert report.status_of("keys") == "fail" and report.exit_code == 1
