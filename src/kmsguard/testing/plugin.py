"""pytest plugin (entry point ``pytest11``): local KMS regions with fault injection.

Installed with kmsguard, so an application's own tests can use it too. Fixtures:

``kms_server``      one moto server process for the whole session (started on first use).
``kms_region``      region ``us-east-1``: a fresh :class:`FaultProxy` per test in front of ``kms_server``.
``kms_regions``     factory ``kms_regions("us-east-1", "eu-west-1")`` -> one :class:`KmsRegion` each,
                    every region with its *own* moto process (started once per session per name)
                    and its own proxy, so one region's outage leaves the others up.
``aws_env``         an offline AWS environment: dummy credentials, no shared config files, no
                    instance metadata, ``AWS_REGION`` and ``AWS_ENDPOINT_URL_KMS`` -> ``kms_region``.
``kmsguard_aws_env`` ``aws_env`` plus ``KMSGUARD_BACKEND=aws``, a temporary ``KMSGUARD_HOME``, a
                    unique ``KMSGUARD_APP`` and a key with alias ``alias/<app>-<class>-development``
                    for each default classification; returns ``{classification: key ARN}``. At the
                    end of the test it closes the audit writer of every Guard made in that home
                    (a test need not close its Guards), while the region still answers.

Proxies are per test, so faults never leak from one test into the next.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmsguard.testing.moto_server import MotoServer
from kmsguard.testing.region import TEST_ACCESS_KEY, TEST_SECRET_KEY, KmsRegion

DEFAULT_REGION = "us-east-1"

#: Variables that would let the developer's own AWS setup leak into a test.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "KMSGUARD_REGIONS",
    "KMSGUARD_CONFIG",
    "KMSGUARD_PASSPHRASE",
)


@pytest.fixture(scope="session")
def _kms_server_pool() -> Iterator[dict[str, MotoServer]]:
    pool: dict[str, MotoServer] = {}
    yield pool
    for server in pool.values():
        server.stop()


@pytest.fixture(scope="session")
def kms_server(_kms_server_pool: dict[str, MotoServer]) -> MotoServer:
    """The session's shared moto server (the one behind ``kms_region``)."""
    return _server_for(_kms_server_pool, DEFAULT_REGION)


@pytest.fixture
def kms_region(kms_server: MotoServer) -> Iterator[KmsRegion]:
    """``us-east-1`` behind a fresh fault-injecting proxy."""
    region = KmsRegion.start(DEFAULT_REGION, kms_server)
    yield region
    region.close()


@pytest.fixture
def kms_regions(_kms_server_pool: dict[str, MotoServer]) -> Iterator[Callable[..., list[KmsRegion]]]:
    """Factory: independent regions, each its own moto process and proxy."""
    made: list[KmsRegion] = []

    def make(*names: str) -> list[KmsRegion]:
        regions = [KmsRegion.start(name, _server_for(_kms_server_pool, name)) for name in names]
        made.extend(regions)
        return regions

    yield make
    for region in made:
        region.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kms_region: KmsRegion) -> dict[str, str]:
    """An AWS environment that can only reach ``kms_region``: nothing from the developer's setup."""
    for var in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(var, raising=False)
    env = offline_aws_env(kms_region, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def kmsguard_aws_env(
    aws_env: dict[str, str], kms_region: KmsRegion, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """kmsguard configured for ``backend = "aws"`` against ``kms_region``, with one key per class.

    Afterwards, every audit writer spooling in the test's home is closed (its records
    delivered, its deliverer stopped) before the region goes away.
    """
    app = f"t{uuid.uuid4().hex[:12]}"
    home = tmp_path / "kmsguard-home"
    monkeypatch.setenv("KMSGUARD_BACKEND", "aws")
    monkeypatch.setenv("KMSGUARD_APP", app)
    monkeypatch.setenv("KMSGUARD_ENVIRONMENT", "development")
    monkeypatch.setenv("KMSGUARD_HOME", str(home))
    for var in ("KMSGUARD_KEY_GENERAL", "KMSGUARD_KEY_PII", "KMSGUARD_KEY_PAYMENT"):
        monkeypatch.delenv(var, raising=False)
    yield {c: kms_region.create_key(f"alias/{app}-{c}-development") for c in ("general", "pii", "payment")}
    from kmsguard.audit.lifecycle import close_all  # here: the plugin loads in every pytest run

    close_all(home, timeout=30.0)  # delivery that fails ends the wait at once


def offline_aws_env(region: KmsRegion, scratch: Path) -> dict[str, str]:
    """The variables that point boto3 at ``region`` only: dummy credentials, no shared config
    files (names under ``scratch`` that do not exist), no instance metadata, no HTTP proxy."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(scratch / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials-absent"),
        "AWS_REGION": region.name,
        "AWS_DEFAULT_REGION": region.name,
        "AWS_ENDPOINT_URL_KMS": region.endpoint,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def _server_for(pool: dict[str, MotoServer], region: str) -> MotoServer:
    server = pool.get(region)
    if server is None or not server.running:
        server = pool[region] = MotoServer().start()
    return server
