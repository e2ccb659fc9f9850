"""What one region's recent tries say, for hedging: its latency, its silence, its throttling.

The multi-region keyring keeps one :class:`RegionHealth` per region, next to the
region's circuit breaker. The breaker decides *whether* a region may be tried; this
decides *how long to wait for it* before hedging into the next region:

* **Hedge delay** — the 95th percentile of the region's last ``WINDOW`` successful
  answers, times ``MARGIN``, kept between the :class:`HedgePolicy` floor and cap (the
  cap until ``MIN_SAMPLES`` answers are known). A try slower than its region's usual
  tail is the outlier worth a second request ("The Tail at Scale"); at a steady latency
  few tries are, so hedging costs few extra calls, and a slow moment raises the delay
  with it instead of hedging every call.
* **Silence** — a region is *silent* once a try has waited more than twice its hedge
  delay with no answer of any kind from the region since that try began (a refused
  connection or an error is an answer; a timeout is not). A silent region gets one try
  at a time, hedged at once: the caller waits for the next region only, while that try
  runs out its budget and teaches the region's breaker (or answers, which ends the
  silence). Operations meanwhile skip the region.
* **Throttling** — the time of the region's last throttling answer. A region that
  throttled within ``THROTTLE_MEMORY`` seconds is *throttling*, and a try held up by
  throttling is not hedged into it.
* **In flight** — tries started and not yet ended, so that a region whose tries are
  all stuck gets no more (a bulkhead: bounded threads per region).

Thread-safe (one lock per region).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kmsguard.errors import ConfigurationError

#: Successful answers remembered per region for the hedge delay.
WINDOW = 100
#: Below this many answers the delay is the cap: too few to know the region's tail.
MIN_SAMPLES = 10
#: The delay is this quantile of recent answers ...
QUANTILE = 0.95
#: ... times this margin, so that a try just at the usual tail is not hedged.
MARGIN = 1.2
#: A try into a region that is this many hedge delays overdue, with no answer since it began, means silence.
SILENCE_FACTOR = 2.0
#: Seconds a throttling answer marks a region as throttling (KMS quotas are per second).
THROTTLE_MEMORY = 5.0


@dataclass(frozen=True)
class HedgePolicy:
    """The hedge delay's bounds, in seconds (``[aws] hedge_delay_min`` / ``hedge_delay_max``).

    The floor keeps hedging out of a healthy region's ordinary jitter (KMS answers in
    tens of milliseconds; below a tenth of a second a second request buys little);
    the cap is the longest a try waits before a hedge, however slow its region has
    been, and the wait before the first hedges, while the region's latency is unknown.
    """

    floor: float = 0.1
    cap: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.cap:
            raise ConfigurationError("aws.hedge_delay_min: must be above zero and at most aws.hedge_delay_max")


class RegionHealth:
    """One region's recent tries (see the module doc). Thread-safe."""

    def __init__(self, policy: HedgePolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        self._delay = policy.cap
        self._silent_since: float | None = None
        self._throttled_at: float | None = None
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def started(self) -> float:
        """A try begins now; returns its start time (for :meth:`ended`)."""
        with self._lock:
            now = self._clock()
            self._in_flight += 1
            if self._silent_since is None:
                self._silent_since = now
            return now

    def ended(self, started: float, *, answered: bool, ok: bool = False) -> None:
        """The try that began at ``started`` ended, ``answered`` or not, and ``ok`` (a success) or not.

        Not answered: it ran out of its budget, or was abandoned, with nothing back from
        the region. A success's latency is remembered for the hedge delay.
        """
        with self._lock:
            self._in_flight -= 1
            if not answered:
                return
            self._silent_since = None
            if ok:
                self._latencies.append(self._clock() - started)
                self._delay = self._compute_delay()

    def throttled(self) -> None:
        """The region answered a try with a throttling error."""
        with self._lock:
            self._throttled_at = self._clock()

    def hedge_delay(self) -> float:
        """How long a try waits for this region before a hedge goes to the next one."""
        with self._lock:
            return self._delay

    def silent(self) -> bool:
        with self._lock:
            since = self._silent_since
            return since is not None and self._clock() - since > SILENCE_FACTOR * self._delay

    def throttling(self) -> bool:
        with self._lock:
            at = self._throttled_at
            return at is not None and self._clock() - at < THROTTLE_MEMORY

    def _compute_delay(self) -> float:
        if len(self._latencies) < MIN_SAMPLES:
            return self.policy.cap
        ordered = sorted(self._latencies)
        tail = ordered[min(len(ordered) - 1, int(QUANTILE * len(ordered)))]
        return min(self.policy.cap, max(self.policy.floor, tail * MARGIN))
