"""The shared back-off schedule: full jitter under a cap, and never past a deadline."""

from __future__ import annotations

import time

from kmsguard.backoff import ATTEMPT_WINDOW, THROTTLE, TRANSIENT, Backoff, wait_before_retry


def test_full_jitter_grows_then_caps() -> None:
    b = Backoff(base=0.5, cap=8.0)
    assert [b.delay(n, rand=lambda: 1.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.delay(3, rand=lambda: 0.0) == 0.0  # full jitter: anywhere from zero
    assert b.delay(10_000, rand=lambda: 1.0) == 8.0  # no float overflow however many retries
    assert all(0 <= THROTTLE.delay(n) <= THROTTLE.cap for n in range(1, 50))
    assert TRANSIENT.base < THROTTLE.base


def test_wait_is_cut_to_leave_room_for_one_last_attempt() -> None:
    until = time.monotonic() + ATTEMPT_WINDOW + 0.2
    started = time.monotonic()
    assert wait_before_retry(30.0, until)  # a 30 s back-off shrinks to the time left
    assert time.monotonic() - started < 5
    assert time.monotonic() <= until
    assert not wait_before_retry(1.0, time.monotonic() + ATTEMPT_WINDOW / 2)  # no room left: give up at once
    assert wait_before_retry(0.0, None)  # no deadline: just the back-off
