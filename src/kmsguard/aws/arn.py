"""KMS key ARNs: which region a wrapped key belongs to, and multi-region key replicas.

An envelope records the full key ARN KMS returned, so the region that can decrypt it
is in the ARN. A multi-region key (id ``mrk-...``) has the same id in every replica
region, so its ARN in another region is the same ARN with that region swapped in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_KEY_ARN_RE = re.compile(r"arn:(aws[a-z-]*):kms:([a-z0-9-]+):(\d{12}):key/([A-Za-z0-9-]+)")


@dataclass(frozen=True)
class KeyArn:
    partition: str
    region: str
    account: str
    key_id: str

    @classmethod
    def parse(cls, text: str) -> KeyArn | None:
        """The parts of a key ARN, or None for anything else (alias, bare id, alias ARN)."""
        match = _KEY_ARN_RE.fullmatch(text)
        return cls(*match.groups()) if match else None

    @property
    def multi_region(self) -> bool:
        return self.key_id.startswith("mrk-")

    def in_region(self, region: str) -> KeyArn:
        """This key's ARN in ``region`` (meaningful for multi-region keys only)."""
        return replace(self, region=region)

    def __str__(self) -> str:
        return f"arn:{self.partition}:kms:{self.region}:{self.account}:key/{self.key_id}"
