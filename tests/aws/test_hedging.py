"""Issue 16: a silent region costs one short wait, not the deadline (budgets, hedges, breakers that learn).

Every region is its own moto process behind its own fault proxy; "silent" is the proxy's
``outage("silent")``: connections are accepted and requests read, and nothing is ever
answered (a partition behind a load balancer), so only a timeout ends a wait. The
"default presets" tests build the stack from a config file that changes nothing but
the regions and their endpoints, as a new user would.
"""

from __future__ import annotations

import base64
import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from kmsguard import Guard, KmsGuardError, envelope
from kmsguard.aws import AwsSettings, ClientFactory
from kmsguard.config import load_settings
from kmsguard.keyrings import region_health
from kmsguard.keyrings.aws_kms import AwsKmsKeyring
from kmsguard.keyrings.base import KeyRequest
from kmsguard.keyrings.multi_region import MultiRegionKeyring, MultiRegionOptions
from kmsguard.keyrings.region_health import HedgePolicy
from kmsguard.metrics import Metrics
from kmsguard.policy import CacheLimits, ClassPolicy, Policy
from kmsguard.stack import build_aws_keyring
from kmsguard.telemetry import Telemetry
from kmsguard.testing import KmsRegion
from kmsguard.testing.replicas import create_multi_region_key

from .test_cli_aws import run

NO_CACHE = CacheLimits(reuse=False, decrypt_ttl=0)
EAST, WEST = "us-east-1", "eu-west-1"


class Hedges(Telemetry):
    """Counts hedges, their wins and failovers by (from, to)."""

    def __init__(self) -> None:
        self.hedges: Counter[tuple[str, str]] = Counter()
        self.wins: Counter[tuple[str, str]] = Counter()

    def hedge(self, from_region: str, to_region: str) -> None:
        self.hedges[(from_region, to_region)] += 1

    def hedge_won(self, from_region: str, to_region: str) -> None:
        self.wins[(from_region, to_region)] += 1


@pytest.fixture
def regions(kms_regions: Callable[..., list[KmsRegion]], aws_env: dict[str, str]) -> list[KmsRegion]:
    return kms_regions(EAST, WEST)


def default_stack(
    regions: list[KmsRegion], home: Path, environment: str, telemetry: Telemetry | None = None
) -> MultiRegionKeyring:
    """The keyring `backend = "aws"` builds from a config naming only the regions and their endpoints."""
    home.mkdir(parents=True, exist_ok=True)
    endpoints = "\n".join(f'{r.name} = "{r.endpoint}"' for r in regions)
    (home / "kmsguard.toml").write_text(
        f'backend = "aws"\nenvironment = "{environment}"\n[aws]\nregions = ["{EAST}", "{WEST}"]\n'
        f"[aws.endpoints]\n{endpoints}\n"
    )
    keyring = build_aws_keyring(load_settings({"KMSGUARD_HOME": str(home)}), telemetry or Telemetry())
    assert isinstance(keyring, MultiRegionKeyring)
    return keyring


def guard_for(key: str, keyring: MultiRegionKeyring) -> Guard:
    return Guard(Policy([ClassPolicy("general", key, cache=NO_CACHE)]), keyring)


def round_trips(guard: Guard, n: int, on: Callable[[int], None] = lambda i: None) -> list[float]:
    """``n`` encrypt + decrypt round trips; the time of each operation (encrypts and decrypts alike)."""
    times = []
    for i in range(n):
        on(i)
        t0 = time.perf_counter()
        sealed = guard.encrypt(b"card %d" % i, "general", {"order": str(i)})
        t1 = time.perf_counter()
        assert guard.decrypt(sealed, {"order": str(i)}) == b"card %d" % i
        times += [t1 - t0, time.perf_counter() - t1]
    return times


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def kms_calls(region: KmsRegion) -> int:
    return region.proxy.counts["GenerateDataKey"] + region.proxy.counts["Decrypt"]


# ---------------------------------------------------------------------- default presets, a silent preferred region


@pytest.fixture
def twins(regions: list[KmsRegion]) -> Iterator[list[KmsRegion]]:
    """The same two regions (the same moto processes and keys) behind proxies of their own, never faulted.

    A healthy keyring on these runs alternately with the faulted one, so both see the
    same load on the machine: the healthy p99 is measured at the same moments.
    """
    made = [KmsRegion.start(r.name, r.server) for r in regions]
    yield made
    for twin in made:
        twin.close()


