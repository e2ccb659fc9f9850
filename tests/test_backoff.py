"""The shared back-off schedule: full jitter under a cap, and never past a deadline."""

from __future__ import annotations

import time

from kmsguard.backoff import ATTEMPT_WINDOW, THROTTLE, TRANSIENT, Backoff


def test_full_jitter_grows_then_caps() -> None:
    b = Backoff(base=0.5, cap=8.0)
    assert [b.delay(n, rand=lambda: 1.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.delay(3, rand=lambda: 0.0) == 0.0  # full jitter: anywhere from zero
    assert b.delay(10_000, rand=lambda: 1.0) == 8.0  # no float overflow however many retries
    assert all(0 <= THROTTLE.delay(n) <= THROTTLE.cap for n in range(1, 50))
    assert TRANSIENT.base < THROTTLE.base


def test_wait_is_cut_to_leave_room_for_one_last_attempt() -> None:
    slow = Backoff(base=30.0, cap=30.0)
    until = time.monotonic() + ATTEMPT_WINDOW + 0.2
    started = time.monotonic()
    assert slow.wait(1, until, rand=lambda: 1.0)  # a 30 s back-off shrinks to the time left
    assert time.monotonic() - started < 5
    assert time.monotonic() <= until
    assert not slow.wait(1, time.monotonic() + ATTEMPT_WINDOW / 2)  # no room left: give up at once
    assert Backoff(base=0.0, cap=0.0).wait(1, None)  # no deadline: just the back-off
