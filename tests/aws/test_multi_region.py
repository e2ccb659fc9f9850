"""MultiRegionKeyring against real local regions: one moto process and one fault proxy each.

Outages are real sockets (refused or blackholed at the region's proxy); the only thing
injected in-process is the breaker's clock, so cool-downs pass without sleeping.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmsguard import AllRegionsFailed, ConfigurationError, Guard, KmsGuardError, envelope
from kmsguard.aws import AwsSettings, ClientFactory
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.caching import CachingKeyring
from kmsguard.keyrings.multi_region import MultiRegionKeyring
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.telemetry import Telemetry
from kmsguard.testing import KmsRegion
from kmsguard.testing.replicas import create_multi_region_key

NO_CACHE = CacheLimits(reuse=False, decrypt_ttl=0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Failovers(Telemetry):
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def failover(self, from_region: str, to_region: str) -> None:
        self.seen[(from_region, to_region)] += 1


@pytest.fixture
def regions(kms_regions: Callable[..., list[KmsRegion]], aws_env: dict[str, str]) -> list[KmsRegion]:
    return kms_regions("us-east-1", "eu-west-1")


@pytest.fixture
def factory(regions: list[KmsRegion]) -> Iterator[ClientFactory]:
    settings = AwsSettings(
        regions=tuple(r.name for r in regions),
        endpoints={r.name: r.endpoint for r in regions},
        max_attempts=2,
        connect_timeout=0.5,
        read_timeout=2.0,
        operation_timeout=6.0,
    )
    f = ClientFactory(settings)
    yield f
    f.close()


def keyring(factory: ClientFactory, **kwargs: object) -> MultiRegionKeyring:
    return MultiRegionKeyring(
        {r: AwsKmsKeyring(factory, r) for r in factory.settings.regions},
        **kwargs,  # type: ignore[arg-type]
    )


def guard_for(key: str, mr: MultiRegionKeyring) -> Guard:
    return Guard(Policy([ClassPolicy("general", key, cache=NO_CACHE)]), mr)


def wrap_all_guard(regions: list[KmsRegion], factory: ClientFactory) -> Guard:
    """Single-region keys, one per region, and every data key wrapped in both."""
    east, west = regions
    keys = {"us-east-1": east.create_key(), "eu-west-1": west.create_key()}
    return guard_for(keys["us-east-1"], keyring(factory, region_keys={"general": keys}, wrap_in_all_regions=True))


def regions_of(sealed: bytes) -> list[str]:
    return [w.key_ref.split(":")[3] for w in envelope.parse(sealed).wrapped_keys]


# ---------------------------------------------------------------------- multi-region keys


def test_mrk_ciphertexts_decrypt_in_the_replica_while_the_primary_is_down(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    telemetry = Failovers()
    guard = guard_for(key, keyring(factory, telemetry=telemetry))
    made_in_east = guard.encrypt(b"booked", "general", {"trip": "1"})
    assert regions_of(made_in_east) == ["us-east-1"]

    east.proxy.outage("refuse")
    assert guard.decrypt(made_in_east) == b"booked"
    made_in_west = guard.encrypt(b"paid", "general")
    assert regions_of(made_in_west) == ["eu-west-1"]
    assert telemetry.seen[("us-east-1", "eu-west-1")] == 2

    east.proxy.restore()
    west.proxy.outage("refuse")
    assert guard.decrypt(made_in_west) == b"paid"  # the west ciphertext opens in the east replica


# ---------------------------------------------------------------------- single-region keys


def test_wrap_in_all_regions_lets_any_region_decrypt(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    guard = wrap_all_guard(regions, factory)
    sealed = guard.encrypt(b"ticket", "general", {"pnr": "X1"})
    assert regions_of(sealed) == ["us-east-1", "eu-west-1"]
    assert east.proxy.counts["GenerateDataKey"] == 1 and west.proxy.counts["Encrypt"] == 1

    east.proxy.outage("refuse")
    assert guard.decrypt(sealed) == b"ticket"
    assert west.proxy.counts["Decrypt"] == 1


def test_a_region_down_at_encrypt_is_left_out_of_that_envelope(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    west = regions[1]
    guard = wrap_all_guard(regions, factory)
    west.proxy.outage("refuse")
    sealed = guard.encrypt(b"x", "general")
    assert regions_of(sealed) == ["us-east-1"]
    assert guard.decrypt(sealed) == b"x"


def test_a_misconfigured_region_key_fails_the_encrypt(regions: list[KmsRegion], factory: ClientFactory) -> None:
    west = regions[1]
    guard = wrap_all_guard(regions, factory)
    west.proxy.inject("NotFoundException", api="Encrypt")
    with pytest.raises(KmsGuardError) as info:
        guard.encrypt(b"x", "general")
    assert info.value.code == "KEY_NOT_FOUND"


def test_mixed_region_ciphertexts_in_one_batch(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    keys = {"us-east-1": east.create_key(), "eu-west-1": west.create_key()}
    guard = guard_for(keys["us-east-1"], keyring(factory, region_keys={"general": keys}, failures=100))
    from_east = [guard.encrypt(b"e%d" % i, "general") for i in range(3)]
    east.proxy.outage("refuse")
    from_west = [guard.encrypt(b"w%d" % i, "general") for i in range(3)]
    assert {r for s in from_west for r in regions_of(s)} == {"eu-west-1"}
    east.proxy.restore()

    mixed = [x for pair in zip(from_east, from_west, strict=True) for x in pair]
    assert [r.get() for r in guard.decrypt_many(mixed)] == [b"e0", b"w0", b"e1", b"w1", b"e2", b"w2"]

    east.proxy.outage("refuse")  # east-only envelopes fail alone; the batch goes on
    results = guard.decrypt_many(mixed)
    assert [r.ok for r in results] == [False, True] * 3
    assert all(isinstance(r.error, AllRegionsFailed) for r in results[::2])


# ---------------------------------------------------------------------- breaker, deadline, throttling


def test_breaker_opens_skips_then_one_probe_closes_it(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    clock = Clock()
    mr = keyring(factory, failures=2, cooldown=30.0, clock=clock)
    guard = guard_for(key, mr)
    breaker = mr.breakers["us-east-1"]

    east.proxy.outage("refuse")
    for _ in range(2):
        guard.encrypt(b"x", "general")
    assert breaker.state == "open"
    before = east.proxy.counts.total()
    for _ in range(5):
        guard.encrypt(b"x", "general")  # served by the west, the east is not even tried
    assert east.proxy.counts.total() == before

    clock.now += 31
    assert breaker.state == "half-open"
    guard.encrypt(b"x", "general")  # the probe fails: open again at once
    assert breaker.state == "open" and east.proxy.counts.total() == before

    east.proxy.restore()
    clock.now += 31
    sealed = guard.encrypt(b"back", "general")  # the probe succeeds
    assert breaker.state == "closed"
    assert regions_of(sealed) == ["us-east-1"] and east.proxy.counts["GenerateDataKey"] == 1


def test_blackholed_primary_fails_over_within_the_deadline(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory, failures=1))
    east.proxy.outage("blackhole")
    sealed = guard.encrypt(b"x", "general")
    assert regions_of(sealed) == ["eu-west-1"]
    assert guard.decrypt(sealed) == b"x"


def test_every_region_down_is_all_regions_failed(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory))
    sealed = guard.encrypt(b"x", "general")
    for region in regions:
        region.proxy.outage("refuse")
    with pytest.raises(AllRegionsFailed) as info:
        guard.decrypt(sealed)
    assert "us-east-1" in info.value.message and "eu-west-1" in info.value.message


def test_persistent_throttling_fails_over_without_opening_the_breaker(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    mr = keyring(factory, failures=1)
    guard = guard_for(key, mr)
    east.proxy.throttle()
    assert regions_of(guard.encrypt(b"x", "general")) == ["eu-west-1"]
    assert mr.breakers["us-east-1"].state == "closed"


def test_when_every_region_is_throttled_they_are_tried_again_until_one_serves(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    telemetry = Failovers()
    mr = keyring(factory, operation_timeout=20.0, telemetry=telemetry)
    guard = guard_for(key, mr)
    east.proxy.throttle()
    west.proxy.throttle(count=3)  # max_attempts = 2: the west fails the first round too
    assert regions_of(guard.encrypt(b"x", "general")) == ["eu-west-1"]
    assert west.proxy.counts["GenerateDataKey"] == 4 and east.proxy.counts["GenerateDataKey"] >= 4
    assert telemetry.seen[("us-east-1", "eu-west-1")] >= 2 and telemetry.seen[("eu-west-1", "us-east-1")] >= 1
    assert mr.breakers["us-east-1"].state == mr.breakers["eu-west-1"].state == "closed"


def test_throttling_everywhere_fails_at_the_deadline_naming_each_region(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory, operation_timeout=1.5))
    guard.encrypt(b"warm", "general")  # clients built: building them must not eat the budget
    for region in regions:
        region.proxy.throttle()
    started = time.monotonic()
    with pytest.raises(AllRegionsFailed) as info:
        guard.encrypt(b"x", "general")
    assert 1.0 < time.monotonic() - started < 5
    assert "us-east-1: RATE_LIMITED" in info.value.message and "eu-west-1: RATE_LIMITED" in info.value.message


def test_throttling_at_30_percent_in_both_regions_fails_nothing(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory, operation_timeout=20.0))
    for region in regions:
        region.proxy.throttle(rate=0.3)
    for i in range(20):
        assert guard.decrypt(guard.encrypt(b"m%d" % i, "general")) == b"m%d" % i
    assert east.proxy.statuses[400] > 0
    assert factory.stats.total("throttles") == east.proxy.statuses[400] + west.proxy.statuses[400]


def test_a_disabled_key_is_not_failed_over(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory))
    east.proxy.inject("DisabledException", api="GenerateDataKey")
    with pytest.raises(Exception, match="disabled") as info:
        guard.encrypt(b"x", "general")
    assert getattr(info.value, "code", None) == "KEY_DISABLED"
    assert west.proxy.counts["GenerateDataKey"] == 0


# ---------------------------------------------------------------------- configuration


def _config(home: Path, east: KmsRegion, west: KmsRegion, extra: str = "") -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "kmsguard.toml").write_text(
        f"""backend = "aws"
