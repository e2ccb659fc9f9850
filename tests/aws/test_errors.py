"""Every row of the error table, produced by a real HTTP exchange (moto, the proxy, or the credential chain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsguard import errors
from kmsguard.aws import ClientFactory
from kmsguard.aws.errors import KMS_ERROR_CODES, TRANSPORT_ERRORS, error_table, map_error
from kmsguard.keyrings.base import KeyRequest
from kmsguard.testing import KmsRegion

from .conftest import MakeKeyring

AWS_DOCS = Path(__file__).resolve().parents[2] / "docs" / "aws.md"


def _request(arn: str) -> KeyRequest:
    return KeyRequest("general", arn, {"tenant": "t1"})


@pytest.mark.parametrize("code", sorted(KMS_ERROR_CODES))
def test_each_kms_error_code_maps_through_http(code: str, kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.inject(code, api="GenerateDataKey", key_id=arn)
    expected, _ = KMS_ERROR_CODES[code]
    with pytest.raises(expected) as info:
        make_keyring(operation_timeout=2).generate(_request(arn))  # throttling is waited out until then
    err = info.value
    assert type(err) is expected
    if expected is not errors.InvalidCiphertext:  # that one's message is fixed on purpose
        assert code in err.message and "GenerateDataKey" in err.message and "us-east-1" in err.message
        assert "injected by kmsguard.testing" not in err.message  # the service's free text never leaks through
    assert kms_region.proxy.counts["GenerateDataKey"] >= 1


def test_unknown_key_is_key_not_found_from_moto_itself(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    missing = f"arn:aws:kms:us-east-1:123456789012:key/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    with pytest.raises(errors.KeyNotFound):
        make_keyring().generate(_request(missing))
    with pytest.raises(errors.KeyNotFound):
        make_keyring().generate(_request("alias/no-such-alias"))


def test_wrong_context_is_invalid_ciphertext_from_moto_itself(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    keyring = make_keyring()
    data_key = keyring.generate(_request(arn))
    with pytest.raises(errors.InvalidCiphertext):
        keyring.unwrap(data_key.wrapped, KeyRequest("general", arn, {"tenant": "t2"}))


def test_refused_connection_is_endpoint_connection_error(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.outage("refuse")
    with pytest.raises(errors.KmsServiceError, match="EndpointConnectionError"):
        make_keyring().generate(_request(arn))


def test_blackholed_endpoint_is_connect_timeout(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.outage("blackhole")
    with pytest.raises(errors.KmsTimeout, match="ConnectTimeoutError"):
        make_keyring(connect_timeout=0.3).generate(_request(arn))


def test_stalled_endpoint_is_read_timeout(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.stall(10)
    with pytest.raises(errors.KmsTimeout, match="ReadTimeoutError"):
        make_keyring(read_timeout=0.3).generate(_request(arn))


def test_connection_reset_is_connection_closed(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.reset()
    with pytest.raises(errors.KmsServiceError, match="ConnectionClosedError"):
        make_keyring().generate(_request(arn))


def test_operation_deadline_is_kms_timeout(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.stall(10)
    with pytest.raises(errors.KmsTimeout, match="operation deadline"):
        make_keyring(read_timeout=10, operation_timeout=0.3).generate(_request(arn))


def test_no_credentials(kms_region: KmsRegion, make_keyring: MakeKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(errors.CredentialsError, match="NoCredentialsError"):
        make_keyring().generate(_request(kms_region.create_key()))
    assert kms_region.proxy.counts["GenerateDataKey"] == 0  # refused before anything was sent


def test_partial_credentials(kms_region: KmsRegion, make_keyring: MakeKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(errors.CredentialsError, match="PartialCredentialsError"):
        make_keyring().generate(_request(kms_region.create_key()))


def test_missing_profile(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    with pytest.raises(errors.CredentialsError, match="ProfileNotFound"):
        make_keyring(profile="nope").generate(_request(kms_region.create_key()))


def test_failing_credential_process(
    kms_region: KmsRegion, make_keyring: MakeKeyring, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path(aws_env["AWS_CONFIG_FILE"]).write_text("[profile broken]\ncredential_process = /bin/false\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(errors.CredentialsError, match="CredentialRetrievalError"):
        make_keyring(profile="broken").generate(_request(kms_region.create_key()))


def test_sso_profile_without_login(
    kms_region: KmsRegion,
    make_keyring: MakeKeyring,
    aws_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    Path(aws_env["AWS_CONFIG_FILE"]).write_text(
        "[profile sso]\nsso_start_url = https://example.awsapps.com/start\nsso_region = us-east-1\n"
        "sso_account_id = 123456789012\nsso_role_name = kmsguard\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached SSO token there
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(errors.CredentialsError, match="SSO"):
        make_keyring(profile="sso").generate(_request(kms_region.create_key()))


def test_invalid_parameters(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    factory: ClientFactory = make_keyring().clients
    with pytest.raises(errors.InvalidInput, match="parameters are invalid"):
        factory.call(kms_region.name, "Decrypt", CiphertextBlob=b"", KeyId="")


def test_unknown_exception_is_a_service_error() -> None:
    err = map_error(RuntimeError("boom with detail"), "Decrypt", "us-east-1")
    assert type(err) is errors.KmsServiceError and "boom" not in err.message


def test_every_transport_row_is_tested() -> None:
    """The rows above cover each transport/credential exception of the table."""
    tested = {
        "DeadlineExceeded",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "ProfileNotFound",
        "SSOError",
        "ParamValidationError",
    }
    assert {exc.__name__ for exc, _, _ in TRANSPORT_ERRORS} == tested


def test_the_aws_docs_carry_the_error_table() -> None:
    assert error_table() in AWS_DOCS.read_text()
