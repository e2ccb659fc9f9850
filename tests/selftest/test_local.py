"""``kmsguard selftest`` on the local backend: healthy, broken keys, broken configuration, audit down."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kmsguard.audit import AuditSettings, open_sink
from kmsguard.config import load_settings
from kmsguard.policy import SELFTEST_CONTEXT_KEY
from kmsguard.selftest.runner import CHECKS, run_selftest
from kmsguard.testing.moto_server import MotoServer, free_port

from .conftest import AUDIT, QUICK, assert_healthy, json_report, kmsguard, statuses, write_config


def test_a_healthy_local_install_passes_and_marks_its_audit_records(local_home: Path) -> None:
    report = run_selftest()
    assert_healthy(report)
    assert [c for c in CHECKS if report.status_of(c) is None] == []
    assert statuses(report, "roundtrip") == {"general": "pass", "pii": "pass", "payment": "pass"}
    assert "CONTEXT_REQUIRED" in next(r.detail for r in report.results if r.subject == "payment"
                                      and r.id == "roundtrip")
    assert report.status_of("credentials") == "skip" and report.status_of("connectivity") == "skip"
    sink = open_sink(AuditSettings.of(load_settings()))
    try:
        records = [r for r in sink.records() if r.operation in ("encrypt", "decrypt")]
    finally:
        sink.close()
    assert records and all(SELFTEST_CONTEXT_KEY in r.context for r in records)
    refused = {r.error_code for r in records if r.outcome == "error"}
    assert refused == {"CONTEXT_MISMATCH", "CONTEXT_REQUIRED", "INVALID_CIPHERTEXT"}


def test_the_command_prints_a_table_or_json_and_exits_0(local_home: Path) -> None:
    table = kmsguard("selftest")
    assert table.returncode == 0, table.stdout
    lines = table.stdout.splitlines()
    assert "OK (" in lines[-1]
    rows = [line for line in lines if "│" in line]
    critical = [i for i, line in enumerate(rows) if "│ yes" in line]
    assert critical == list(range(len(critical))), "the critical checks come first"
    doc = json_report(kmsguard("selftest", "--json", "--class", "payment", "--iterations", "1"))
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["facts"]["classifications"] == ["payment"]
    assert {c["subject"] for c in doc["checks"] if c["id"] == "roundtrip"} == {"payment"}
    assert kmsguard("selftest", "--class", "nope").returncode == 2
    assert kmsguard("selftest", "--iterations", "0").returncode == 2


def test_a_disabled_key_version_fails_keys(local_home: Path) -> None:
    """The primary version cannot be disabled (keys disable refuses); an older one holding envelopes can."""
    assert kmsguard("keys", "rotate", "--class", "payment").returncode == 0
    assert kmsguard("keys", "disable", "--class", "payment", "--version", "1").returncode == 0
    proc = kmsguard("selftest", "--json")
    assert proc.returncode == 1
    doc = json_report(proc)
    keys = {c["subject"]: c for c in doc["checks"] if c["id"] == "keys"}
    assert keys["payment"]["status"] == "fail" and keys["payment"]["critical"]
    assert "local:payment:v1 disabled" in keys["payment"]["detail"]
    assert keys["general"]["status"] == keys["pii"]["status"] == "pass"
    assert kmsguard("keys", "enable", "--class", "payment", "--version", "1").returncode == 0
    assert kmsguard("selftest").returncode == 0


def test_a_key_file_others_can_read_fails_keys(local_home: Path) -> None:
    (local_home / "keyring.json").chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP)
    report = run_selftest()
    assert statuses(report, "keys")["key file"] == "fail"
    assert report.exit_code == 1


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("[selftest]\niterations = 0\n", "selftest.iterations"),
        ("[selftest]\ncold_p99 = 5\n", "selftest.cold_p99"),
        ('backend = "cloud"\n', "backend"),
        ('[audit]\nsink = "s3"\n', "audit.sink"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_a_configuration_that_does_not_load_fails_config(local_home: Path, config: str, named: str) -> None:
    (local_home / "kmsguard.toml").write_text(config)
    proc = kmsguard("selftest", "--json")
    assert proc.returncode == 1
    doc = json_report(proc)
    first = doc["checks"][0]
    assert (first["id"], first["status"], first["critical"]) == ("config", "fail", True)
    assert named in first["detail"]
    assert {c["status"] for c in doc["checks"][1:]} == {"skip"}


def test_an_unreachable_audit_sink_fails_audit_when_payment_is_strict(local_home: Path) -> None:
    dsn = f"postgresql://kmsguard@127.0.0.1:{free_port('127.0.0.1')}/nothing?connect_timeout=1"
    write_config(local_home, AUDIT, f'sink = "postgres"\ndsn = "{dsn}"\n',
                 QUICK.replace("audit_timeout = 5", "audit_timeout = 1"))
    report = run_selftest(classes=["general", "payment"], iterations=1)
    audit = next(r for r in report.results if r.id == "audit" and r.subject == "sink")
    assert (audit.status, audit.critical) == ("fail", True)
    assert "did not take" in audit.detail and dsn not in audit.detail
    assert statuses(report, "roundtrip") == {"general": "pass", "payment": "pass"}  # the spool is durable
    assert report.exit_code == 1


def test_without_strict_classes_a_dead_sink_only_warns(local_home: Path) -> None:
    dsn = f"postgresql://kmsguard@127.0.0.1:{free_port('127.0.0.1')}/nothing?connect_timeout=1"
    write_config(local_home, AUDIT, f'sink = "postgres"\ndsn = "{dsn}"\n',
                 QUICK.replace("audit_timeout = 5", "audit_timeout = 1"),
                 "[classifications.payment]\nstrict_audit = false\n")
    report = run_selftest(classes=["general"], iterations=1)
    audit = next(r for r in report.results if r.id == "audit" and r.subject == "sink")
    assert (audit.status, audit.critical) == ("warn", False)
    assert report.exit_code == 0
    assert run_selftest(classes=["general"], iterations=1, strict=True).exit_code == 1


def test_a_slow_warm_path_warns_and_fails_with_strict(local_home: Path) -> None:
    """Thresholds come from [selftest]: one no operation can meet makes latency warn, and fail with --strict."""
    write_config(local_home, AUDIT, QUICK, "warm_p99_ms = 0.000001\ncold_p99_ms = 0.000001\n")
    report = run_selftest(classes=["general"], iterations=1)
    assert statuses(report, "latency") == {"general": "warn"} and report.exit_code == 0
    strict = run_selftest(classes=["general"], iterations=1, strict=True)
    latency = next(r for r in strict.results if r.id == "latency")
    assert (latency.status, latency.critical) == ("fail", True) and strict.exit_code == 1


@pytest.mark.parametrize("reachable", [True, False])
def test_metrics_check_publishes_to_cloudwatch_when_configured(
    local_home: Path, aws_env: dict[str, str], kms_server: MotoServer, reachable: bool
) -> None:
    endpoint = kms_server.url if reachable else f"http://127.0.0.1:{free_port('127.0.0.1')}"
    write_config(local_home, AUDIT, QUICK,
                 f'[metrics]\ncloudwatch = true\nregion = "us-east-1"\nendpoint_url = "{endpoint}"\n')
    report = run_selftest(classes=["general"], iterations=1)
    metrics = next(r for r in report.results if r.id == "metrics")
    assert metrics.critical is False
    if reachable:
        assert metrics.status == "pass" and "CloudWatch took a batch" in metrics.detail
    else:
        assert metrics.status == "warn" and "refused the batch" in metrics.detail
        assert report.exit_code == 0