[aws]
regions = ["us-east-1", "eu-west-1"]
{extra}
[aws.endpoints]
us-east-1 = "{east.endpoint}"
eu-west-1 = "{west.endpoint}"
"""
    )


def test_from_env_builds_a_cached_failover_stack(
    regions: list[KmsRegion], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    home = tmp_path / "home"
    _config(home, east, west, "breaker_failures = 1")
    monkeypatch.setenv("KMSGUARD_HOME", str(home))
    monkeypatch.setenv("KMSGUARD_KEY_GENERAL", key)
    monkeypatch.delenv("AWS_ENDPOINT_URL_KMS")
    with Guard.from_env() as guard:
        assert isinstance(guard.keyring, CachingKeyring) and isinstance(guard.keyring.inner, MultiRegionKeyring)
        east.proxy.outage("refuse")
        sealed = guard.encrypt(b"x", "general")
        assert regions_of(sealed) == ["eu-west-1"] and guard.decrypt(sealed) == b"x"


@pytest.mark.parametrize(
    ("extra", "field"),
    [("breaker_failures = 0", "aws.breaker_failures"), ("wrap_in_all_regions = 1", "aws.wrap_in_all_regions")],
)
def test_bad_multi_region_settings_name_the_field(
    regions: list[KmsRegion], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, field: str
) -> None:
    home = tmp_path / "home"
    _config(home, *regions, extra)
    monkeypatch.setenv("KMSGUARD_HOME", str(home))
    with pytest.raises(ConfigurationError, match=field):
        Guard.from_env()


def test_emulated_replica_describes_itself_in_its_own_region(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    arn = create_multi_region_key(east, [west])
    mrk_id = arn.rpartition("/")[2]
    assert mrk_id.startswith("mrk-") and len(mrk_id) == 36
    assert AwsKmsKeyring(factory, "eu-west-1").resolve(mrk_id) == arn.replace("us-east-1", "eu-west-1")
    assert west.proxy.counts["DescribeKey"] == 1 and east.proxy.counts["DescribeKey"] == 0


def test_failure_messages_name_regions_and_codes_only(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    guard = guard_for(key, keyring(factory))
    sealed = guard.encrypt(b"4111111111111111", "general")
    wrapped = envelope.parse(sealed).wrapped_keys[0].wrapped
    for region in regions:
        region.proxy.outage("refuse")
    with pytest.raises(AllRegionsFailed) as info:
        guard.decrypt(sealed)
    text = str(info.value)
    assert "4111" not in text and wrapped.hex() not in text and "KMS_SERVICE_ERROR" in text


def test_rewrap_in_all_regions_keeps_the_body_and_opens_in_either(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    guard = wrap_all_guard(regions, factory)
    west.proxy.outage("refuse")
    sealed = guard.encrypt(b"old", "general")  # made while the west was down: east only
    assert regions_of(sealed) == ["us-east-1"]
    west.proxy.restore()

    rewrapped = guard.rewrap(sealed)
    assert regions_of(rewrapped) == ["us-east-1", "eu-west-1"]
    assert envelope.parse(rewrapped).aad == envelope.parse(sealed).aad  # the body is untouched
    east.proxy.outage("refuse")
    assert guard.decrypt(rewrapped) == b"old"
