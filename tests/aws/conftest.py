"""Keyrings wired to the session's local KMS region through its per-test fault proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kmsguard.aws import AwsSettings, ClientFactory
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.telemetry import Telemetry
from kmsguard.testing import KmsRegion

MakeKeyring = Callable[..., AwsKmsKeyring]


class RecordingTelemetry(Telemetry):
    """Keeps every kms_call report."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, float, int, int]] = []

    def kms_call(
        self, api: str, region: str, outcome: str, duration: float, attempts: int = 1, throttles: int = 0
    ) -> None:
        self.calls.append((api, region, outcome, duration, attempts, throttles))


@pytest.fixture
def make_keyring(kms_region: KmsRegion, aws_env: dict[str, str]) -> Iterator[MakeKeyring]:
    """``make_keyring(max_attempts=1, telemetry=...)``: an AwsKmsKeyring on ``kms_region``'s proxy."""
    made: list[AwsKmsKeyring] = []

    def make(telemetry: Telemetry | None = None, **overrides: Any) -> AwsKmsKeyring:
        fields: dict[str, Any] = {"regions": (kms_region.name,), "max_attempts": 1, **overrides}
        settings = AwsSettings(**fields)
        factory = ClientFactory(settings, telemetry) if telemetry else ClientFactory(settings)
        keyring = AwsKmsKeyring(factory)
        made.append(keyring)
        return keyring

    yield make
    for keyring in made:
        keyring.close()
