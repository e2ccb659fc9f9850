"""The test kit itself: moto behind the proxy answers, and each fault is what botocore sees."""

from __future__ import annotations

from collections.abc import Callable

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from kmsguard.testing import KmsRegion


def _client(region: KmsRegion, **config: object) -> object:
    cfg = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=config.pop("connect_timeout", 2),
        read_timeout=config.pop("read_timeout", 5),
    )
    return boto3.client("kms", region_name=region.name, endpoint_url=region.endpoint, config=cfg)


def test_forwards_to_moto_and_counts_per_api(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    arn = kms_region.create_key()
    kms = _client(kms_region)
    out = kms.generate_data_key(KeyId=arn, KeySpec="AES_256")  # type: ignore[attr-defined]
    assert len(out["Plaintext"]) == 32 and out["KeyId"] == arn
    assert kms_region.proxy.counts["GenerateDataKey"] == 1
    assert kms_region.proxy.counts["CreateKey"] == 0  # setup goes straight to moto


def test_injected_error_for_one_key_only(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    disabled, fine = kms_region.create_key(), kms_region.create_key()
    kms_region.proxy.inject("DisabledException", key_id=disabled)
    kms = _client(kms_region)
    with pytest.raises(ClientError) as info:
        kms.generate_data_key(KeyId=disabled, KeySpec="AES_256")  # type: ignore[attr-defined]
    assert info.value.response["Error"]["Code"] == "DisabledException"
    kms.generate_data_key(KeyId=fine, KeySpec="AES_256")  # type: ignore[attr-defined]


def test_count_limited_throttle_then_passes(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    arn = kms_region.create_key()
    kms_region.proxy.throttle(count=1)
    kms = _client(kms_region)
    with pytest.raises(ClientError) as info:
        kms.describe_key(KeyId=arn)  # type: ignore[attr-defined]
    assert info.value.response["Error"]["Code"] == "ThrottlingException"
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["Arn"] == arn  # type: ignore[attr-defined]


def test_stall_is_a_read_timeout(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    kms_region.proxy.stall(5)
    with pytest.raises(ReadTimeoutError):
        _client(kms_region, read_timeout=0.3).list_keys()  # type: ignore[attr-defined]


def test_refused_outage_and_restore(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    kms = _client(kms_region)
    kms.list_keys()  # type: ignore[attr-defined]  # leaves a pooled keep-alive connection
    kms_region.proxy.outage("refuse")
    with pytest.raises(EndpointConnectionError):
        kms.list_keys()  # type: ignore[attr-defined]
    kms_region.proxy.restore()
    kms.list_keys()  # type: ignore[attr-defined]


def test_blackhole_outage_is_a_connect_timeout(kms_region: KmsRegion, aws_env: dict[str, str]) -> None:
    kms_region.proxy.outage("blackhole")
    with pytest.raises(ConnectTimeoutError):
        _client(kms_region, connect_timeout=0.3).list_keys()  # type: ignore[attr-defined]
    kms_region.proxy.restore()
    _client(kms_region).list_keys()  # type: ignore[attr-defined]


def test_silent_outage_accepts_and_never_answers_even_on_open_connections(
    kms_region: KmsRegion, aws_env: dict[str, str]
) -> None:
    kms = _client(kms_region, read_timeout=0.3)
    kms.list_keys()  # type: ignore[attr-defined]  # leaves a pooled keep-alive connection
    kms_region.proxy.outage("silent")
    with pytest.raises(ReadTimeoutError):
        kms.list_keys()  # type: ignore[attr-defined]
    with pytest.raises(ReadTimeoutError):
        _client(kms_region, read_timeout=0.3).list_keys()  # type: ignore[attr-defined]  # a new connection too
    assert kms_region.proxy.counts["ListKeys"] == 3  # each request arrived
    kms_region.proxy.restore()
    kms.list_keys()  # type: ignore[attr-defined]


def test_separate_regions_are_separate_processes(
    kms_regions: Callable[..., list[KmsRegion]], aws_env: dict[str, str]
) -> None:
    east, west = kms_regions("us-east-1", "eu-west-1")
    assert east.server.port != west.server.port
    east_key = east.create_key()
    west.proxy.outage("refuse")
    assert _client(east).describe_key(KeyId=east_key)["KeyMetadata"]["Arn"] == east_key  # type: ignore[attr-defined]
    with pytest.raises(EndpointConnectionError):
        _client(west).list_keys()  # type: ignore[attr-defined]
