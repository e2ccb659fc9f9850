"""Per-key token buckets: each API key may make ``rate`` requests a second, in bursts of ``burst``.

One bucket per key per worker process (a limit of R with N workers lets a key make up
to N x R requests a second through the whole service; see docs/service.md).
"""

from __future__ import annotations

import math
import threading
import time

from kmsguard.errors import RateLimited


class TokenBuckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def take(self, name: str) -> None:
        """One request by ``name``; raises RateLimited (with ``retry_after``) when its bucket is empty."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitExceeded(wait)
            self._buckets[name] = (tokens - 1.0, now)


class RateLimitExceeded(RateLimited):
    """RATE_LIMITED for one API key's requests (not the key service's throttling)."""

    default_message = "this API key's request rate limit is exceeded"

    def __init__(self, wait: float) -> None:
        super().__init__()
        self.retry_after = max(1, math.ceil(wait))
