"""With the AWS backend the audit key is a KMS-wrapped data key kept in the sink, shared by every writer."""

from __future__ import annotations

import json
import os
from contextlib import closing
from pathlib import Path

from kmsguard import Guard
from kmsguard.audit import AuditSettings, open_sink
from kmsguard.audit.keys import AUDIT_KEY_CONTEXT
from kmsguard.config import load_settings
from kmsguard.testing import KmsRegion

from .conftest import verify_home


def test_two_writers_share_one_wrapped_audit_key(kmsguard_aws_env: dict[str, str], kms_region: KmsRegion) -> None:
    home = Path(os.environ["KMSGUARD_HOME"])
    for _ in range(2):
        with Guard.from_env() as guard:
            guard.encrypt(b"x", "general", {"order": "1"})
    with closing(open_sink(AuditSettings.of(load_settings()))) as sink:
        blob = sink.load_key()
    assert blob is not None
    [entry] = json.loads(blob)
    assert entry["provider"] == "aws-kms" and entry["key_ref"] == kmsguard_aws_env["general"]
    generated = [r for r in kms_region.proxy.requests if r[0] == "GenerateDataKey"]
    audit_keys = [r for r in generated if r[1].get("EncryptionContext", {}).items() >= AUDIT_KEY_CONTEXT.items()]
    assert len(audit_keys) == 1  # the second writer unwrapped the stored key instead of making its own
    report = verify_home(home, dict(os.environ))
    assert report.intact and report.writers == 2
