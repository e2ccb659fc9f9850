"""Retries, throttling, deadlines and the per-call accounting, against the proxy over real HTTP."""

from __future__ import annotations

import time

import pytest

from kmsguard import errors, operation
from kmsguard.keyrings.base import KeyRequest
from kmsguard.operation import Operation
from kmsguard.testing import KmsRegion

from .conftest import MakeKeyring, RecordingTelemetry


def _request(arn: str) -> KeyRequest:
    return KeyRequest("general", arn, {})


def test_throttled_calls_recover_in_one_accounted_call(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    telemetry = RecordingTelemetry()
    keyring = make_keyring(telemetry, max_attempts=3)
    kms_region.proxy.throttle(count=2, api="GenerateDataKey")
    data_key = keyring.generate(_request(arn))
    assert data_key.wrapped[0].key_ref == arn
    assert kms_region.proxy.counts["GenerateDataKey"] == 3
    assert keyring.clients.stats.total("attempts", api="GenerateDataKey", outcome="ok") == 3
    assert keyring.clients.stats.total("retries", api="GenerateDataKey") == 2
    assert keyring.clients.stats.total("throttles", api="GenerateDataKey") == 2
    api, region, outcome, duration, attempts, throttles = telemetry.calls[-1]
    assert (api, region, outcome, attempts, throttles) == ("GenerateDataKey", "us-east-1", "ok", 3, 2)
    assert duration > 0


def test_throttling_at_a_rate_loses_no_call(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    keyring = make_keyring(max_attempts=6)
    kms_region.proxy.throttle(rate=0.3)
    for _ in range(5):
        keyring.unwrap(keyring.generate(_request(arn)).wrapped, _request(arn))
    stats = keyring.clients.stats
    assert stats.total("calls", outcome="ok") == 10 and stats.total("calls") == 10
    assert stats.total("throttles") == kms_region.proxy.statuses[400] > 0


def test_throttling_at_30_percent_fails_nothing_even_with_one_attempt(
    kms_region: KmsRegion, make_keyring: MakeKeyring
) -> None:
    """max_attempts = 1 leaves every retry to kmsguard's wait-out: no call may fail, each is counted once."""
    arn = kms_region.create_key()
    telemetry = RecordingTelemetry()
    keyring = make_keyring(telemetry, max_attempts=1, operation_timeout=20)
    kms_region.proxy.throttle(rate=0.3)
    for _ in range(12):
        keyring.unwrap(keyring.generate(_request(arn)).wrapped, _request(arn))
    stats = keyring.clients.stats
    assert stats.total("calls", outcome="ok") == stats.total("calls") == 24
    throttled = kms_region.proxy.statuses[400]
    assert throttled > 0
    assert stats.total("throttles") == stats.total("retries") == throttled
    assert stats.total("attempts") == 24 + throttled == kms_region.proxy.counts.total()
    assert sum(c[5] for c in telemetry.calls) == throttled and all(c[2] == "ok" for c in telemetry.calls)


def test_throttling_that_never_ends_fails_rate_limited_at_the_deadline(
    kms_region: KmsRegion, make_keyring: MakeKeyring
) -> None:
    arn = kms_region.create_key()
    telemetry = RecordingTelemetry()
    keyring = make_keyring(telemetry, max_attempts=2, operation_timeout=1.5)
    keyring.clients.client(kms_region.name)  # built up front: building it must not eat the budget
    kms_region.proxy.throttle()
    started = time.monotonic()
    with pytest.raises(errors.RateLimited) as info:
        keyring.generate(_request(arn))
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 5  # waited out until (about) the deadline, then gave up
    assert info.value.retryable and info.value.http_status == 429
    assert "ThrottlingException" in info.value.message
    api, _, outcome, _, attempts, throttles = telemetry.calls[-1]
    assert (api, outcome) == ("GenerateDataKey", "RATE_LIMITED")
    assert attempts == throttles == kms_region.proxy.counts["GenerateDataKey"] > 2  # more than max_attempts


def test_without_a_deadline_throttling_gets_max_attempts(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    telemetry = RecordingTelemetry()
    kms_region.proxy.throttle()
    with pytest.raises(errors.RateLimited):
        make_keyring(telemetry, max_attempts=2, operation_timeout=0).generate(_request(arn))
    assert telemetry.calls[-1][2:3] == ("RATE_LIMITED",) and telemetry.calls[-1][4:] == (2, 2)


def test_an_outage_is_not_waited_out(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    """5xx answers get max_attempts, not the deadline: an outage is reported (or failed over) at once."""
    arn = kms_region.create_key()
    kms_region.proxy.server_error(503)
    started = time.monotonic()
    with pytest.raises(errors.KmsServiceError):
        make_keyring(max_attempts=2, operation_timeout=30).generate(_request(arn))
    assert time.monotonic() - started < 10
    assert kms_region.proxy.counts["GenerateDataKey"] == 2


def test_limit_exceeded_gets_max_attempts(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    """LimitExceededException is also KMS's answer for resource quotas, which waiting does not free."""
    arn = kms_region.create_key()
    kms_region.proxy.inject("LimitExceededException", api="GenerateDataKey")
    with pytest.raises(errors.RateLimited):
        make_keyring(max_attempts=3, operation_timeout=30).generate(_request(arn))
    assert kms_region.proxy.counts["GenerateDataKey"] == 3


def test_server_errors_and_resets_are_retried(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    keyring = make_keyring(max_attempts=3)
    kms_region.proxy.server_error(500, count=1)
    kms_region.proxy.reset(count=1)
    keyring.generate(_request(arn))
    assert kms_region.proxy.counts["GenerateDataKey"] == 3


def test_stalled_endpoint_fails_within_the_operation_deadline(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    """read_timeout x attempts would be 60 s; the operation deadline ends it long before."""
    arn = kms_region.create_key()
    keyring = make_keyring(max_attempts=3, read_timeout=20, operation_timeout=0.5)
    keyring.resolve(arn)
    kms_region.proxy.stall(30)
    started = time.monotonic()
    with pytest.raises(errors.KmsTimeout, match="operation deadline"):
        keyring.generate(_request(arn))
    assert time.monotonic() - started < 10  # far below one read timeout: the deadline, not botocore, ended it


def test_abandoned_call_starts_no_further_attempt(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    arn = kms_region.create_key()
    keyring = make_keyring(max_attempts=5, read_timeout=1.0, operation_timeout=0.5)
    keyring.clients.client(kms_region.name)  # built up front: building it must not eat the 0.5 s budget
    kms_region.proxy.stall(3)
    with pytest.raises(errors.KmsTimeout):
        keyring.generate(_request(arn))
    stats = keyring.clients.stats
    for _ in range(200):  # the worker's one attempt times out in the background, then it gives up
        if stats.total("calls", api="GenerateDataKey"):
            break
        time.sleep(0.05)
    assert stats.total("calls", api="GenerateDataKey", outcome="KMS_TIMEOUT") == 1
    assert kms_region.proxy.counts["GenerateDataKey"] == 1


def test_each_kms_call_is_noted_in_the_current_operation(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    kms_region.create_key(alias="alias/resilience-op")
    keyring = make_keyring()
    op = Operation("encrypt", "general", {}, "tester")
    token = operation.current.set(op)
    try:
        data_key = keyring.generate(_request("alias/resilience-op"))
        keyring.generate(_request("alias/resilience-op"))  # alias cached: no second DescribeKey
    finally:
        operation.current.reset(token)
    assert op.kms_calls == 3
    assert op.regions == ["us-east-1"]
    assert op.key_refs == [data_key.wrapped[0].key_ref]
    assert kms_region.proxy.counts["DescribeKey"] == 1


def test_alias_cache_expires(kms_region: KmsRegion, make_keyring: MakeKeyring) -> None:
    kms_region.create_key(alias="alias/resilience-ttl")
    keyring = make_keyring(alias_cache_ttl=0)
    keyring.generate(_request("alias/resilience-ttl"))
    keyring.generate(_request("alias/resilience-ttl"))
    assert kms_region.proxy.counts["DescribeKey"] == 2


def test_clients_are_shared_per_region(make_keyring: MakeKeyring) -> None:
    factory = make_keyring().clients
    assert factory.client("us-east-1") is factory.client("us-east-1")
    assert factory.client("eu-west-1") is not factory.client("us-east-1")
    config = factory.client("us-east-1").meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}  # kmsguard retries, not botocore
    assert config.user_agent_extra.startswith("kmsguard/")


def test_one_region_retries_timed_out_reads_on_new_connections_until_the_deadline(
    kms_region: KmsRegion, make_keyring: MakeKeyring
) -> None:
    """With nowhere else to go, a read timeout is retried (max_attempts = 1 notwithstanding) while time is left."""
    arn = kms_region.create_key()
    keyring = make_keyring(max_attempts=1, read_timeout=0.3, operation_timeout=10)
    kms_region.proxy.stall(5, api="GenerateDataKey", count=2)
    assert keyring.generate(_request(arn)).wrapped[0].key_ref == arn
    assert kms_region.proxy.counts["GenerateDataKey"] == 3
    assert keyring.clients.stats.total("attempts", api="GenerateDataKey", outcome="ok") == 3
