"""CachingKeyring: reuse data keys within strict limits, so most operations never call KMS.

A KMS call costs milliseconds, money and a share of an account-wide request quota;
AES-GCM under a key already in memory costs microseconds. This keyring sits in front of
any other (``CachingKeyring(AwsKmsKeyring(...), policy)``) and keeps two kinds of entry
in one bounded index that evicts the least recently used (each entry's Budget records
when it was last used):

* **encrypt entries**, one per :meth:`KeyRequest.cache_partition` (classification, key id
  and the context bound at the key service). A data key is only ever reused where KMS
  would have bound exactly the same context. Each entry is retired when it reaches the
  classification's ``max_age``, ``max_messages`` or ``max_bytes`` (and never past the
  AES-GCM limit of 2^32 messages); ``reuse = false`` turns encrypt reuse off.
* **decrypt entries**, keyed by (the wrapped entries, the bound context), kept for
  ``decrypt_ttl`` seconds, so N envelopes sealed under one data key cost one unwrap.

Concurrent misses for the same entry are served by one call to the inner keyring (single
flight): sixteen threads starting cold cost one GenerateDataKey, not sixteen. An entry
that is evicted or used up is retired everywhere at once (the index, its Budget and so
Guard's lanes, the request memos that point at it), so no structure keeps it alive;
expired entries go the same way at their next lookup or at the next miss, whichever
comes first.

Reuse trades KMS calls for exposure: whoever obtains one data key can open every message
sealed under it. The limits bound that exposure; stricter classes get stricter limits
(see :data:`kmsguard.policy.DEFAULT_CACHE_LIMITS`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kmsguard import operation
from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.errors import KmsGuardError
from kmsguard.fastpath import Budget
from kmsguard.keyrings.base import KeyRequest, Keyring
from kmsguard.policy import CacheLimits, Policy
from kmsguard.telemetry import NULL_TELEMETRY, Telemetry

#: Entries (encrypt and decrypt together) one cache holds before evicting the least recently used.
DEFAULT_CAPACITY = 1024


class _Entry:
    """One cached data key. ``budget`` (shared with Guard's lanes, see kmsguard.fastpath)
    counts its uses and holds its limits; ``data_key`` becomes None when the entry is
    retired, so a reference kept elsewhere (the request memo) can never revive it.
    """

    __slots__ = ("budget", "classification", "data_key", "key", "owner", "wrapped")

    def __init__(
        self,
        owner: CachingKeyring,
        key: Hashable,
        data_key: DataKey,
        classification: str,
        budget: Budget,
        wrapped: tuple[WrappedKey, ...] | None,
    ) -> None:
        self.owner = owner
        self.key = key
        self.data_key: DataKey | None = data_key
        self.classification = classification
        self.budget = budget
        self.wrapped = wrapped  # None for an encrypt entry

    @property
    def is_encrypt(self) -> bool:
        return self.wrapped is None


class _Flight:
    """One inner call in progress; threads that miss the same entry wait for it to end."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, may_retry: bool) -> None:
        """Wait for the leader; raise its error, unless retryable and ``may_retry`` (then go again)."""
        self.done.wait()
        error = self.error
        if error is not None and not (may_retry and isinstance(error, KmsGuardError) and error.retryable):
            raise error


@dataclass(frozen=True)
class CacheStats:
    """A snapshot for tests, ``selftest`` and gauges: entry counts and lifetime totals."""

    entries: int
    hits: int
    misses: int
    evictions: int


class CachingKeyring:
    """A data-key cache around any :class:`Keyring`; thread-safe, bounded, single-flight.

    ``limits`` is the :class:`Policy` (each classification's ``cache``) or a mapping of
    classification to :class:`CacheLimits`; a classification it does not name is not
    cached. ``clock`` is a monotonic clock, injectable so tests can age entries.
    """

    def __init__(
        self,
        inner: Keyring,
        limits: Policy | Mapping[str, CacheLimits],
        *,
        capacity: int = DEFAULT_CAPACITY,
        telemetry: Telemetry = NULL_TELEMETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.inner = inner
        self._limits: dict[str, CacheLimits] = (
            {c.name: c.cache for c in limits} if isinstance(limits, Policy) else dict(limits)
        )
        self.capacity = capacity
        self._telemetry = telemetry
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self._flights: dict[Hashable, _Flight] = {}
        self._misses = self._evictions = 0
        self._retired_hits: dict[str, int] = {}
        telemetry.cache_hits(self.hits_by_classification)

    # ------------------------------------------------------------------ Keyring protocol

    def generate(self, request: KeyRequest) -> DataKey:
        """A data key for one message of unknown size (counts against messages, not bytes)."""
        return self.generate_for(request, 0)

    # A request object remembers the entry that served it (``KeyRequest._memo``). Guard
    # reuses one request per classification and context (and per envelope header), so
    # a hit on the remembered entry skips the limits lookup and hashing the partition.

    def generate_for(self, request: KeyRequest, size: int) -> DataKey:
        """A data key to seal one message of ``size`` bytes, reused while the limits allow.

        Guard calls this instead of :meth:`generate` so that ``max_bytes`` can be enforced.
        """
        entry = request._memo
        if (
            type(entry) is _Entry
            and entry.owner is self
            and entry.is_encrypt
            and size <= entry.budget.max_bytes  # an oversized message must not retire it
        ):
            data_key = self._claim(entry, size)
            if data_key is not None:
                return data_key
        limits = self._limits.get(request.classification)
        if limits is None or not limits.reuse:
            return self.inner.generate(request)
        if size > limits.max_bytes:  # too big to share a key with anything; leave the entry alone
            with self._lock:
                self._misses += 1
            self._note_miss(request.classification)
            return self.inner.generate(request)
        return self._serve(request, request.cache_partition(), limits.max_age, size, None, limits)

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        entry = request._memo
        if type(entry) is _Entry and entry.owner is self and entry.wrapped is wrapped:
            data_key = self._claim(entry, 0)
            if data_key is not None:
                return data_key
        limits = self._limits.get(request.classification)
        if limits is None or limits.decrypt_ttl <= 0:
            return self.inner.unwrap(wrapped, request)
        wrapped = tuple(wrapped)
        # Keyed by plain tuples of the wrapped keys' fields, which hash in C (WrappedKey's
        # dataclass hash is Python code).
        fields = tuple((w.provider, w.key_ref, w.wrapped) for w in wrapped)
        return self._serve(request, (fields, request.cache_partition()), limits.decrypt_ttl, 0, wrapped, None)

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        return self.inner.wrap(data_key, request)

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        return self.inner.rewrap(wrapped, request)

    # ------------------------------------------------------------------ management

    def clear(self) -> None:
        """Forget every cached key (after a key is disabled or rotated, for instance)."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._drop(entry)

    def stats(self) -> CacheStats:
        with self._lock:
            hits = sum(self._retired_hits.values()) + sum(e.budget.hits for e in self._entries.values())
            return CacheStats(len(self._entries), hits, self._misses, self._evictions)

    def hits_by_classification(self) -> dict[str, int]:
        """Lifetime hits per classification, for metrics (hits are counted in C, not reported one by one)."""
        with self._lock:
            out = dict(self._retired_hits)
            for e in self._entries.values():
                out[e.classification] = out.get(e.classification, 0) + e.budget.hits
            return out

    def lease(self, request: KeyRequest) -> tuple[DataKey, Budget] | None:
        """The data key that last served ``request`` and its Budget, while the entry lives.

        Guard binds a lane (kmsguard.fastpath) to the Budget, so the next message with
        the same request costs one claim on it; the cache's limits apply to both paths.
        """
        entry = request._memo
        if type(entry) is not _Entry or entry.owner is not self:
            return None
        data_key = entry.data_key
        if data_key is None or not entry.budget.live:
            return None
        return data_key, entry.budget

    def close(self) -> None:
        self.clear()
        closer = getattr(self.inner, "close", None)
        if callable(closer):
            closer()

    def __getattr__(self, name: str) -> Any:
        """Key management (``versions``, ``rotate``, ``secret``...) is the inner keyring's."""
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ internals

    def _serve(
        self,
        request: KeyRequest,
        key: Hashable,
        lifetime: float,
        size: int,
        wrapped: tuple[WrappedKey, ...] | None,
        limits: CacheLimits | None,
    ) -> DataKey:
        """A hit on the entry for ``key`` (a claimed use, for encrypt), or a fetch of a new one.

        ``wrapped`` and no ``limits`` for decrypt entries, which only expire; encrypt
        entries also count messages and bytes against ``limits``. Encrypt entries are
        keyed by the 3-tuple partition, decrypt entries by 2-tuples, so both share one
        index without colliding.
        """
        waited = False
        while True:
            with self._lock:
                entry = self._entries.get(key)
            # An entry retired between the lookup and the claim is a miss like any other:
            # at worst one more inner call, never a use beyond the limits.
            data_key = self._claim(entry, size) if entry is not None else None
            if data_key is not None:
                break
            # Miss: lead the fetch of a fresh key (its first use is ours), or wait for the
            # leader's and go round to claim a use under the lock, so the limits hold exactly.
            entry = self._fetch(request, key, lifetime, size, wrapped, limits, not waited)
            waited = True
            if entry is not None:
                _remember(request, entry)
                return entry.data_key  # type: ignore[return-value]
        _remember(request, entry)  # type: ignore[arg-type]
        return data_key

    def _claim(self, entry: _Entry, size: int) -> DataKey | None:
        """One use of ``entry`` (a message of ``size`` bytes), or None and the entry retired.

        The Budget checks and counts in one step (see kmsguard.fastpath), so the limits
        hold exactly under any concurrency, on this path and on Guard's lanes alike.
        """
        data_key = entry.data_key
        if data_key is None:  # retired by another thread
            return None
        if entry.budget.claim(size) is None:
            with self._lock:
                self._drop(entry)
            return None
        operation.note_cache(True)
        return data_key

    def _fetch(
        self,
        request: KeyRequest,
        key: Hashable,
        lifetime: float,
        size: int,
        wrapped: tuple[WrappedKey, ...] | None,
        limits: CacheLimits | None,
        may_retry: bool,
    ) -> _Entry | None:
        """Lead one inner call for ``key`` and cache its result, or wait for the leader's call.

        The leader gets the new entry, with its own message (of ``size`` bytes) already
        counted; a waiter gets None and claims a use like any hit. A failed call raises in
        the leader and in every waiter, except that a waiter whose leader failed with a
        retryable error (throttled, timed out) gets None once, to try again itself: one
        throttled call must not fail every operation that happened to share it.
        ``wrapped`` marks a decrypt entry.
        """
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
                self._misses += 1
        if not leader:
            flight.wait(may_retry)
            return None
        self._note_miss(request.classification)
        try:
            data_key = self.inner.generate(request) if wrapped is None else self.inner.unwrap(wrapped, request)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            expires = self._clock() + lifetime
            budget = (
                Budget(data_key.aead, self._clock, expires, limits.max_messages, limits.max_bytes, size)
                if limits is not None
                else Budget(data_key.aead, self._clock, expires)
            )
            entry = _Entry(self, key, data_key, request.classification, budget, wrapped)
            with self._lock:
                self._insert(entry)
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return entry

    def _insert(self, entry: _Entry) -> None:
        old = self._entries.get(entry.key)
        if old is not None:
            self._drop(old, counted=False)
        # A miss already costs a KMS call, so it can afford a sweep: expired keys leave
        # memory now rather than whenever the LRU reaches them.
        now = self._clock()
        for expired in [e for e in self._entries.values() if e.budget.expires <= now]:
            self._drop(expired)
        self._entries[entry.key] = entry
        if len(self._entries) > self.capacity:  # least recently used: the Budget with the oldest use
            for victim in sorted(self._entries.values(), key=_last_used)[: len(self._entries) - self.capacity]:
                self._drop(victim)
        self._telemetry.gauge("data_key_cache_entries", len(self._entries))

    def _drop(self, entry: _Entry, counted: bool = True) -> None:
        """Retire an entry everywhere: the index, its Budget (so every lane drops the key
        object) and the request memos that point at it (they see ``data_key`` None).
        Called with the lock held.
        """
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        data_key, entry.data_key = entry.data_key, None
        if data_key is None:
            return  # already retired
        entry.budget.retire()
        self._retired_hits[entry.classification] = self._retired_hits.get(entry.classification, 0) + entry.budget.hits
        if counted:
            self._evictions += 1
            self._telemetry.cache_event("evict", entry.classification)

    def _note_miss(self, classification: str) -> None:
        """A miss goes to the operation and to the telemetry (hits are counted by the Budgets)."""
        operation.note_cache(False)
        self._telemetry.cache_event("miss", classification)


def _last_used(entry: _Entry) -> int:
    return entry.budget.last_used


def _remember(request: KeyRequest, entry: _Entry) -> None:
    object.__setattr__(request, "_memo", entry)
