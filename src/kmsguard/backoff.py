"""Capped full-jitter exponential backoff that never sleeps past an operation's deadline.

Shared by the AWS client factory (retrying one KMS call) and the multi-region keyring
(going round throttled regions again), so both wait the same way:

* **full jitter** — the n-th retry waits ``uniform(0, min(cap, base * 2**(n-1)))``.
  Many threads throttled at the same moment then spread their retries over the whole
  window instead of coming back together (the "thundering herd" that equal or no
  jitter produces), which is what lets a throttled service recover;
* **capped** — a long throttling episode keeps retrying every few seconds rather than
  backing off past the deadline;
* **deadline-bound** — a wait is cut so that one more attempt can still start
  ``ATTEMPT_WINDOW`` before the deadline; when even that no longer fits, the caller is
  told to stop and report the last error (so never-ending throttling fails *at* the
  deadline, with the throttling error, instead of earlier or with a timeout).

No client-side rate limiter: botocore's adaptive mode cuts its send rate to 70% on every
throttle and, when a fixed share of calls is throttled at any rate, never recovers
(see the README's throttling benchmark). Jittered backoff per call adapts by itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

#: Whether a throttled key-service call is retried until the operation's deadline (the
#: default) or handed back after its ``max_attempts``. The multi-region keyring turns it
#: off for its calls: it has other regions to try first, and goes round them again itself.
wait_out_throttling: ContextVar[bool] = ContextVar("kmsguard_wait_out_throttling", default=True)

#: Time kept free before a deadline for one last attempt (a KMS round trip is ~5-50 ms
#: in-region): an attempt started later would likely be cut off and end as a timeout.
ATTEMPT_WINDOW = 0.1


@dataclass(frozen=True)
class Backoff:
    """``uniform(0, min(cap, base * 2**(retry-1)))`` seconds before retry number ``retry`` (1-based)."""

    base: float
    cap: float

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        # The exponent is clamped: a long deadline may see hundreds of retries, and 2.0**1024 overflows.
        return rand() * min(self.cap, self.base * 2.0 ** min(max(retry - 1, 0), 32))


#: After a throttle: starts at up to 0.5 s (KMS quotas are per second, so sub-second
#: retries mostly land in the next window) and stops growing at 8 s, well inside the
#: presets' 15-30 s deadlines so a long throttling episode still gets several tries.
THROTTLE = Backoff(base=0.5, cap=8.0)

#: After a transient failure (5xx, a reset or timed-out connection): botocore's standard
#: 50 ms base; these retries are few (``max_attempts``), so the cap is rarely reached.
TRANSIENT = Backoff(base=0.05, cap=2.0)


def wait_before_retry(delay: float, until: float | None) -> bool:
    """Sleep ``delay`` seconds, cut to leave ``ATTEMPT_WINDOW`` before ``until``.

    Returns False (without sleeping) when no attempt could start before the deadline any
    more: the caller then raises the error it has. ``until`` None means no deadline.
    """
    if until is not None:
        room = until - time.monotonic() - ATTEMPT_WINDOW
        if room <= 0:
            return False
        delay = min(delay, room)
    if delay > 0:
        time.sleep(delay)
    return True
