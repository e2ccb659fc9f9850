"""The credential chain, profiles and role assumption, offline: moto's STS and KMS behind the proxy."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kmsguard.keyrings.base import KeyRequest
from kmsguard.testing import TEST_ACCESS_KEY, KmsRegion

from .conftest import MakeKeyring

ROLE = "arn:aws:iam::123456789012:role/kmsguard-app"


def _generate(make_keyring: MakeKeyring, region: KmsRegion, calls: int = 1, **settings: object) -> None:
    arn = region.create_key()
    keyring = make_keyring(**settings)
    for _ in range(calls):
        keyring.generate(KeyRequest("general", arn, {}))


def _kms_access_keys(region: KmsRegion) -> set[str]:
    return {
        r.headers["Authorization"].split("Credential=")[1].split("/")[0]
        for r in region.proxy.requests
        if r.api == "GenerateDataKey"
    }


@pytest.fixture
def sts_via_proxy(kms_region: KmsRegion, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> KmsRegion:
    """STS calls go to moto through the same proxy, so the test sees AssumeRole."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", kms_region.endpoint)
    return kms_region


def test_environment_credentials(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    _generate(make_keyring, kms_region)
    assert _kms_access_keys(kms_region) == {TEST_ACCESS_KEY}


def test_named_profile_from_the_shared_credentials_file(
    kms_region: KmsRegion, make_keyring: MakeKeyring, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path(aws_env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        "[payments]\naws_access_key_id = AKIAPAYMENTSPROFILE1\naws_secret_access_key = not-a-secret\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _generate(make_keyring, kms_region, profile="payments")
    assert _kms_access_keys(kms_region) == {"AKIAPAYMENTSPROFILE1"}


def test_profile_with_role_and_source_profile_in_the_config_file(
    sts_via_proxy: KmsRegion, make_keyring: MakeKeyring, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3's own AssumeRoleProvider: kmsguard only names the profile."""
    Path(aws_env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        "[base]\naws_access_key_id = AKIABASEPROFILE00001\naws_secret_access_key = not-a-secret\n"
    )
    Path(aws_env["AWS_CONFIG_FILE"]).write_text(f"[profile app]\nrole_arn = {ROLE}\nsource_profile = base\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _generate(make_keyring, sts_via_proxy, profile="app")
    assume = sts_via_proxy.proxy.last("AssumeRole")
    assert assume.body["RoleArn"] == ROLE and "AKIABASEPROFILE00001" in assume.headers["Authorization"]
    (key,) = _kms_access_keys(sts_via_proxy)
    assert key.startswith("ASIA")  # temporary credentials of the role, not the base profile's key


def test_role_arn_setting_assumes_the_role_as_kmsguard(sts_via_proxy: KmsRegion, make_keyring: MakeKeyring) -> None:
    _generate(make_keyring, sts_via_proxy, calls=3, role_arn=ROLE)
    assume = sts_via_proxy.proxy.last("AssumeRole")
    assert assume.body["RoleArn"] == ROLE and assume.body["RoleSessionName"] == "kmsguard"
    assert TEST_ACCESS_KEY in assume.headers["Authorization"]  # the chain's identity assumes the role
    assert sts_via_proxy.proxy.counts["AssumeRole"] == 1  # an hour of validity: fetched once, then reused
    (key,) = _kms_access_keys(sts_via_proxy)
    assert key.startswith("ASIA")


def test_role_credentials_refresh_before_they_expire(sts_via_proxy: KmsRegion, make_keyring: MakeKeyring) -> None:
    """900 s credentials are inside botocore's 15-minute refresh window, so each use renews them."""
    _generate(make_keyring, sts_via_proxy, calls=3, role_arn=ROLE, role_duration_seconds=900)
    assert sts_via_proxy.proxy.last("AssumeRole").body["DurationSeconds"] == "900"
    assert sts_via_proxy.proxy.counts["AssumeRole"] >= 2
    assert len(_kms_access_keys(sts_via_proxy)) >= 2  # later calls were signed with renewed credentials


def test_web_identity_from_the_environment(
    sts_via_proxy: KmsRegion, make_keyring: MakeKeyring, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What EKS (IRSA) sets up: a token file and a role; boto3's chain calls AssumeRoleWithWebIdentity."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    _generate(make_keyring, sts_via_proxy)
    assert sts_via_proxy.proxy.last("AssumeRoleWithWebIdentity").body["RoleArn"] == ROLE
    (key,) = _kms_access_keys(sts_via_proxy)
    assert key.startswith("ASIA")


def test_container_credentials_endpoint(
    kms_region: KmsRegion, make_keyring: MakeKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ECS sets up: a local credentials endpoint; boto3's chain fetches from it."""
    expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps(
        {
            "AccessKeyId": "ASIACONTAINERCREDS01",
            "SecretAccessKey": "container-secret",
            "Token": "container-token",
            "Expiration": expires,
        }
    ).encode()

    class Creds(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Creds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_port}/creds")
        _generate(make_keyring, kms_region)
    finally:
        server.shutdown()
        server.server_close()
    assert _kms_access_keys(kms_region) == {"ASIACONTAINERCREDS01"}
