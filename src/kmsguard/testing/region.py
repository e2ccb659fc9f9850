"""A local KMS "region": a moto server process behind its own fault-injecting proxy.

Code under test talks to ``region.endpoint`` (the proxy); test setup talks to moto
directly through ``region.admin`` so that creating keys neither shows up in the
proxy's counters nor trips its faults. Several regions, each with its own moto
process and proxy, model independent AWS regions: one can go down while the others
keep answering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmsguard.testing.moto_server import MotoServer
from kmsguard.testing.proxy import FaultProxy

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

#: moto's default account.
ACCOUNT_ID = "123456789012"
#: Dummy credentials the kit uses everywhere; moto does not check signatures.
TEST_ACCESS_KEY = "AKIAKMSGUARDTESTKEY0"
TEST_SECRET_KEY = "kmsguard-test-secret-not-a-real-key"  # noqa: S105


@dataclass
class KmsRegion:
    """One region: ``name``, the moto ``server``, and the ``proxy`` in front of it."""

    name: str
    server: MotoServer
    proxy: FaultProxy
    _admin: KMSClient | None = field(default=None, repr=False)

    @classmethod
    def start(cls, name: str, server: MotoServer | None = None) -> KmsRegion:
        """A proxy in front of ``server`` (a new moto process when none is given)."""
        server = server if server is not None else MotoServer().start()
        return cls(name, server, FaultProxy(server.url).start())

    @property
    def endpoint(self) -> str:
        """The URL code under test uses (the proxy)."""
        return self.proxy.url

    @property
    def admin(self) -> KMSClient:
        """A KMS client straight to moto, for test setup; never faulted or counted."""
        if self._admin is None:
            import boto3  # here, so that loading the pytest plugin does not import boto3
            from botocore.config import Config

            self._admin = boto3.client(
                "kms",
                region_name=self.name,
                endpoint_url=self.server.url,
                aws_access_key_id=TEST_ACCESS_KEY,
                aws_secret_access_key=TEST_SECRET_KEY,
                config=Config(retries={"mode": "standard", "total_max_attempts": 2}),
            )
        return self._admin

    def create_key(self, alias: str | None = None, *, multi_region: bool = False, **kwargs: Any) -> str:
        """A symmetric ENCRYPT_DECRYPT key (and its alias); returns the key ARN."""
        meta = self.admin.create_key(MultiRegion=multi_region, **kwargs)["KeyMetadata"]
        if alias is not None:
            self.admin.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
        return meta["Arn"]

    def close(self) -> None:
        """Stop the proxy (the server may be shared and is stopped by its owner)."""
        self.proxy.stop()