def alternate(healthy: Guard, faulted: Guard, n: int, on: Callable[[int], None]) -> tuple[list[float], list[float]]:
    """``n`` round trips on each guard, one after the other: (healthy times, faulted times)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(n):
        times[0].extend(round_trips(healthy, 1))
        on(i)
        times[1].extend(round_trips(faulted, 1))
    return times


@pytest.mark.parametrize("environment", ["production", "development"])
def test_default_presets_a_silent_preferred_region_costs_one_short_wait(
    regions: list[KmsRegion], twins: list[KmsRegion], tmp_path: Path, environment: str
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    for twin, region in zip(twins, regions, strict=True):
        twin.proxy.router = region.proxy.router  # the emulated multi-region key works through the twins too
    telemetry = Hedges()
    healthy = default_stack(twins, tmp_path / "healthy", environment, telemetry)
    assert healthy.hedge is not None  # on by default with two regions
    healthy_guard = guard_for(key, healthy)
    round_trips(healthy_guard, 5)  # clients built

    # From the start: the preferred region accepts connections and never answers.
    east.proxy.outage("silent")
    keyring = default_stack(regions, tmp_path / "from-start", environment)
    try:
        guard = guard_for(key, keyring)
        t0 = time.perf_counter()
        first = guard.encrypt(b"first", "general")
        assert time.perf_counter() - t0 < 2.0, time.perf_counter() - t0
        assert [w.key_ref.split(":")[3] for w in envelope.parse(first).wrapped_keys] == [WEST]
        baseline, from_start = alternate(healthy_guard, guard, 200, lambda i: None)  # any failure raises
        assert p99(from_start[5:]) <= 2 * p99(baseline), (p99(from_start[5:]), p99(baseline))
        assert kms_calls(east) <= 5, east.proxy.counts  # a silent region gets one try at a time, not one per operation
        deadline = time.monotonic() + 20
        while keyring.breakers[EAST].state != "open":  # each try that ran out of its budget counted
            assert time.monotonic() < deadline
            round_trips(guard, 5)
    finally:
        keyring.close()
    east.proxy.restore()
    calls = kms_calls(twins[0]) + kms_calls(twins[1])
    assert sum(telemetry.hedges.values()) < 0.01 * calls, telemetry.hedges  # a healthy run hardly hedges

    # In the middle of a run.
    def silence_at_100(i: int) -> None:
        if i == 100:
            east.proxy.outage("silent")

    keyring = default_stack(regions, tmp_path / "mid-run", environment)
    try:
        baseline, times = alternate(healthy_guard, guard_for(key, keyring), 200, silence_at_100)
    finally:
        keyring.close()
        healthy.close()
        east.proxy.restore()
    mid_run = times[205:]  # the first 5 operations after the region fell silent left out
    assert p99(mid_run) <= 2 * p99(baseline), (p99(mid_run), p99(baseline))


def wait_until_settled(keyring: MultiRegionKeyring, region: str) -> None:
    """Until no try is running in ``region`` (each ends by its budget), at most 10 s."""
    until = time.monotonic() + 10
    while keyring.health[region].in_flight and time.monotonic() < until:
        time.sleep(0.05)
    assert keyring.health[region].in_flight == 0


# ---------------------------------------------------------------------- hedging


def factory_for(regions: list[KmsRegion], **overrides: object) -> ClientFactory:
    fields: dict[str, object] = {
        "regions": tuple(r.name for r in regions),
        "endpoints": {r.name: r.endpoint for r in regions},
        "max_attempts": 2,
        "connect_timeout": 0.5,
        "read_timeout": 1.0,
        "operation_timeout": 10.0,
        **overrides,
    }
    return ClientFactory(AwsSettings(**fields))  # type: ignore[arg-type]


@pytest.fixture
def factory(regions: list[KmsRegion]) -> Iterator[ClientFactory]:
    f = factory_for(regions)
    yield f
    f.close()


def hedged(factory: ClientFactory, telemetry: Telemetry, **kwargs: object) -> MultiRegionKeyring:
    return MultiRegionKeyring(
        {r: AwsKmsKeyring(factory, r) for r in factory.settings.regions},
        hedge=HedgePolicy(),
        telemetry=telemetry,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_slow_preferred_region_is_hedged_only_at_its_tail(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    metrics = Metrics()
    keyring = hedged(factory, metrics)
    guard = guard_for(key, keyring)
    for region in regions:
        factory.client(region.name)  # built up front: building a client is not the region's latency
    east.proxy.latency(0.3)
    for _ in range(10):  # the hedge delay adapts to the region's latency
        guard.encrypt(b"x", "general")
    delay = keyring.health[EAST].hedge_delay()
    assert 0.3 < delay < HedgePolicy().cap  # adapted: down from the cap, above the latency
    before = kms_calls(east) + kms_calls(west)

    def timed(i: int) -> float:
        t0 = time.perf_counter()
        guard.encrypt(b"m%d" % i, "general")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(4) as pool:  # four callers at once: the run takes a quarter of the time
        times = list(pool.map(timed, range(60)))
    extra = kms_calls(east) + kms_calls(west) - before - 60
    assert extra < 0.1 * 60
    # Each operation within about the hedge delay plus the fast region's answer.
    assert max(times) < keyring.health[EAST].hedge_delay() + 0.5

    east.proxy.stall(30, count=1)  # one call that would never be answered: the hedge answers it
    t0 = time.perf_counter()
    sealed = guard.encrypt(b"hedged", "general")
    assert time.perf_counter() - t0 < keyring.health[EAST].hedge_delay() + 0.5
    assert [w.key_ref.split(":")[3] for w in envelope.parse(sealed).wrapped_keys] == [WEST]
    labels = {"from_region": EAST, "to_region": WEST}
    hedges = metrics.registry.get_sample_value("kmsguard_hedges_total", labels)
    wins = metrics.registry.get_sample_value("kmsguard_hedge_wins_total", labels)
    assert hedges is not None and wins is not None and hedges >= wins >= 1
    keyring.close()


def test_throttling_in_both_regions_fails_nothing_and_starts_no_hedge_storm(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    telemetry = Hedges()
    keyring = hedged(factory, telemetry)
    guard = guard_for(key, keyring)
    guard.encrypt(b"warm", "general")
    for region in regions:
        region.proxy.throttle(rate=0.3)
    round_trips(guard, 40)  # any failure raises
    calls = kms_calls(east) + kms_calls(west) - 1
    assert east.proxy.statuses[400] > 0
    assert sum(telemetry.hedges.values()) < 0.2 * calls
    keyring.close()


@pytest.mark.parametrize("west_throttling", [True, False])
def test_a_throttled_try_is_not_hedged_into_a_throttling_region(
    regions: list[KmsRegion], west_throttling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The west's throttling must still count when the east throttles: on a loaded machine
    # the steps between them can outlast THROTTLE_MEMORY (tests/test_region_health.py
    # tests the memory itself).
    monkeypatch.setattr(region_health, "THROTTLE_MEMORY", 60.0)
    east, west = regions
    key = create_multi_region_key(east, [west])
    # Timeouts far above what the proxies take: only throttling decides where an operation
    # goes, even when a loaded machine delays an answer past the usual 1 s read timeout
    # (a timed-out try would be handed to the next region).
    factory = factory_for(regions, max_attempts=4, connect_timeout=2.0, read_timeout=5.0)
    telemetry = Hedges()
    keyring = MultiRegionKeyring(
        {r: AwsKmsKeyring(factory, r) for r in factory.settings.regions},
        hedge=HedgePolicy(floor=0.05, cap=0.05),  # any throttling back-off outlasts the hedge delay
        telemetry=telemetry,
    )
    guard = guard_for(key, keyring)
    if west_throttling:  # one operation served by the west while it throttles once
        east.proxy.outage("refuse")
        west.proxy.throttle(count=1)
        assert [w.key_ref.split(":")[3] for w in envelope.parse(guard.encrypt(b"w", "general")).wrapped_keys] == [WEST]
        wait_until_settled(keyring, EAST)  # the refused try, beaten by the hedge, ends its attempts
        east.proxy.restore()
    else:
        guard.encrypt(b"warm", "general")
    for region in regions:
        wait_until_settled(keyring, region.name)
    served_by_west, hedges = west.proxy.counts["GenerateDataKey"], telemetry.hedges[(EAST, WEST)]
    east.proxy.throttle(count=3, api="GenerateDataKey")
    sealed = guard.encrypt(b"x", "general")
    if west_throttling:  # waited for the east, which answered on its fourth attempt
        assert [w.key_ref.split(":")[3] for w in envelope.parse(sealed).wrapped_keys] == [EAST]
        assert telemetry.hedges[(EAST, WEST)] == hedges and west.proxy.counts["GenerateDataKey"] == served_by_west
    else:  # the east was backing off: the west, not throttling, was asked meanwhile
        assert telemetry.hedges[(EAST, WEST)] == hedges + 1
        assert west.proxy.counts["GenerateDataKey"] == served_by_west + 1
    keyring.close()
    factory.close()


def test_an_abandoned_try_makes_no_further_attempt(regions: list[KmsRegion], factory: ClientFactory) -> None:
    """The try the hedge beat is stalled, then closed: it would retry (max_attempts = 2) if it were still wanted."""
    east, west = regions
    key = create_multi_region_key(east, [west])
    factory = factory_for(regions, read_timeout=5.0)  # the stall ends in a closed connection, not a timeout
    keyring = hedged(factory, Hedges())
    guard = guard_for(key, keyring)
    guard.encrypt(b"warm", "general")
    east.proxy.stall(1.5, count=1)  # no answer for 1.5 s, then the connection closes: a retryable failure
    guard.encrypt(b"x", "general")  # the hedge (after the 1 s cap) answers first
    wait_until_settled(keyring, EAST)  # the stalled try ends meanwhile
    assert east.proxy.counts["GenerateDataKey"] == 2  # the warm-up and the stalled one: no retry
    keyring.close()
    factory.close()


# ---------------------------------------------------------------------- budgets and breakers


def test_without_hedging_a_silent_region_costs_its_budget_then_its_breaker_opens(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    keyring = MultiRegionKeyring({r: AwsKmsKeyring(factory, r) for r in factory.settings.regions}, failures=2)
    guard = guard_for(key, keyring)
    guard.encrypt(b"warm", "general")
    east.proxy.outage("silent")
    for _ in range(2):  # each waits one read timeout (1 s), far from the 10 s deadline, then fails over
        t0 = time.perf_counter()
        guard.encrypt(b"x", "general")
        assert time.perf_counter() - t0 < 3.0
    assert keyring.breakers[EAST].state == "open"
    asked = east.proxy.counts["GenerateDataKey"]
    assert asked == 3  # one attempt per try: a timed-out read is not retried while another region waits
    guard.encrypt(b"x", "general")
    assert east.proxy.counts["GenerateDataKey"] == asked  # skipped
    keyring.close()


def test_with_the_other_region_open_a_timed_out_read_is_retried_until_the_deadline(
    regions: list[KmsRegion], factory: ClientFactory
) -> None:
    """No region left to fail over to: the try is the last one, as with one region."""
    east, west = regions
    key = create_multi_region_key(east, [west])
    keyring = MultiRegionKeyring({r: AwsKmsKeyring(factory, r) for r in factory.settings.regions}, failures=1)
    guard = guard_for(key, keyring)
    keyring.breakers[WEST].failure()  # the west is down: its breaker is open
    east.proxy.stall(5, count=1, api="GenerateDataKey")  # one stuck connection (read timeout 1 s)
    assert [w.key_ref.split(":")[3] for w in envelope.parse(guard.encrypt(b"x", "general")).wrapped_keys] == [EAST]
    assert east.proxy.counts["GenerateDataKey"] == 2 and west.proxy.counts["GenerateDataKey"] == 0
    keyring.close()


def test_wrap_in_all_regions_leaves_a_silent_regions_copy_out(regions: list[KmsRegion], factory: ClientFactory) -> None:
    east, west = regions
    keys = {EAST: east.create_key(), WEST: west.create_key()}
    keyring = hedged(factory, Hedges(), region_keys={"general": keys}, wrap_in_all_regions=True)
    guard = guard_for(keys[EAST], keyring)
    guard.encrypt(b"warm", "general")
    west.proxy.outage("silent")
    sealed = [guard.encrypt(b"s%d" % i, "general") for i in range(6)]
    assert all([w.key_ref for w in envelope.parse(s).wrapped_keys] == [keys[EAST]] for s in sealed)
    wait_until_settled(keyring, WEST)  # copies asked but not waited for end by their budgets
    assert keyring.breakers[WEST].state == "open"
    asked = west.proxy.counts["Encrypt"]
    assert asked <= 6
    guard.encrypt(b"later", "general")
    assert west.proxy.counts["Encrypt"] == asked
    assert [guard.decrypt(s) for s in sealed] == [b"s%d" % i for i in range(6)]
    keyring.close()


def test_every_region_silent_fails_at_the_deadline_with_kms_timeout(regions: list[KmsRegion]) -> None:
    east, west = regions
    key = create_multi_region_key(east, [west])
    factory = factory_for(regions, operation_timeout=2.0, read_timeout=5.0)
    keyring = hedged(factory, Hedges(), operation_timeout=2.0)
    guard = guard_for(key, keyring)
    guard.encrypt(b"warm", "general")
    for region in regions:
        region.proxy.outage("silent")
    t0 = time.perf_counter()
    with pytest.raises(KmsGuardError) as info:
        guard.encrypt(b"x", "general")
    elapsed = time.perf_counter() - t0
    assert info.value.code == "KMS_TIMEOUT", (str(info.value), elapsed)
    assert 1.9 < elapsed < 3.0  # at the deadline, not before
    keyring.close()
    factory.close()


def test_one_silent_region_fails_at_the_deadline_in_one_cli_line(
    kmsguard_aws_env: dict[str, str], kms_region: KmsRegion, tmp_path: Path
) -> None:
    """With nowhere to fail over to, timed-out reads are retried until the deadline: KMS_TIMEOUT then, not before."""
    config = tmp_path / "kmsguard.toml"
    config.write_text('backend = "aws"\n[aws]\noperation_timeout = 2\nread_timeout = 0.4\n[audit]\nsink = "none"\n')
    kms_region.proxy.outage("silent")
    started = time.monotonic()
    proc = run("encrypt", "--class", "pii", input=b"x", code=1, KMSGUARD_CONFIG=str(config))
    elapsed = time.monotonic() - started
    (line,) = proc.stderr.decode().strip().splitlines()
    assert line.startswith("error: KMS_TIMEOUT: KMS DescribeKey in us-east-1")
    assert 1.9 < elapsed < 10  # max_attempts x read_timeout would have given up after 0.8 s
    assert kms_region.proxy.counts["DescribeKey"] >= 3


# ---------------------------------------------------------------------- configuration


def test_hedge_settings() -> None:
    assert MultiRegionOptions.from_section({}).hedge == HedgePolicy(0.1, 1.0)
    assert MultiRegionOptions.from_section({"hedge_delay_min": 0.05, "hedge_delay_max": 2}).hedge == HedgePolicy(
        0.05, 2.0
    )
    assert MultiRegionOptions.from_section({"hedge": False}).hedge is None


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"hedge": "yes"}, "aws.hedge"),
        ({"hedge_delay_min": 0}, "aws.hedge_delay_min"),
        ({"hedge_delay_max": True}, "aws.hedge_delay_max"),
        ({"hedge_delay_min": 2, "hedge_delay_max": 1}, "aws.hedge_delay_min"),
    ],
)
def test_bad_hedge_settings_name_the_field(section: dict[str, object], field: str) -> None:
    from kmsguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=field):
        MultiRegionOptions.from_section(section)


def test_abandoned_tries_log_and_print_no_secret(
    regions: list[KmsRegion],
    factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A hedge wins; the try it beat answers later with a data key nobody uses: it appears nowhere."""
    east, west = regions
    key = create_multi_region_key(east, [west])
    keyring = hedged(factory, Hedges())
    request = KeyRequest("general", key, {"order": "1"})
    keyring.generate(request)  # warm-up: the east region answers, its delay is still the 1 s cap
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger("")
    handlers = list(root.handlers)
    boto3.set_stream_logger("", logging.DEBUG)  # botocore's own DEBUG output, bodies included, to stderr
    try:
        east.proxy.latency(1.3)  # the hedge (after 1 s) answers first; the east answer comes after
        data_key = keyring.generate(request)
        assert data_key.wrapped[0].key_ref.split(":")[3] == WEST
        wait_until_settled(keyring, EAST)
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
    assert east.proxy.counts["GenerateDataKey"] == 2  # the abandoned one did reach KMS and was answered
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "GenerateDataKey" in logged and "<redacted>" in logged  # botocore did log the bodies, redacted
    assert base64.b64encode(data_key.plaintext).decode() not in logged
    assert re.findall(r"Plaintext\\?['\"]?\s*[:=]\s*b?\\?['\"]?([^'\"<]{8,})", logged) == []
    assert "Traceback" not in logged
    keyring.close()
