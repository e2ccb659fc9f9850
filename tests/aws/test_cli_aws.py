"""The kmsguard command with KMSGUARD_BACKEND=aws and AWS_ENDPOINT_URL_KMS: real subprocesses, real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmsguard.testing import KmsRegion


def run(*args: str, input: bytes = b"", code: int = 0, **env: str) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "kmsguard", *args],
        input=input,
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == code, (proc.returncode, proc.stderr.decode())
    assert b"Traceback" not in proc.stderr
    return proc


@pytest.mark.parametrize(
    ("classification", "context"), [("general", []), ("pii", ["-c", "user=7"]), ("payment", ["-c", "purpose=refund"])]
)
def test_round_trip_through_the_cli(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, classification: str, context: list[str]
) -> None:
    token = run("encrypt", "--class", classification, "--text", *context, input=b"P<UTO L898902C3").stdout
    assert token.startswith(b"kg1:")
    assert json.loads(run("inspect", input=token).stdout)["keys"][0]["key_ref"] == kmsguard_aws_env[classification]
    assert run("decrypt", *context, input=token).stdout == b"P<UTO L898902C3"
    data_calls = [
        r.api
        for r in kms_region.proxy.requests
        if r.body.get("KeyId") == kmsguard_aws_env[classification]
        and "kmsguard:purpose" not in r.body.get("EncryptionContext", {})
    ]  # not the audit key's calls
    assert data_calls == ["GenerateDataKey", "Decrypt"]


def test_kms_errors_are_one_line(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    kms_region.proxy.inject("DisabledException", key_id=kmsguard_aws_env["pii"])
    proc = run("encrypt", "--class", "pii", input=b"x", code=1)
    (line,) = proc.stderr.decode().strip().splitlines()
    assert line.startswith("error: KEY_DISABLED: KMS GenerateDataKey in us-east-1")


def test_stalled_endpoint_ends_the_command_at_the_deadline(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, tmp_path: Path
) -> None:
    """KMS_TIMEOUT after the 1 s deadline, and the process exits then, not after botocore's 20 s read timeout."""
    config = tmp_path / "kmsguard.toml"
    # No audit sink: its own KMS call for the audit key would add a wait of its own (not this test's subject).
    config.write_text('backend = "aws"\n[aws]\noperation_timeout = 1\nread_timeout = 20\n[audit]\nsink = "none"\n')
    kms_region.proxy.stall(30)
    started = time.monotonic()
    proc = run("encrypt", "--class", "pii", input=b"x", code=1, KMSGUARD_CONFIG=str(config))
    assert "error: KMS_TIMEOUT:" in proc.stderr.decode() and "operation deadline (1s)" in proc.stderr.decode()
    assert time.monotonic() - started < 10


def test_no_region_is_a_configuration_error(kmsguard_aws_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    proc = subprocess.run(
        [sys.executable, "-m", "kmsguard", "encrypt", "--class", "general"],
        input=b"x",
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("error: CONFIGURATION_ERROR: aws.regions: no region configured")


def test_status_rotation_and_strict(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    rows = json.loads(run("keys", "status", "--json").stdout)
    assert [(r["classification"], r["arn"], r["state"]) for r in rows] == [
        (c, kmsguard_aws_env[c], "Enabled") for c in ("general", "pii", "payment")
    ]
    assert all(r["rotation_enabled"] is False and r["spec"] == "SYMMETRIC_DEFAULT" for r in rows)
    not_ready = "not ready: general (not rotating), payment (not rotating), pii (not rotating)\n"
    assert run("keys", "status", "--strict", code=1).stderr.decode() == not_ready

    for c in ("general", "pii", "payment"):
        out = run("keys", "enable-rotation", "--class", c, "--period-days", "180").stdout.decode()
        assert f"automatic rotation enabled for {kmsguard_aws_env[c]} every 180 days" in out
    assert kms_region.proxy.last("EnableKeyRotation").body["RotationPeriodInDays"] == 180
    table = run("keys", "status", "--strict").stdout.decode()
    assert "Enabled" in table and "payment" in table

    kms_region.admin.disable_key(KeyId=kmsguard_aws_env["pii"].split("/")[-1])  # moto wants the bare id here
    assert run("keys", "status", "--strict", code=1).stderr.decode() == "not ready: pii (Disabled)\n"


def test_rotate_on_demand(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    out = run("keys", "rotate", "--class", "payment").stdout.decode()
    assert out.strip() == f"rotation started for {kmsguard_aws_env['payment']}"
    assert kms_region.proxy.last("RotateKeyOnDemand").body["KeyId"] == kmsguard_aws_env["payment"]


def test_create_keys_for_a_new_account(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    app = os.environ["KMSGUARD_APP"]
    alias = f"alias/{app}-loyalty-development"
    out = run("keys", "create", "--class", "pii", "--alias", alias).stdout.decode()
    arn = out.split()[1]
    assert kms_region.admin.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == arn
    assert kms_region.admin.get_key_rotation_status(KeyId=arn)["KeyRotationEnabled"] is True
    bad = run("keys", "create", "--class", "pii", "--alias", "alias/aws/nope", code=1)
    assert "INVALID_INPUT" in bad.stderr.decode()
    taken = run("keys", "create", "--class", "pii", "--alias", alias, code=1)
    assert f"{alias} already names another key" in taken.stderr.decode()


def test_create_a_multi_region_key(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    alias = f"alias/{os.environ['KMSGUARD_APP']}-mr"
    out = run(
        "keys",
        "create",
        "--class",
        "general",
        "--multi-region",
        "--alias",
        alias,
        KMSGUARD_REGIONS="us-east-1,eu-west-1",
    ).stdout.decode()
    east, west = (line.split()[1] for line in out.strip().splitlines())
    assert ":us-east-1:" in east and ":eu-west-1:" in west and east.split("/")[-1] == west.split("/")[-1]
    assert east.split("/")[-1].startswith("mrk-")
    assert kms_region.proxy.last("ReplicateKey").body["ReplicaRegion"] == "eu-west-1"


def test_local_only_commands_say_so(kmsguard_aws_env: dict[str, str]) -> None:
    proc = run("keys", "list", code=1)
    assert "CONFIGURATION_ERROR" in proc.stderr.decode()


def test_status_on_the_local_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command dispatches to the local keyring."""
    for var in [v for v in os.environ if v.startswith("KMSGUARD_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("KMSGUARD_HOME", str(tmp_path / "home"))
    run("init")
    rows = json.loads(run("keys", "status", "--json", "--strict").stdout)
    assert [(r["classification"], r["primary"], r["state"]) for r in rows] == [
        ("general", "local:general:v1", "enabled"),
        ("pii", "local:pii:v1", "enabled"),
        ("payment", "local:payment:v1", "enabled"),
    ]
    assert "CONFIGURATION_ERROR" in run("keys", "enable-rotation", "--class", "pii", code=1).stderr.decode()
