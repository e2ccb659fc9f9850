"""RegionHealth and HedgePolicy: the hedge delay, silence and throttling memory, on an injected clock."""

from __future__ import annotations

import pytest

from kmsguard.errors import ConfigurationError
from kmsguard.keyrings.multi_region import CircuitBreaker
from kmsguard.keyrings.region_health import MIN_SAMPLES, THROTTLE_MEMORY, HedgePolicy, RegionHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(health: RegionHealth, clock: Clock, seconds: float, *, ok: bool = True) -> None:
    started = health.started()
    clock.now += seconds
    health.ended(started, answered=True, ok=ok)


def test_the_delay_is_the_cap_until_the_region_is_known_then_its_tail() -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(floor=0.1, cap=1.0), clock)
    for _ in range(MIN_SAMPLES - 1):
        answer(health, clock, 0.3)
    assert health.hedge_delay() == 1.0
    answer(health, clock, 0.3)
    assert health.hedge_delay() == pytest.approx(0.36)  # p95 plus 20%


@pytest.mark.parametrize(("latency", "delay"), [(0.005, 0.1), (5.0, 1.0)])
def test_the_delay_stays_between_floor_and_cap(latency: float, delay: float) -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(floor=0.1, cap=1.0), clock)
    for _ in range(50):
        answer(health, clock, latency)
    assert health.hedge_delay() == delay


def test_one_slow_answer_in_a_hundred_does_not_move_the_delay() -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(floor=0.01, cap=1.0), clock)
    for i in range(100):
        answer(health, clock, 0.9 if i == 50 else 0.02)
    assert health.hedge_delay() == pytest.approx(0.024)


def test_failed_answers_do_not_count_as_latency() -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(floor=0.01, cap=1.0), clock)
    for _ in range(MIN_SAMPLES):
        answer(health, clock, 0.05)
    answer(health, clock, 0.9, ok=False)
    assert health.hedge_delay() == pytest.approx(0.06)


def test_silence_is_an_overdue_try_with_no_answer_since_and_one_answer_ends_it() -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(floor=0.1, cap=1.0), clock)
    health.started()
    clock.now += 1.9
    assert not health.silent()  # twice the delay (the cap: nothing known yet) not reached
    clock.now += 0.2
    assert health.silent() and health.in_flight == 1
    health.ended(100.0, answered=False)  # it timed out: still no answer
    assert health.silent() and health.in_flight == 0
    answer(health, clock, 0.01, ok=False)  # an error is an answer
    assert not health.silent()


def test_throttling_is_remembered_for_a_while() -> None:
    clock = Clock()
    health = RegionHealth(HedgePolicy(), clock)
    assert not health.throttling()
    health.throttled()
    clock.now += THROTTLE_MEMORY - 0.1
    assert health.throttling()
    clock.now += 0.2
    assert not health.throttling()


def test_floor_above_cap_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="hedge_delay_min"):
        HedgePolicy(floor=2.0, cap=1.0)


def test_a_released_probe_lets_the_next_request_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    breaker.failure()
    clock.now += 11
    assert breaker.allow() and not breaker.allow()  # half-open: one probe
    breaker.release()  # abandoned before it was sent: it said nothing
    assert breaker.state == "half-open" and breaker.allow()
