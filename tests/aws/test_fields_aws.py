"""Field protection and blind indexes on backend aws: key-service calls counted at the fault proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from kmsguard import Guard
from kmsguard.testing import KmsRegion

#: A booking with 12 sensitive fields: 10 PII, 2 payment.
RECORD: dict[str, Any] = {
    "booking": "QX7K2P",
    "seat": "14C",
    "fare": 412.5,
    "card": {"number": "4111111111111111", "holder": "Anna Eriksson"},
    "passengers": [
        {"name": f"P{i}", "passport": f"X{i}234567", "email": f"p{i}@example.com", "phone": f"+4670123456{i}"}
        for i in range(3)
    ],
    "contact": {"email": "anna@example.com"},
}
FIELDS = {
    "$.card.number": "payment",
    "$.card.holder": "payment",
    "$.passengers[*].passport": "pii",
    "$.passengers[*].email": "pii",
    "$.passengers[*].phone": "pii",
    "$.contact.email": "pii",
}
CONTEXT = {"purpose": "checkout"}


def data_calls(region: KmsRegion, api: str) -> int:
    """Calls for data keys (the audit writer's own key, see audit/keys.py, is not counted)."""
    return sum(
        1
        for r in region.proxy.requests
        if r.api == api and r.body.get("EncryptionContext", {}).get("kmsguard:purpose") is None
    )


def test_protect_costs_one_call_per_classification_cold_and_none_warm(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion
) -> None:
    with Guard.from_env() as guard:
        before = data_calls(kms_region, "GenerateDataKey")
        protected = guard.protect(RECORD, FIELDS, CONTEXT)
        assert sum(isinstance(v, str) and v.startswith("kg1:") for v in _leaves(protected)) == 12
        assert data_calls(kms_region, "GenerateDataKey") - before == 2
        for i in range(5):
            guard.protect({**RECORD, "booking": f"B{i}"}, FIELDS, CONTEXT)
        assert data_calls(kms_region, "GenerateDataKey") - before == 2  # warm: no call at all
        # The path never reaches the key service: it is in the header only.
        sent = [r.body["EncryptionContext"] for r in kms_region.proxy.requests if r.api == "GenerateDataKey"]
        assert all("kmsguard:field" not in ctx for ctx in sent)
    with Guard.from_env() as cold:  # a new Guard: an empty cache
        decrypts = data_calls(kms_region, "Decrypt")
        assert cold.unprotect(protected, CONTEXT) == RECORD
        assert data_calls(kms_region, "Decrypt") - decrypts == 2
        assert cold.unprotect(protected, CONTEXT) == RECORD
        assert data_calls(kms_region, "Decrypt") - decrypts == 2


COMPUTE = "from kmsguard import Guard\nwith Guard.from_env() as g: print(g.blind_index('L898902C3', 'pii', 'pp'))"


def test_blind_index_key_is_wrapped_once_and_unwrapped_once_per_process(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion
) -> None:
    with Guard.from_env() as guard:
        generated = sum(1 for r in kms_region.proxy.requests if r.api == "GenerateDataKey")
        first = guard.blind_index("L898902C3", "pii", "pp")
        for _ in range(20):
            assert guard.blind_index("L898902C3", "pii", "pp") == first
        index_calls = _index_calls(kms_region)
        assert [r.api for r in index_calls] == ["GenerateDataKey", "Decrypt"]
        assert index_calls[0].body["EncryptionContext"] == {
            "kmsguard:purpose": "blind-index",
            "kmsguard:index": "pp",
            "kmsguard:classification": "pii",
        }
        assert sum(1 for r in kms_region.proxy.requests if r.api == "GenerateDataKey") == generated + 1
        assert guard.blind_index("L898902C3", "pii", "other") != first
        home = guard.settings.home if guard.settings else None
    assert home is not None
    stored = home / "index-keys" / "pii.pp.json"
    assert stored.stat().st_mode & 0o777 == 0o600 and b"L898902C3" not in stored.read_bytes()
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-c", COMPUTE], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first  # another process: the same stored key, unwrapped by KMS
    apis = [r.api for r in _index_calls(kms_region)]
    assert apis == ["GenerateDataKey", "Decrypt", "GenerateDataKey", "Decrypt", "Decrypt"]


def _index_calls(region: KmsRegion) -> list[Any]:
    return [r for r in region.proxy.requests if r.body.get("EncryptionContext", {}).get("kmsguard:index")]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
