"""AwsKmsKeyring: data keys from AWS KMS in one region.

* ``generate``: GenerateDataKey (AES_256) under the classification's key, with
  EncryptionContext = ``request.bound_context()`` (the classification plus the context
  keys the policy sends to KMS). The wrapped entry records the full key ARN KMS
  returns, so the envelope says exactly which key and region can open it.
* ``wrap``: Encrypt an existing data key under another key.
* ``unwrap``: Decrypt, always with ``KeyId`` = the entry's ARN (never "discovery",
  which would let a forged entry name any key the principal can use).
* ``rewrap``: ReEncrypt, so the data key never leaves KMS.

An alias or bare key id resolves to its ARN through DescribeKey once and is cached for
``alias_cache_ttl`` seconds. Each keyring operation runs under one deadline
(``operation_timeout``) across all its KMS calls. Entries of other providers or
other regions are skipped, except multi-region keys (``mrk-``), whose replica in this
region opens them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kmsguard import operation
from kmsguard.aws.arn import KeyArn
from kmsguard.aws.clients import ClientFactory
from kmsguard.datakey import DEK_SIZE, DataKey, WrappedKey
from kmsguard.errors import InvalidCiphertext, InvalidKeyUsage, KmsGuardError, KmsServiceError
from kmsguard.keyrings.base import KeyRequest
from kmsguard.region_try import current as current_try

PROVIDER = "aws-kms"
T = TypeVar("T")


class AwsKmsKeyring:
    """A Keyring backed by AWS KMS in ``region``, calling through a shared :class:`ClientFactory`."""

    provider = PROVIDER

    def __init__(self, clients: ClientFactory, region: str | None = None) -> None:
        self.clients = clients
        self.region = region or clients.settings.region
        self._aliases: dict[str, tuple[str, float]] = {}
        self._alias_lock = threading.Lock()

    def close(self) -> None:
        """Close the client factory's connections and worker threads (idempotent)."""
        self.clients.close()

    # ------------------------------------------------------------------ Keyring protocol

    def generate(self, request: KeyRequest) -> DataKey:
        until = self.clients.deadline()
        arn = self.resolve(request.key_id, until=until)
        out = self._call(
            "GenerateDataKey", arn, until, KeyId=arn, KeySpec="AES_256", EncryptionContext=request.bound_context()
        )
        plaintext = _data_key(out, "GenerateDataKey", self.region)
        return DataKey(plaintext, (WrappedKey(PROVIDER, str(out["KeyId"]), out["CiphertextBlob"]),))

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        until = self.clients.deadline()
        arn = self.resolve(request.key_id, until=until)
        out = self._call(
            "Encrypt", arn, until, KeyId=arn, Plaintext=data_key.plaintext, EncryptionContext=request.bound_context()
        )
        entry = WrappedKey(PROVIDER, str(out["KeyId"]), out["CiphertextBlob"])
        return data_key.with_wrapped((*data_key.wrapped, entry))

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        until = self.clients.deadline()
        context = request.bound_context()

        def decrypt(entry: WrappedKey, arn: str) -> bytes:
            out = self._call("Decrypt", arn, until, CiphertextBlob=entry.wrapped, KeyId=arn, EncryptionContext=context)
            return _data_key(out, "Decrypt", self.region)

        return DataKey(self._first(wrapped, decrypt), tuple(wrapped))

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        until = self.clients.deadline()
        target = self.resolve(request.key_id, until=until)
        context = request.bound_context()

        def reencrypt(entry: WrappedKey, arn: str) -> WrappedKey:
            out = self._call(
                "ReEncrypt",
                arn,
                until,
                CiphertextBlob=entry.wrapped,
                SourceKeyId=arn,
                SourceEncryptionContext=context,
                DestinationKeyId=target,
                DestinationEncryptionContext=context,
            )
            return WrappedKey(PROVIDER, str(out["KeyId"]), out["CiphertextBlob"])

        return (self._first(wrapped, reencrypt),)

    # ------------------------------------------------------------------ helpers for other keyrings

    def local_arn(self, entry: WrappedKey) -> str | None:
        """The ARN this region would decrypt ``entry`` with, or None when it cannot."""
        if entry.provider != PROVIDER:
            return None
        arn = KeyArn.parse(entry.key_ref)
        if arn is None:
            return None
        if arn.region == self.region:
            return entry.key_ref
        return str(arn.in_region(self.region)) if arn.multi_region else None

    def resolve(self, key_id: str, *, until: float | None = None) -> str:
        """The key ARN for an alias, alias ARN, key id or key ARN (DescribeKey, cached with a TTL)."""
        arn = KeyArn.parse(key_id)
        if arn is not None:
            return str(arn.in_region(self.region)) if arn.multi_region else key_id
        now = time.monotonic()
        with self._alias_lock:
            hit = self._aliases.get(key_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        meta = self._call("DescribeKey", key_id, until, KeyId=key_id)["KeyMetadata"]
        if (
            meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT"
            or meta.get("KeySpec", "SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT"
        ):
            raise InvalidKeyUsage(f"{key_id} in {self.region} is not a symmetric ENCRYPT_DECRYPT key")
        resolved = str(meta["Arn"])
        ttl = self.clients.settings.alias_cache_ttl
        if ttl > 0:
            with self._alias_lock:
                self._aliases[key_id] = (resolved, now + ttl)
        return resolved

    # ------------------------------------------------------------------ internals

    def _call(self, api: str, key_ref: str, until: float | None, **params: Any) -> dict[str, Any]:
        region_try = current_try.get()
        if region_try is not None:
            region_try.check()  # a try abandoned between two calls (DescribeKey, then the call) makes no more
        operation.note_kms_call(key_ref if api != "DescribeKey" else None, self.region)
        return self.clients.call(self.region, api, until=until, key_ref=key_ref, **params)

    def _first(self, wrapped: Sequence[WrappedKey], attempt: Callable[[WrappedKey, str], T]) -> T:
        """``attempt(entry, arn)`` on each entry this region can open; the first success wins.

        A wrong-key or wrong-context entry moves on to the next; any other failure is
        remembered and raised if no entry opens, so a disabled key says KEY_DISABLED
        rather than "invalid ciphertext".
        """
        failure: KmsGuardError | None = None
        for entry in wrapped:
            arn = self.local_arn(entry)
            if arn is None:
                continue
            try:
                return attempt(entry, arn)
            except InvalidCiphertext:
                continue
            except KmsGuardError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        raise InvalidCiphertext()


def _data_key(out: dict[str, Any], api: str, region: str) -> bytes:
    plaintext = out.get("Plaintext")
    if not isinstance(plaintext, bytes) or len(plaintext) != DEK_SIZE:
        raise KmsServiceError(f"KMS {api} in {region} returned a data key of the wrong size")
    return plaintext
