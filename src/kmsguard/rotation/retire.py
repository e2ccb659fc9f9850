"""Retiring an old key, only once a census shows that nothing stored depends on it.

The census is taken of the sources named (and recorded), or, when none is named, the
last recorded census of every source is used; with no census at all there is no
evidence, and retiring is refused. ``force`` overrides a refusal, for the operator who
knows better and says so.

- Local: the version's key material is erased from the key file (it stays listed as
  ``retired``); envelopes still under it fail with KEY_DISABLED naming the retirement.
- AWS: DisableKey on the old key ARN (reversible with EnableKey), and optionally
  ScheduleKeyDeletion after 7-30 days (reversible until then with CancelKeyDeletion).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.rotation.census import Census, record, recorded, take
from kmsguard.rotation.sources import open_source

_ARN = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):[0-9]{12}:key/[A-Za-z0-9-]+")


class KeyInUse(KmsGuardError):
    """A census still counts envelopes under the key that was to be retired."""

    code = "KEY_IN_USE"
    http_status = 409
    default_message = "stored envelopes still depend on this key"


@dataclass(frozen=True)
class Evidence:
    """The censuses a retirement decision rests on, and what they count under the key."""

    key_ref: str
    censuses: list[Census]

    @property
    def leftovers(self) -> list[tuple[str, int]]:
        return [(c.source, n) for c in self.censuses if (n := c.under(self.key_ref))]

    def check(self, force: bool) -> None:
        if not self.censuses and not force:
            raise InvalidInput(
                "no census is recorded: name the sources that hold envelopes with --source "
                "(or run 'kmsguard census SOURCE' for each), or pass --force"
            )
        left = self.leftovers
        if left and not force:
            where = "; ".join(f"{n} in {source}" for source, n in left)
            raise KeyInUse(
                f"{sum(n for _, n in left)} envelope(s) are still under {self.key_ref} ({where}); "
                "run 'kmsguard rewrap' on them first, or pass --force"
            )


def evidence(home: Path, key_ref: str, sources: Sequence[str]) -> Evidence:
    """A fresh census of each of ``sources`` (recorded), or else the recorded ones."""
    if not sources:
        return Evidence(key_ref, recorded(home))
    censuses = []
    for url in sources:
        census = take(open_source(url))
        record(home, census)
        censuses.append(census)
    return Evidence(key_ref, censuses)


def region_of(arn: str) -> str:
    match = _ARN.fullmatch(arn)
    if match is None:
        raise InvalidInput("--key must be a full key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), as the census shows it")
    return match[1]
