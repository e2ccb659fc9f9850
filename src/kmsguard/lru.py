"""An exact least-recently-used index whose values record their own uses.

The data-key cache and Guard's plan tables hold values that are used far more often
than they are added: a cache hit or a plan hit must not take a lock or move anything.
So each value records its own last use as a tick (``kmsguard.fastpath.next_tick``, a
process-wide counter), and the index reads those ticks only when it must choose what
to give up.

The index keeps a min-heap of (tick when last looked at, serial, key, value). To find the
least recently used value it looks at the top of the heap: a value removed since is
dropped; a value used since (its tick moved on) goes back with its current tick; any
other value is the least recently used, exactly, because every value's current tick is at
least its recorded one, and the top's recorded tick is the smallest. Each use causes at
most one such re-push, so eviction costs O(log n) amortized over the uses and inserts;
a lookup is a dictionary read.

Not thread-safe by itself: the owner holds its own lock around :meth:`put`,
:meth:`discard` and :meth:`pop_lru`. ``items`` may be read without that lock (a
dictionary read is atomic, with or without a GIL).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Heap records beyond twice the live values (plus this slack) trigger a rebuild from the live values.
_SLACK = 64


class LruIndex(Generic[K, V]):
    """At most ``capacity`` values by key; ``recency(value)`` is the value's last-use tick."""

    def __init__(self, capacity: int, recency: Callable[[V], int]) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        #: key -> value; read freely, changed only through this class.
        self.items: dict[K, V] = {}
        self._recency = recency
        self._heap: list[tuple[int, int, K, V]] = []
        self._serial = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, key: K, value: V) -> V | None:
        """Add ``value`` under ``key`` (replacing any value there); return the value evicted to make room, if any."""
        items = self.items
        if key in items or len(items) < self.capacity:
            items[key] = value
            self._push(key, value)
            evicted = None
        else:
            evicted = self._pop_lru((key, value))
        if len(self._heap) > 2 * len(items) + _SLACK:
            self._rebuild()
        return evicted

    def discard(self, key: K, value: V) -> bool:
        """Remove ``value`` if it is still the one under ``key``; its heap record goes lazily."""
        if self.items.get(key) is not value:
            return False
        del self.items[key]
        return True

    def pop_lru(self) -> V:
        """Remove and return the least recently used value (the index must not be empty)."""
        return self._pop_lru(None)

    def _pop_lru(self, incoming: tuple[K, V] | None) -> V:
        """Remove the least recently used value; ``incoming`` (key, value) takes its place in
        the heap in the same step (one sift instead of two)."""
        heap, items, recency = self._heap, self.items, self._recency
        while True:
            tick, _, key, value = heap[0]
            if items.get(key) is not value:
                heapq.heappop(heap)  # removed (or replaced) since it was pushed
                continue
            now = recency(value)
            if now != tick:
                self._serial += 1
                heapq.heapreplace(heap, (now, self._serial, key, value))
                continue
            del items[key]
            if incoming is None:
                heapq.heappop(heap)
            else:
                new_key, new_value = incoming
                items[new_key] = new_value
                self._serial += 1
                heapq.heapreplace(heap, (recency(new_value), self._serial, new_key, new_value))
            return value

    def _push(self, key: K, value: V) -> None:
        self._serial += 1
        heapq.heappush(self._heap, (self._recency(value), self._serial, key, value))

    def _rebuild(self) -> None:
        """Drop the records of removed values: O(n), once per n removals at least."""
        recency = self._recency
        self._heap = [(recency(v), i, k, v) for i, (k, v) in enumerate(self.items.items())]
        self._serial = len(self._heap)
        heapq.heapify(self._heap)
