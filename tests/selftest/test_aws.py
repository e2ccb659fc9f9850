"""``kmsguard selftest`` on AWS (moto behind the fault proxy): healthy, and each part broken in turn."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsguard.selftest.runner import run_selftest
from kmsguard.testing import KmsRegion

from .conftest import AUDIT, AWS, QUICK, assert_healthy, fail_fast_audit, json_report, kmsguard, statuses, write_config


def test_a_healthy_aws_install_passes(aws_home: dict[str, str]) -> None:
    report = run_selftest()
    assert_healthy(report)
    credentials = next(r for r in report.results if r.id == "credentials")
    assert credentials.status == "pass" and "account 123456789012" in credentials.detail
    assert statuses(report, "keys") == {f"{c}@us-east-1": "pass" for c in ("general", "pii", "payment")}
    assert statuses(report, "connectivity") == {"us-east-1": "pass"}
    assert statuses(report, "multi_region") == {None: "skip"}
    assert "one region" in next(r.detail for r in report.results if r.id == "multi_region")


def test_a_dead_kms_endpoint_fails_connectivity_and_roundtrip_fast(
    aws_home: dict[str, str], kms_region: KmsRegion
) -> None:
    fail_fast_audit()
    kms_region.proxy.outage("refuse")
    started = time.monotonic()
    proc = kmsguard("selftest", "--json", "--class", "general")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    doc = json_report(proc)
    by_id = {(c["id"], c["subject"]): c for c in doc["checks"]}
    assert by_id[("connectivity", "us-east-1")]["status"] == "fail"
    assert by_id[("connectivity", "us-east-1")]["critical"] is True  # no region answers
    assert by_id[("roundtrip", "general")]["status"] == "fail"
    assert by_id[("keys", "general@us-east-1")]["status"] == "fail"
    assert by_id[("latency", "general")]["status"] == "skip"
    assert elapsed < 60, "a refused endpoint fails within the operation timeout, not after minutes"


def test_a_disabled_key_fails_keys(aws_home: dict[str, str], kms_region: KmsRegion) -> None:
    """moto does not enforce key state, so the proxy answers DisabledException for the payment key
    (named by its alias or its ARN), as KMS answers for a disabled key."""
    kms_region.proxy.inject("DisabledException", key_id="-payment-")
    kms_region.proxy.inject("DisabledException", key_id=aws_home["payment"].rsplit("/", 1)[1])
    report = run_selftest(classes=["general", "payment"], iterations=1)
    keys = statuses(report, "keys")
    assert keys == {"general@us-east-1": "pass", "payment@us-east-1": "fail"}
    assert "KEY_DISABLED" in next(r.detail for r in report.results if r.subject == "payment@us-east-1")
    assert statuses(report, "roundtrip") == {"general": "pass", "payment": "fail"}
    assert "KEY_DISABLED" in next(r.detail for r in report.results if r.id == "roundtrip" and r.subject == "payment")
    assert report.exit_code == 1


def test_rotation_off_warns_and_fails_with_strict_in_production(
    aws_home: dict[str, str], kms_region: KmsRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    kms_region.admin.disable_key_rotation(KeyId=aws_home["pii"])
    report = run_selftest(classes=["pii"], iterations=1)
    assert statuses(report, "keys") == {"pii@us-east-1": "warn"} and report.exit_code == 0
    assert "rotation is off" in next(r.detail for r in report.results if r.id == "keys")
    assert run_selftest(classes=["pii"], iterations=1, strict=True).status_of("keys") == "warn"  # not production
    monkeypatch.setenv("KMSGUARD_ENVIRONMENT", "production")
    for classification, arn in aws_home.items():
        monkeypatch.setenv(f"KMSGUARD_KEY_{classification.upper()}", arn)
    strict = run_selftest(classes=["pii"], iterations=1, strict=True)
    keys = next(r for r in strict.results if r.id == "keys")
    assert (keys.status, keys.critical) == ("fail", True) and strict.exit_code == 1


def test_kms_slowed_past_the_threshold_warns_and_fails_with_strict(
    aws_home: dict[str, str], kms_region: KmsRegion
) -> None:
    home = Path(os.environ["KMSGUARD_HOME"])
    with (home / "kmsguard.toml").open("a") as fh:
        fh.write("cold_p99_ms = 500\n")
    kms_region.proxy.latency(0.8)
    report = run_selftest(classes=["general"], iterations=1)
    latency = next(r for r in report.results if r.id == "latency")
    assert (latency.status, latency.critical) == ("warn", False), latency.detail
    assert "cold p99 above 500 ms" in latency.detail
    assert report.exit_code == 0
    strict = run_selftest(classes=["general"], iterations=1, strict=True)
    latency = next(r for r in strict.results if r.id == "latency")
    assert (latency.status, latency.critical) == ("fail", True) and strict.exit_code == 1


@pytest.mark.parametrize("code", ["ExpiredToken", "InvalidClientTokenId"])
def test_sts_refusing_the_credentials_fails_credentials(
    aws_home: dict[str, str], kms_region: KmsRegion, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", kms_region.endpoint)
    kms_region.proxy.inject(code, api="GetCallerIdentity", status=403)
    report = run_selftest(classes=["general"], iterations=1)
    credentials = next(r for r in report.results if r.id == "credentials")
    assert (credentials.status, credentials.critical) == ("fail", True)
    assert credentials.detail == f"STS GetCallerIdentity refused: {code}"
    assert kms_region.proxy.counts["GetCallerIdentity"] >= 1
    assert report.exit_code == 1


def test_missing_credentials_fail_credentials(aws_home: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fail_fast_audit()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    report = run_selftest(classes=["general"], iterations=1)
    credentials = next(r for r in report.results if r.id == "credentials")
    assert credentials.status == "fail" and "no credentials" in credentials.detail
    assert report.exit_code == 1


@pytest.mark.parametrize("wrap", [True, False])
def test_multi_region_opens_each_regions_envelopes_in_the_other(
    kms_regions: Callable[..., list[KmsRegion]], aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, wrap: bool,
) -> None:
    """Single-region keys wrapped in every region pass, critically; without wrap_in_all_regions they
    cannot open elsewhere, by design, and the check only warns."""
    east, west = kms_regions("us-east-1", "eu-west-1")
    keys = {r.name: r.create_key() for r in (east, west)}
    home = tmp_path / "multi"
    monkeypatch.setenv("KMSGUARD_HOME", str(home))
    write_config(
        home, 'backend = "aws"\n', f'[classifications.general]\nkey = "{keys["us-east-1"]}"\n',
        AWS + f'regions = ["us-east-1", "eu-west-1"]\nwrap_in_all_regions = {str(wrap).lower()}\n',
        "[aws.keys.general]\n" + "".join(f'{name} = "{arn}"\n' for name, arn in keys.items()),
        "[aws.endpoints]\n" + "".join(f'{r.name} = "{r.endpoint}"\n' for r in (east, west)), AUDIT, QUICK,
    )
    report = run_selftest(classes=["general"], iterations=1)
    assert statuses(report, "roundtrip") == {"general": "pass"}
    result = next(r for r in report.results if r.id == "multi_region")
    if wrap:
        assert (result.status, result.critical) == ("pass", True), result.detail
    else:
        assert (result.status, result.critical) == ("warn", False)
        assert "made in us-east-1, opened in eu-west-1" in result.detail
    assert statuses(report, "connectivity") == {"us-east-1": "pass", "eu-west-1": "pass"}


def test_an_assumed_role_is_named_and_credentials_about_to_expire_warn(aws_home: dict[str, str]) -> None:
    """moto's STS hands out role credentials for DurationSeconds = 900: under the 15 minutes that warn."""
    home = Path(os.environ["KMSGUARD_HOME"])
    config = (home / "kmsguard.toml").read_text().replace(
        "[aws]\n", '[aws]\nrole_arn = "arn:aws:iam::123456789012:role/kmsguard-app"\nrole_duration_seconds = 900\n'
    )
    (home / "kmsguard.toml").write_text(config)
    report = run_selftest(classes=["general"], iterations=1)
    credentials = next(r for r in report.results if r.id == "credentials")
    assert credentials.status == "warn", credentials.detail
    assert "role kmsguard-app" in credentials.detail and "expire in" in credentials.detail
    assert report.exit_code == 0
    assert run_selftest(classes=["general"], iterations=1, strict=True).exit_code == 1
