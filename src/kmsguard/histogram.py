"""Counters for a metric series that every operation touches: count, sum and buckets.

One :class:`Histogram` per (operation, classification, outcome) series; Metrics' collector
reads them when scraped. :meth:`Histogram.add` runs once per Guard operation, cache hits
included, so it is compiled with Cython when the package is built (``histogram.pxd``):
then it is a few C additions that never release the GIL, atomic without a lock. As plain
Python (no compiler) it takes a lock. :class:`HitTally` is the metrics side of a cache
hit (see kmsguard.operation.EventKind): a dict lookup and an ``add``.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from kmsguard.fastpath import HitSink

COMPILED = not __file__.endswith(".py")
#: HitTally.last before any kind (an object no caller's kind is).
_NO_KIND = (object(), None)


class Histogram:
    """``bounds`` are the buckets' upper bounds (inclusive, as Prometheus' ``le``), ascending."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = array("d", bounds)
        self.buckets = array("q", [0] * (len(bounds) + 1))  # the last is +Inf
        self.total = 0.0
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        if COMPILED:
            self._add(value)
        else:
            with self._lock:
                self._add(value)

    def _add(self, value: float) -> None:
        bounds = self.bounds
        n = len(bounds)
        i = 0
        while i < n and value > bounds[i]:
            i += 1
        self.buckets[i] += 1
        self.total += value

    def snapshot(self) -> tuple[int, float, list[int]]:
        """(count, sum, per-bucket counts). The count is the buckets' sum, so the +Inf
        bucket always equals it, even when an add runs while the buckets are copied."""
        with self._lock:  # as plain Python: against add; compiled, adds do not wait for it
            buckets = list(self.buckets)
            return sum(buckets), self.total, buckets


class HitTally(HitSink):
    """Counts cache hits into their operation's series; ``lookup`` finds the series of a kind once.

    ``last`` is the last (kind, series), one tuple so that it is read whole: a loop of one
    kind skips the dictionary.
    """

    def __init__(self, lookup: Callable[[Any], Histogram]) -> None:
        self.lookup = lookup
        self.by_kind: dict[object, Histogram] = {}
        self.last: tuple[Any, Any] = _NO_KIND

    def record(self, kind: Any, started: float, duration: float, size: int, request: int) -> None:
        last = self.last
        if last[0] is kind:
            series = last[1]
        else:
            series = self.by_kind.get(kind)
            if series is None:
                series = self.by_kind[kind] = self.lookup(kind)
            self.last = (kind, series)
        series.add(duration)
