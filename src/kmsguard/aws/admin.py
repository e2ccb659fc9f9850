"""Key management for the AWS backend: status, rotation and creation of the classifications' keys.

What ``kmsguard keys`` runs with ``backend = "aws"``. Each classification's key is
looked up in every configured region (an alias is regional, so
``alias/<app>-payment-production`` must exist in each), through the same client
factory, retries, deadline and error mapping as the data path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kmsguard.aws.clients import ClientFactory
from kmsguard.errors import InvalidInput, KeyNotFound, KmsGuardError
from kmsguard.policy import ClassPolicy


@dataclass(frozen=True)
class KeyStatus:
    """One classification's key in one region. ``error`` is a kmsguard code when the lookup failed."""

    classification: str
    region: str
    key: str
    arn: str | None = None
    state: str | None = None
    spec: str | None = None
    usage: str | None = None
    multi_region: bool | None = None
    rotation_enabled: bool | None = None
    rotation_period_days: int | None = None
    next_rotation: str | None = None
    error: str | None = None

    @property
    def healthy(self) -> bool:
        """Enabled and rotating: what ``keys status --strict`` demands."""
        return self.error is None and self.state == "Enabled" and self.rotation_enabled is True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


class KeyAdmin:
    """Management calls for keys in the factory's regions."""

    def __init__(self, clients: ClientFactory) -> None:
        self.clients = clients

    def status(self, classes: Iterable[ClassPolicy]) -> list[KeyStatus]:
        """DescribeKey and GetKeyRotationStatus per classification and region; failures become rows."""
        rows = []
        for cls in classes:
            for region in cls.regions or self.clients.settings.regions:
                try:
                    rows.append(self._status(cls.name, region, cls.key))
                except KmsGuardError as exc:
                    rows.append(KeyStatus(cls.name, region, cls.key, error=exc.code))
        return rows

    def _status(self, classification: str, region: str, key: str) -> KeyStatus:
        meta = self.clients.call(region, "DescribeKey", key_ref=key, KeyId=key)["KeyMetadata"]
        rotation: dict[str, Any] = {}
        if meta.get("KeyManager") != "AWS" and meta.get("Origin", "AWS_KMS") == "AWS_KMS":
            rotation = self.clients.call(region, "GetKeyRotationStatus", key_ref=key, KeyId=meta["Arn"])
        next_rotation = rotation.get("NextRotationDate")
        return KeyStatus(
            classification=classification,
            region=region,
            key=key,
            arn=meta["Arn"],
            state=meta.get("KeyState"),
            spec=meta.get("KeySpec"),
            usage=meta.get("KeyUsage", "ENCRYPT_DECRYPT"),
            multi_region=bool(meta.get("MultiRegion", False)),
            rotation_enabled=rotation.get("KeyRotationEnabled"),
            rotation_period_days=rotation.get("RotationPeriodInDays"),
            next_rotation=next_rotation.isoformat() if next_rotation is not None else None,
        )

    def enable_rotation(self, key: str, period_days: int | None = None) -> list[str]:
        """Turn on automatic yearly (or every ``period_days``, 90-2560) rotation in every region."""
        params: dict[str, Any] = {}
        if period_days is not None:
            if not 90 <= period_days <= 2560:
                raise InvalidInput("--period-days must be between 90 and 2560")
            params["RotationPeriodInDays"] = period_days
        arns = []
        for region in self.clients.settings.regions:
            arn = self._arn(region, key)
            self.clients.call(region, "EnableKeyRotation", key_ref=arn, KeyId=arn, **params)
            arns.append(arn)
        return arns

    def rotate(self, key: str) -> str:
        """RotateKeyOnDemand in the primary region (replicas of a multi-region key follow it)."""
        region = self.clients.settings.region
        arn = self._arn(region, key)
        self.clients.call(region, "RotateKeyOnDemand", key_ref=arn, KeyId=arn)
        return arn

    def create(
        self, classification: str, alias: str | None, *, multi_region: bool, app: str, environment: str
    ) -> list[str]:
        """A symmetric key with rotation on and ``alias``; a multi-region key is replicated to every region.

        Returns the key ARN in each region. Without ``multi_region`` only the primary
        region gets a key (create the others' with ``--region``-specific config).
        """
        if alias is not None and (not alias.startswith("alias/") or alias.startswith("alias/aws/")):
            raise InvalidInput("--alias must look like alias/<name> and not use the reserved alias/aws/ prefix")
        regions = self.clients.settings.regions
        primary = regions[0]
        description = f"kmsguard {classification} key for {app} ({environment})"
        tags = [
            {"TagKey": "kmsguard:classification", "TagValue": classification},
            {"TagKey": "kmsguard:app", "TagValue": app},
        ]
        meta = self.clients.call(
            primary,
            "CreateKey",
            Description=description,
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            MultiRegion=multi_region,
            Tags=tags,
        )["KeyMetadata"]
        arns = {primary: str(meta["Arn"])}
        if multi_region:
            for region in regions[1:]:
                replica = self.clients.call(
                    primary,
                    "ReplicateKey",
                    key_ref=arns[primary],
                    KeyId=meta["KeyId"],
                    ReplicaRegion=region,
                    Description=description,
                    Tags=tags,
                )
                arns[region] = str(replica["ReplicaKeyMetadata"]["Arn"])
        for region, arn in arns.items():
            self.clients.call(region, "EnableKeyRotation", key_ref=arn, KeyId=arn)
            if alias is not None:
                self._ensure_alias(region, alias, arn)
        return list(arns.values())

    def _ensure_alias(self, region: str, alias: str, arn: str) -> None:
        """Create ``alias`` for ``arn``; one that already names this very key is fine (a re-run)."""
        try:
            current = self._arn(region, alias)
        except KeyNotFound:
            self.clients.call(region, "CreateAlias", key_ref=arn, AliasName=alias, TargetKeyId=arn)
            return
        if current != arn:
            raise InvalidInput(f"{alias} already names another key in {region}: {current}")

    def _arn(self, region: str, key: str) -> str:
        return str(self.clients.call(region, "DescribeKey", key_ref=key, KeyId=key)["KeyMetadata"]["Arn"])
