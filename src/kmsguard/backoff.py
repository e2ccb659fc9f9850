"""Capped full-jitter exponential backoff that never sleeps past an operation's deadline.

Shared by the AWS client factory (retrying one KMS call) and the multi-region keyring
(going round throttled regions again), so both wait the same way:

* **full jitter** — the n-th retry waits ``uniform(0, min(cap, base * 2**(n-1)))``.
  Many threads throttled at the same moment then spread their retries over the whole
  window instead of coming back together (the "thundering herd" that equal or no
  jitter produces), which is what lets a throttled service recover;
* **capped low** — waits stop growing at 2 s (1 s on average), so a call keeps getting
  chances at a steady pace until its deadline instead of spending it on a few long
  waits. With an 8 s cap (0.5 s base) six throttles in a row already wait past a 10 s
  deadline on average; with the 2 s cap a 10 s deadline holds about a dozen retries, so
  at a share ``p`` of throttled calls a call misses its deadline with probability
  about ``p**12`` instead of ``p**6`` (see the throttling benchmark, ``python -m bench
  throttling``);
* **deadline-bound** — a wait is cut so that one more attempt can still start
  ``ATTEMPT_WINDOW`` before the deadline; when even that no longer fits, the caller is
  told to stop and report the last error (so never-ending throttling fails *at* the
  deadline, with the throttling error, instead of earlier or with a timeout).

No client-side rate limiter: botocore's adaptive mode cuts its send rate to 70% on every
throttle and, when a fixed share of calls is throttled at any rate, never recovers
(the throttling benchmark: docs/benchmarks.md). Jittered backoff per call adapts by itself.
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

#: Time kept free before a deadline for one last attempt (longer than a typical in-region
#: KMS round trip): an attempt started later would likely be cut off and end as a timeout.
ATTEMPT_WINDOW = 0.1


@dataclass(frozen=True)
class Backoff:
    """``uniform(0, min(cap, base * 2**(retry-1)))`` seconds before retry number ``retry`` (1-based)."""

    base: float
    cap: float

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry``, ignoring any deadline."""
        # The exponent is clamped: a long deadline may see hundreds of retries, and 2.0**1024 overflows.
        return min(self.cap, self.base * 2.0 ** min(max(retry - 1, 0), 32))

    def delay(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """A full-jitter wait before retry number ``retry``, ignoring any deadline."""
        return rand() * self.ceiling(retry)

    def wait(self, retry: int, until: float | None, rand: Callable[[], float] = random.random) -> bool:
        """Sleep before retry number ``retry``; False (at once) when no attempt fits before ``until`` any more.

        The full-jitter wait is cut to end ``ATTEMPT_WINDOW`` before ``until``
        (None: no deadline).
        """
        delay = self.delay(retry, rand)
        if until is not None:
            room = until - time.monotonic() - ATTEMPT_WINDOW
            if room <= 0:
                return False
            delay = min(delay, room)
        if delay > 0:
            time.sleep(delay)
        return True


#: After a throttle: up to 0.25 s, 0.5 s, 1 s, then up to 2 s each time. KMS request
#: quotas are per second, so sub-second waits mostly land in a later window; the low
#: cap keeps ~1 retry a second per call (see "capped low" above).
THROTTLE = Backoff(base=0.25, cap=2.0)

#: After a transient failure (5xx, a reset or timed-out connection): botocore's standard
#: 50 ms base; these retries are few (``max_attempts``), so the cap is rarely reached.
TRANSIENT = Backoff(base=0.05, cap=2.0)
