"""AwsKmsKeyring's own rules: which entries it opens, wrap, rewrap through ReEncrypt, key ARNs."""

from __future__ import annotations

import pytest

from kmsguard import Guard, errors
from kmsguard.aws import KeyArn
from kmsguard.datakey import WrappedKey
from kmsguard.keyrings.aws_kms import PROVIDER
from kmsguard.keyrings.base import KeyRequest
from kmsguard.policy import Policy
from kmsguard.testing import KmsRegion

from .conftest import MakeKeyring

ARN = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
MRK = "arn:aws:kms:eu-west-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab"


def test_key_arn_parsing() -> None:
    arn = KeyArn.parse(MRK)
    assert arn is not None and arn.region == "eu-west-1" and arn.multi_region
    assert str(arn.in_region("us-east-1")) == MRK.replace("eu-west-1", "us-east-1")
    assert KeyArn.parse(ARN) is not None and not KeyArn.parse(ARN).multi_region  # type: ignore[union-attr]
    for not_a_key in ("alias/x", "arn:aws:kms:eu-west-1:123456789012:alias/x", "1234abcd", ""):
        assert KeyArn.parse(not_a_key) is None


def test_which_entries_a_region_opens(make_keyring: MakeKeyring) -> None:
    keyring = make_keyring()  # us-east-1
    here = ARN.replace("eu-west-1", "us-east-1")
    assert keyring.local_arn(WrappedKey(PROVIDER, here, b"x")) == here
    assert keyring.local_arn(WrappedKey(PROVIDER, ARN, b"x")) is None  # single-region key elsewhere
    assert keyring.local_arn(WrappedKey(PROVIDER, MRK, b"x")) == MRK.replace("eu-west-1", "us-east-1")
    assert keyring.local_arn(WrappedKey("local", "local:general:v1", b"x")) is None


def test_nothing_to_open_here_is_invalid_ciphertext_without_a_call(
    kms_region: KmsRegion, make_keyring: MakeKeyring
) -> None:
    entries = (WrappedKey("local", "local:general:v1", b"x" * 60), WrappedKey(PROVIDER, ARN, b"x" * 100))
    with pytest.raises(errors.InvalidCiphertext):
        make_keyring().unwrap(entries, KeyRequest("general", ARN, {}))
    assert sum(kms_region.proxy.counts.values()) == 0


def test_wrap_then_rewrap_keeps_the_data_key_inside_kms(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    old, new = kms_region.create_key(), kms_region.create_key(alias="alias/keyring-rewrap-new")
    keyring = make_keyring()
    request = KeyRequest("pii", old, {"user": "7"})
    data_key = keyring.generate(request)
    both = keyring.wrap(data_key, KeyRequest("pii", new, {"user": "7"}))
    assert [w.key_ref for w in both.wrapped] == [old, new]
    assert keyring.unwrap(both.wrapped[1:], KeyRequest("pii", new, {"user": "7"})).plaintext == data_key.plaintext

    (moved,) = keyring.rewrap(data_key.wrapped, KeyRequest("pii", "alias/keyring-rewrap-new", {"user": "7"}))
    assert moved.key_ref == new  # the alias resolved to its ARN
    sent = kms_region.proxy.last("ReEncrypt").body
    assert (sent["SourceKeyId"], sent["DestinationKeyId"]) == (old, new)
    assert sent["SourceEncryptionContext"] == sent["DestinationEncryptionContext"] == request.bound_context()
    assert keyring.unwrap((moved,), KeyRequest("pii", new, {"user": "7"})).plaintext == data_key.plaintext


def test_first_usable_entry_wins_and_a_disabled_key_says_so(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    a, b = kms_region.create_key(), kms_region.create_key()
    keyring = make_keyring()
    request = KeyRequest("general", a, {})
    two = keyring.wrap(keyring.generate(request), KeyRequest("general", b, {}))
    kms_region.proxy.inject("DisabledException", api="Decrypt", key_id=a)
    assert keyring.unwrap(two.wrapped, request).plaintext == two.plaintext  # a refused, b opened
    with pytest.raises(errors.KeyDisabled):
        keyring.unwrap(two.wrapped[:1], request)


def test_guard_rewrap_moves_ciphertexts_to_a_new_key(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    with Guard.from_env() as guard:
        sealed = guard.encrypt(b"passport P1234567", "pii", {"user": "7"})
        new_key = kms_region.create_key()
        policy: Policy = guard.policy.with_key("pii", new_key)
        moved_guard = Guard(policy, guard.keyring)
        moved = moved_guard.rewrap(sealed, {"user": "7"})
        assert guard.inspect(moved).keys == [{"provider": PROVIDER, "key_ref": new_key}]
        assert moved_guard.decrypt(moved, {"user": "7"}) == b"passport P1234567"
