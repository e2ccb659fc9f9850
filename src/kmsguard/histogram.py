"""Counters for a metric series that every operation touches: count, sum and buckets.

One :class:`Histogram` per (operation, classification, outcome) series; Metrics' collector
reads them when scraped. :meth:`Histogram.add` runs once per Guard operation, cache hits
included, so it is compiled with Cython when the package is built (``histogram.pxd``):
then it is a few C additions under the histogram's spin lock; as plain Python, the same
steps under a threading.Lock (kmsguard.fastpath.Mutexed). :class:`HitTally` is the metrics side of a cache
hit (see kmsguard.operation.EventKind): a dict lookup and an ``add``.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any

from kmsguard.fastpath import HitSink, Mutexed, _plain_free, _plain_hold, _plain_lookup, _plain_new_mutex

COMPILED = not __file__.endswith(".py")
# Compiled, C functions from kmsguard/fastpath.pxd; interpreted, these stand-ins.
globals().update(_hold=_plain_hold, _free=_plain_free, _new_mutex=_plain_new_mutex, _lookup=_plain_lookup)


class Histogram(Mutexed):
    """``bounds`` are the buckets' upper bounds (inclusive, as Prometheus' ``le``), ascending."""

    def __init__(self, bounds: Sequence[float]) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.bounds = array("d", bounds)
        self.buckets = array("q", [0] * (len(bounds) + 1))  # the last is +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        self._add(value)
        _free(self)  # type: ignore[name-defined]  # noqa: F821

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
        copy = array("q", bytes(8 * len(self.buckets)))  # made before the lock: no Python while held
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        total = self._copy(copy)
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        buckets = list(copy)
        return sum(buckets), total, buckets

    def _copy(self, into: Any) -> float:
        """The buckets into ``into`` (as long), and the total: read together, under the lock."""
        n = len(self.buckets)
        i = 0
        while i < n:
            into[i] = self.buckets[i]
            i += 1
        return self.total


class HitTally(HitSink):
    """Counts cache hits into their operation's series; ``lookup`` finds the series of a kind once.

    ``by_kind`` only grows (an EventKind's hash is its identity, so a lookup is one probe);
    two threads that find a kind missing at once both look it up, and find the same series.
    """

    def __init__(self, lookup: Callable[[Any], Histogram]) -> None:
        self.lookup = lookup
        self.by_kind: dict[object, Histogram] = {}

    def record(self, kind: Any, started: float, duration: float, size: int, request: int, caller_id: Any) -> None:
        series = _lookup(self.by_kind, kind)  # type: ignore[name-defined]  # noqa: F821
        if series is None:
            series = self.by_kind[kind] = self.lookup(kind)
        series.add(duration)
