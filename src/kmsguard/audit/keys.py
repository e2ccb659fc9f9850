"""Where the audit key comes from.

The audit key (32 bytes) keys the context-value hashes and the chain MACs. It must be
the same for every process writing to one sink (or records could not be verified or
correlated together), and it must not be readable by whoever can merely write to the
audit store.

- A keyring with a secret store (the local keyring's ``secret("audit")``) keeps it
  with its master keys: same protection, same file.
- Any other keyring (AWS KMS): a data key generated under the ``general``
  classification's key with the context ``kmsguard:purpose=audit-key``, stored *wrapped*
  in the sink itself (``audit_keys`` table, or ``<file>.key`` beside a JSON lines log).
  The first writer stores it; every other writer and ``kmsguard audit verify`` unwraps
  the same blob through the key service. Reading the audit key therefore needs
  kms:Decrypt on that key, which IAM grants to the services and the auditor, not to
  the database's administrators, and every unwrap shows in CloudTrail.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kmsguard.audit.chain import AuditKeys
from kmsguard.audit.sink import Sink
from kmsguard.datakey import WrappedKey
from kmsguard.keyrings.base import KeyRequest, Keyring, backend_of
from kmsguard.policy import Policy

AUDIT_KEY_CONTEXT = {"kmsguard:purpose": "audit-key"}
KEY_CLASSIFICATION = "general"


def audit_keys(keyring: Keyring, policy: Policy, sink: Sink) -> AuditKeys:
    """The audit keys for this stack (may call the key service and the sink; raises their errors)."""
    secret = getattr(backend_of(keyring), "secret", None)  # through a CachingKeyring to its backend
    if callable(secret):
        return AuditKeys(secret("audit"))
    cls = policy.get(KEY_CLASSIFICATION)
    request = KeyRequest(cls.name, cls.key, dict(AUDIT_KEY_CONTEXT))
    blob = sink.load_key()
    if blob is None:
        blob = sink.store_key(_encode(keyring.generate(request).wrapped))
    return AuditKeys(keyring.unwrap(_decode(blob), request).plaintext)


def _encode(wrapped: tuple[WrappedKey, ...]) -> str:
    return json.dumps(
        [
            {"provider": w.provider, "key_ref": w.key_ref, "wrapped": base64.b64encode(w.wrapped).decode()}
            for w in wrapped
        ]
    )


def _decode(blob: str) -> tuple[WrappedKey, ...]:
    items: list[dict[str, Any]] = json.loads(blob)
    return tuple(WrappedKey(i["provider"], i["key_ref"], base64.b64decode(i["wrapped"])) for i in items)
