"""Test kit: local KMS regions (moto server processes) behind a fault-injecting proxy.

Use the pytest fixtures from :mod:`kmsguard.testing.plugin` (registered automatically
as a pytest plugin when kmsguard is installed), or the classes directly::

    from kmsguard.testing import KmsRegion
    region = KmsRegion.start("us-east-1")       # moto process + proxy
    arn = region.create_key("alias/app-general-development")
    region.proxy.throttle(count=2)               # the next two KMS calls are throttled
    ...
    region.close(); region.server.stop()

Multi-region keys: ``create_multi_region_key(primary, [replica, ...])`` (moto cannot
decrypt its own ``mrk-`` ciphertexts, so the kit emulates replicas; see
:mod:`kmsguard.testing.replicas`).
"""

from kmsguard.testing.moto_server import MotoServer, free_port
from kmsguard.testing.proxy import FaultProxy, Rule, SeenRequest
from kmsguard.testing.region import ACCOUNT_ID, TEST_ACCESS_KEY, TEST_SECRET_KEY, KmsRegion
from kmsguard.testing.replicas import create_multi_region_key

__all__ = [
    "ACCOUNT_ID",
    "TEST_ACCESS_KEY",
    "TEST_SECRET_KEY",
    "FaultProxy",
    "KmsRegion",
    "MotoServer",
    "Rule",
    "SeenRequest",
    "create_multi_region_key",
    "free_port",
]
