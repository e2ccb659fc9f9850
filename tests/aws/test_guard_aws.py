"""Guard on backend aws against the local KMS endpoint, through botocore's real HTTP stack."""

from __future__ import annotations

import base64

import pytest

from kmsguard import Guard, __version__
from kmsguard.audit.keys import AUDIT_KEY_CONTEXT
from kmsguard.keyrings.base import CLASSIFICATION_CONTEXT_KEY
from kmsguard.testing import KmsRegion

CASES = [("general", {}), ("pii", {"user": "7"}), ("payment", {"purpose": "refund"})]


@pytest.mark.parametrize(("classification", "context"), CASES)
def test_round_trip_each_classification(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, classification: str, context: dict[str, str]
) -> None:
    with Guard.from_env() as guard:
        sealed = guard.encrypt(b"4111111111111111", classification, context)
        info = guard.inspect(sealed)
        assert info.keys == [{"provider": "aws-kms", "key_ref": kmsguard_aws_env[classification]}]
        assert guard.decrypt(sealed, context) == b"4111111111111111"
    # The audit writer's own calls (its KMS-wrapped audit key, see audit/keys.py) are not the data's.
    data_calls = [
        r for r in kms_region.proxy.requests if AUDIT_KEY_CONTEXT.items() - r.body.get("EncryptionContext", {}).items()
    ]
    generate = next(r for r in reversed(data_calls) if r.api == "GenerateDataKey")
    decrypt = next(r for r in reversed(data_calls) if r.api == "Decrypt")
    assert generate.body["EncryptionContext"] == {**context, CLASSIFICATION_CONTEXT_KEY: classification}
    assert generate.body["KeySpec"] == "AES_256"
    assert decrypt.body["KeyId"] == kmsguard_aws_env[classification]
    assert decrypt.body["EncryptionContext"] == generate.body["EncryptionContext"]
    assert base64.b64decode(decrypt.body["CiphertextBlob"])
    assert f"kmsguard/{__version__}" in generate.headers["User-Agent"]
