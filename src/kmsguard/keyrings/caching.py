"""CachingKeyring: reuse data keys within strict limits, so most operations never call KMS.

A KMS call costs milliseconds, money and a share of an account-wide request quota;
AES-GCM under a key already in memory costs microseconds. This keyring sits in front of
any other (``CachingKeyring(AwsKmsKeyring(...), policy)``) and keeps two kinds of entry
in one index of at most ``max_entries`` (kmsguard.lru): when it is full, an insert gives
up the least recently used entry, exactly, whether its last use was through the cache
or through a Guard plan holding its Budget.

* **encrypt entries**, one per :attr:`KeyRequest.partition` (classification, key id and
  the context bound at the key service). A data key is only ever reused where KMS would
  have bound exactly the same context. Each entry is retired when it reaches the
  classification's ``max_age``, ``max_messages`` or ``max_bytes`` (and never past the
  AES-GCM limit of 2^32 messages); ``reuse = false`` turns encrypt reuse off.
* **decrypt entries**, keyed by (the wrapped entries, the bound context), kept for
  ``decrypt_ttl`` seconds, so N envelopes sealed under one data key cost one unwrap.

Concurrent misses for the same entry are served by one call to the inner keyring (single
flight): sixteen threads starting cold cost one GenerateDataKey, not sixteen. An entry
that is evicted, used up or expired is retired everywhere at once: the index, and its
Budget, which every plan holding it shares (kmsguard.plans), so no structure keeps the
key object alive. Expiry is found lazily: at the entry's next use, or by the insert
after it expires, which retires the expired heads of per-lifetime queues (so an expired
key leaves memory at the next miss at the latest); nothing ever sweeps all entries.

The cache lends its keys (:class:`~kmsguard.keyrings.base.KeyLender`): :meth:`lend` and
:meth:`lend_unwrapped` return each key with its Budget, which Guard's plan keeps and
claims the next uses from without coming back here.

After ``os.fork()`` the child's cache starts empty (``os.register_at_fork``), as does
its nonce state (kmsguard.nonces): parent and child never share a data key's budget.

Reuse trades KMS calls for exposure: whoever obtains one data key can open every message
sealed under it. The limits bound that exposure; stricter classes get stricter limits
(see :data:`kmsguard.policy.DEFAULT_CACHE_LIMITS`). docs/cache-sizing.md sizes it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from kmsguard import operation
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import KmsGuardError
from kmsguard.fastpath import Budget
from kmsguard.keyrings.base import KeyRequest, Keyring, Loan
from kmsguard.lru import LruIndex
from kmsguard.policy import CacheLimits, Policy
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

#: Entries (encrypt and decrypt together) one cache holds by default (``[cache] max_entries``).
DEFAULT_MAX_ENTRIES = 16_384


class _Entry:
    """One cached data key. ``budget`` (shared with Guard's plans, see kmsguard.fastpath)
    counts its uses and holds its limits; ``data_key`` becomes None when the entry is
    retired.
    """

    __slots__ = ("budget", "classification", "data_key", "decrypt", "key")

    def __init__(self, key: Hashable, data_key: DataKey, classification: str, budget: Budget, decrypt: bool) -> None:
        self.key = key
        self.data_key: DataKey | None = data_key
        self.classification = classification
        self.budget = budget
        self.decrypt = decrypt


def _last_used(entry: _Entry) -> int:
    return entry.budget.used()


class _Flight:
    """One inner call in progress; threads that miss the same entry wait for it to end.

    ``done`` is a lock the leader holds until the call ends (cheaper to make than an
    Event, and a flight is made on every miss).
    """

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.error: BaseException | None = None

    def wait(self, may_retry: bool) -> None:
        """Wait for the leader; raise its error, unless retryable and ``may_retry`` (then go again)."""
        with self.done:
            pass
        error = self.error
        if error is not None and not (may_retry and isinstance(error, KmsGuardError) and error.retryable):
            raise error


@dataclass(frozen=True)
class ClassStats:
    """One classification's part of a cache: live entries and lifetime counts."""

    encrypt_entries: int = 0
    decrypt_entries: int = 0
    hits: int = 0
    misses: int = 0
    #: Entries given up to make room (the cache is too small when this keeps rising).
    evictions: int = 0

    @property
    def hit_ratio(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for tests, ``selftest`` and gauges: entry counts and lifetime totals.

    ``evictions`` counts entries given up to make room; ``retired`` those that reached a
    limit (age, messages, bytes, decrypt TTL).
    """

    entries: int
    hits: int
    misses: int
    evictions: int
    retired: int = 0
    by_classification: Mapping[str, ClassStats] = field(default_factory=dict)


class CachingKeyring:
    """A data-key cache around any :class:`Keyring`; thread-safe, bounded, single-flight.

    ``limits`` is the :class:`Policy` (each classification's ``cache``) or a mapping of
    classification to :class:`CacheLimits`; a classification it does not name is not
    cached. ``max_entries`` bounds the encrypt and decrypt entries together. ``clock`` is
    a monotonic clock, injectable so tests can age entries.
    """

    def __init__(
        self,
        inner: Keyring,
        limits: Policy | Mapping[str, CacheLimits],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        telemetry: Telemetry = NULL_TELEMETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        #: The keyring this cache sits in front of (key management reaches it through here).
        self.inner = inner
        self._limits: dict[str, CacheLimits] = (
            {c.name: c.cache for c in limits} if isinstance(limits, Policy) else dict(limits)
        )
        self.max_entries = max_entries
        self._telemetry = telemetry
        self._clock = clock
        self._lock = threading.Lock()
        self._index: LruIndex[Hashable, _Entry] = LruIndex(max_entries, _last_used)
        self._expiry: dict[float, deque[_Entry]] = {}  # lifetime -> entries in insertion (so expiry) order
        self._flights: dict[Hashable, _Flight] = {}
        self._live: Counter[tuple[str, bool]] = Counter()  # (classification, decrypt) -> entries
        self._misses: Counter[str] = Counter()
        self._evictions: Counter[str] = Counter()
        self._retired = 0
        self._retired_hits: Counter[str] = Counter()
        telemetry.cache_hits(self.hits_by_classification)
        telemetry.cache_entries(self.entries_by_classification)
        _caches.add(self)

    # ------------------------------------------------------------------ Keyring protocol

    def generate(self, request: KeyRequest) -> DataKey:
        """A data key for one message of unknown size (counts against messages, not bytes)."""
        return self.lend(request, 0)[0]

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        return self.lend_unwrapped(wrapped, request)[0]

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return self.inner.wrap(data_key, request)

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        return self.inner.rewrap(wrapped, request)

    # ------------------------------------------------------------------ KeyLender protocol

    def lend(self, request: KeyRequest, size: int) -> Loan:
        """A data key to seal one message of ``size`` bytes, reused while the limits allow, and its Budget.

        The Budget is None when the key is not cached (reuse off, no limits for the
        classification, or a message bigger than ``max_bytes``, which gets a key of its
        own and leaves the entry alone).
        """
        limits = self._limits.get(request.classification)
        if limits is None or not limits.reuse:
            return self.inner.generate(request), None
        if size > limits.max_bytes:
            with self._lock:
                self._misses[request.classification] += 1
            self._note_miss(request.classification)
            return self.inner.generate(request), None
        return self._serve(request, request.partition, limits.max_age, size, None, limits)

    def lend_unwrapped(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> Loan:
        """The data key of ``wrapped`` (kept for ``decrypt_ttl``) and its Budget (None when not cached)."""
        limits = self._limits.get(request.classification)
        if limits is None or limits.decrypt_ttl <= 0:
            return self.inner.unwrap(wrapped, request), None
        wrapped = tuple(wrapped)
        # Keyed by plain tuples of the wrapped keys' fields, which hash in C (WrappedKey's
        # dataclass hash is Python code). Encrypt entries are keyed by the 3-tuple
        # partition, decrypt entries by 2-tuples, so both share one index without colliding.
        fields = tuple((w.provider, w.key_ref, w.wrapped) for w in wrapped)
        return self._serve(request, (fields, request.partition), limits.decrypt_ttl, 0, wrapped, None)

    # ------------------------------------------------------------------ management

    def clear(self) -> None:
        """Forget every cached key (after a key is disabled or rotated, for instance)."""
        with self._lock:
            for entry in list(self._index.items.values()):
                self._drop(entry)
            self._expiry.clear()

    def _forked(self) -> None:
        """In a forked child: start empty, so the child's messages count against budgets of its
        own (a key shared with the parent would serve each process its full limits). The
        retired Budgets stop the plans that hold them too."""
        self._lock = threading.Lock()
        self._flights = {}  # a miss in flight in the parent completes there, not here
        self.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            live = list(self._index.items.values())
            hits = Counter(self._retired_hits)
            for e in live:
                hits[e.classification] += e.budget.hits
            names = set(hits) | set(self._misses) | set(self._evictions) | {c for c, _ in self._live}
            by_class = {
                name: ClassStats(
                    encrypt_entries=self._live[(name, False)],
                    decrypt_entries=self._live[(name, True)],
                    hits=hits[name],
                    misses=self._misses[name],
                    evictions=self._evictions[name],
                )
                for name in sorted(names)
            }
            return CacheStats(
                entries=len(live),
                hits=sum(hits.values()),
                misses=sum(self._misses.values()),
                evictions=sum(self._evictions.values()),
                retired=self._retired,
                by_classification=by_class,
            )

    def hits_by_classification(self) -> dict[str, int]:
        """Lifetime hits per classification, for metrics (hits are counted by the Budgets, not reported one by one)."""
        with self._lock:
            out = Counter(self._retired_hits)
            for e in self._index.items.values():
                out[e.classification] += e.budget.hits
            return dict(out)

    def entries_by_classification(self) -> dict[str, int]:
        """Live entries (encrypt and decrypt) per classification, for metrics."""
        with self._lock:
            out: Counter[str] = Counter()
            for (classification, _), n in self._live.items():
                out[classification] += n
            return dict(out)

    def close(self) -> None:
        self.clear()
        closer = getattr(self.inner, "close", None)
        if callable(closer):
            closer()

    # ------------------------------------------------------------------ internals

    def _serve(
        self,
        request: KeyRequest,
        key: Hashable,
        lifetime: float,
        size: int,
        wrapped: tuple[WrappedKey, ...] | None,
        limits: CacheLimits | None,
    ) -> Loan:
        """A hit on the entry for ``key`` (a claimed use), or a fetch of a new one.

        ``wrapped`` and no ``limits`` for decrypt entries, which only expire; encrypt
        entries also count messages and bytes against ``limits``.
        """
        waited = False
        while True:
            entry = self._index.items.get(key)  # a dictionary read: no lock needed
            if entry is not None:
                data_key = entry.data_key
                if data_key is not None and self._claim(entry, size):
                    return data_key, entry.budget
            # Miss: lead the fetch of a fresh key (its first use is ours), or wait for the
            # leader's and go round to claim a use like any hit, so the limits hold exactly.
            loan = self._fetch(request, key, entry, lifetime, size, wrapped, limits, not waited)
            waited = True
            if loan is not None:
                return loan

    def _claim(self, entry: _Entry, size: int) -> bool:
        """One use of ``entry`` (a message of ``size`` bytes); False, and the entry retired, if spent.

        The Budget checks and counts in one step (see kmsguard.fastpath), so the limits
        hold exactly under any concurrency, here and on Guard's plans alike.
        """
        if entry.budget.claim(size) is None:
            with self._lock:
                self._drop(entry)
            return False
        operation.note_cache(True)
        return True

    def _fetch(
        self,
        request: KeyRequest,
        key: Hashable,
        seen: _Entry | None,
        lifetime: float,
        size: int,
        wrapped: tuple[WrappedKey, ...] | None,
        limits: CacheLimits | None,
        may_retry: bool,
    ) -> Loan | None:
        """Lead one inner call for ``key`` and cache its result, or wait for the leader's call.

        The leader gets the new key, with its own message (of ``size`` bytes) already
        counted; a waiter gets None and claims a use like any hit. A failed call raises in
        the leader and in every waiter, except that a waiter whose leader failed with a
        retryable error (throttled, timed out) gets None once, to try again itself: one
        throttled call must not fail every operation that happened to share it.
        ``wrapped`` marks a decrypt entry. ``seen`` is the entry the caller found spent (or
        None): if another thread has put a new one in its place since, the caller gets None
        and claims from that one instead, so a key is fetched only when none is usable.
        """
        with self._lock:
            if self._index.items.get(key) is not seen:
                return None
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
                self._misses[request.classification] += 1
        if not leader:
            flight.wait(may_retry)
            return None
        self._note_miss(request.classification)
        try:
            data_key = self.inner.generate(request) if wrapped is None else self.inner.unwrap(wrapped, request)
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                del self._flights[key]
            flight.done.release()
            raise
        now = self._clock()
        budget = (
            Budget(data_key.aead, self._clock, now + lifetime, limits.max_messages, limits.max_bytes, size)
            if limits is not None
            else Budget(data_key.aead, self._clock, now + lifetime)
        )
        entry = _Entry(key, data_key, request.classification, budget, wrapped is not None)
        with self._lock:
            self._insert(entry, lifetime, now)
            del self._flights[key]
        flight.done.release()
        return data_key, budget

    def _insert(self, entry: _Entry, lifetime: float, now: float) -> None:
        """Index a new entry: expired entries go first, then the least recently used if full. Lock held.

        Entries of one lifetime expire in the order they were inserted, so each lifetime in
        use (a class's ``max_age`` or ``decrypt_ttl``) keeps a queue in insertion order and
        an insert retires the expired heads of every queue: each entry is looked at once
        when it expires, never in a sweep. A queue is rebuilt from the live entries when
        entries dropped early make up most of it.
        """
        old = self._index.items.get(entry.key)
        if old is not None:
            self._drop(old)
        for queue in self._expiry.values():
            while queue and queue[0].budget.expires <= now:
                self._drop(queue.popleft())
        victim = self._index.put(entry.key, entry)
        self._live[(entry.classification, entry.decrypt)] += 1
        queue = self._expiry.setdefault(lifetime, deque())
        queue.append(entry)
        if victim is not None:
            self._drop(victim, evicted=True)
        if len(queue) > 2 * len(self._index) + 64:  # mostly entries dropped before expiring
            self._expiry[lifetime] = deque(e for e in queue if e.data_key is not None)

    def _drop(self, entry: _Entry, evicted: bool = False) -> None:
        """Retire an entry everywhere: the index, and its Budget (so every plan drops the key
        object). ``evicted``: given up to make room, not spent. Lock held.
        """
        self._index.discard(entry.key, entry)
        data_key, entry.data_key = entry.data_key, None
        if data_key is None:
            return  # already retired
        entry.budget.retire()
        self._live[(entry.classification, entry.decrypt)] -= 1
        self._retired_hits[entry.classification] += entry.budget.hits
        if evicted:
            self._evictions[entry.classification] += 1
            self._telemetry.cache_event("evict", entry.classification)
        else:
            self._retired += 1

    def _note_miss(self, classification: str) -> None:
        """A miss goes to the operation and the telemetry (hits are counted by the Budgets; the
        caller counts the miss in the stats, under the lock)."""
        operation.note_cache(False)
        self._telemetry.cache_event("miss", classification)


#: Every cache of this process, for the fork handler.
_caches: weakref.WeakSet[CachingKeyring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_caches):
        cache._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
