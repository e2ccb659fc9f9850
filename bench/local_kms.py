"""Local KMS regions for the AWS benchmark topics: moto processes behind kmsguard's fault proxy.

Every KMS call the code under test makes goes through a region's proxy, which counts it
by API; outages and throttling are the proxy's real faults (see kmsguard.testing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kmsguard.aws import AwsSettings, ClientFactory
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.multi_region import MultiRegionKeyring
from kmsguard.testing import TEST_ACCESS_KEY, TEST_SECRET_KEY, KmsRegion

_ENV = {
    "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1,localhost",
}


@contextmanager
def local_regions(*names: str) -> Iterator[list[KmsRegion]]:
    """One moto process and one proxy per region name, stopped afterwards."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    regions: list[KmsRegion] = []
    try:
        for name in names:
            regions.append(KmsRegion.start(name))
        yield regions
    finally:
        for region in regions:
            region.close()
            region.server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def factory(regions: list[KmsRegion], **overrides: Any) -> ClientFactory:
    """A client factory for these regions with the production preset, unless overridden."""
    values: dict[str, Any] = {
        "max_attempts": 3,
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
        "operation_timeout": 10.0,
        "max_pool_connections": 50,
        **overrides,
    }
    settings = AwsSettings(
        regions=tuple(r.name for r in regions), endpoints={r.name: r.endpoint for r in regions}, **values
    )
    return ClientFactory(settings)


def multi_region(clients: ClientFactory, **kwargs: Any) -> MultiRegionKeyring:
    return MultiRegionKeyring(
        {r: AwsKmsKeyring(clients, r) for r in clients.settings.regions},
        operation_timeout=clients.settings.operation_timeout,
        **kwargs,
    )
