"""No data key, plaintext or credential reaches any log, even with every logger at DEBUG."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator

import pytest

from kmsguard import Guard
from kmsguard.aws import redact
from kmsguard.keyrings.base import KeyRequest
from kmsguard.testing import TEST_SECRET_KEY, KmsRegion

from .conftest import MakeKeyring

ROLE = "arn:aws:iam::123456789012:role/kmsguard-logging"


def _forms(secret: bytes) -> list[str]:
    """Every way a secret could be printed: raw, base64, hex, as a bytes repr."""
    return [
        secret.decode("latin-1"),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        secret.hex(),
        secret.hex().upper(),
        repr(secret)[2:-1],
    ]


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Everything every logger emits, formatted with tracebacks, at DEBUG."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield out
    root.removeHandler(handler)
    root.setLevel(old_level)


def test_keyring_calls_log_no_data_key(
    kms_region: KmsRegion, make_keyring: MakeKeyring, debug_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", kms_region.endpoint)
    arn = kms_region.create_key()
    keyring = make_keyring(role_arn=ROLE, max_attempts=3)
    request = KeyRequest("payment", arn, {"purpose": "refund"})
    kms_region.proxy.throttle(count=1, api="GenerateDataKey")  # a retry's logging too
    data_key = keyring.generate(request)
    wrapped = keyring.wrap(data_key, request)  # Encrypt sends the data key as Plaintext
    opened = keyring.unwrap(data_key.wrapped, request)
    keyring.rewrap(data_key.wrapped, request)
    assert opened.plaintext == data_key.plaintext and len(wrapped.wrapped) == 2
    role_secret = keyring.clients.session().get_credentials().get_frozen_credentials()
    text = debug_log.getvalue()
    assert "Plaintext" in text and "SecretAccessKey" in text  # botocore did log the bodies...
    assert redact.REDACTED in text  # ...and the filter rewrote them
    for secret in (
        data_key.plaintext,
        role_secret.secret_key.encode(),
        role_secret.token.encode(),
        TEST_SECRET_KEY.encode(),
    ):
        for form in _forms(secret):
            assert form not in text


def test_guard_round_trip_logs_no_plaintext(kmsguard_aws_env: dict[str, str], debug_log: io.StringIO) -> None:
    secret = b"4111-1111-1111-1111 exp 12/29"
    with Guard.from_env() as guard:
        assert guard.decrypt(guard.encrypt(secret, "payment", {"purpose": "refund"}), {"purpose": "refund"}) == secret
    text = debug_log.getvalue()
    assert "GenerateDataKey" in text
    for form in _forms(secret):
        assert form not in text


def test_the_scan_catches_a_leak_without_the_filter(
    kms_region: KmsRegion, make_keyring: MakeKeyring, debug_log: io.StringIO
) -> None:
    """The control: with the filter taken off, the same scan finds the data key."""
    arn = kms_region.create_key()
    keyring = make_keyring()
    keyring.clients.client(kms_region.name)  # built now: building a client re-installs the filter
    loggers = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.startswith("botocore")]
    for logger in loggers:
        logger.removeFilter(redact._FILTER)
    try:
        data_key = keyring.generate(KeyRequest("general", arn, {}))
    finally:
        redact.install()
    text = debug_log.getvalue()
    assert any(form in text for form in _forms(data_key.plaintext))


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ('b\'{"Plaintext": "c2VjcmV0IGtleQ==", "KeyId": "k"}\'', "c2VjcmV0IGtleQ=="),
        ("{'Plaintext': b'\\x01\\x02secret', 'KeyId': 'k'}", "secret"),
        ('b"{\\"Plaintext\\": \\"c2VjcmV0\\"}"', "c2VjcmV0"),
        ("<SecretAccessKey>wJalrXUtnFEMI</SecretAccessKey>", "wJalrXUtnFEMI"),
        ("'X-Amz-Security-Token': 'FwoGZXIvYXdzEJr'", "FwoGZXIvYXdzEJr"),
        ("Action=AssumeRole&SessionToken=FwoGZX&x=1", "FwoGZX"),
    ],
)
def test_redact_shapes(line: str, secret: str) -> None:
    out = redact.redact(line)
    assert secret not in out and redact.REDACTED in out
