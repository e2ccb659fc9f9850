"""The per-message primitives of a cache hit: a data key's reuse Budget, the use tick, request numbers.

**Budget** is the reuse budget of one cached data key, shared by the cache
(``CachingKeyring``) and the plan it lends the key to (kmsguard.plans), so the cache's
limits (``max_age``, ``max_messages``, ``max_bytes``) hold on every path. Its
:meth:`Budget.claim` checks and counts one use in one step. Retiring a Budget drops its
AESGCM object, so a plan that outlives its cache entry holds no key.

**Ticks** order uses: :func:`next_tick` is a process-wide counter; a Budget records the
tick of its last use, and so does a plan, so that :class:`kmsguard.lru.LruIndex` can
find the least recently used without any hit touching it.

**OperationEvent** is what every observer receives, once per operation
(kmsguard.operation.Observer): what operations of one kind share (a
kmsguard.operation.EventKind) and what is this operation's own (start, duration, size,
request number). A cache hit's event is built here, on the lanes' path (kmsguard.plans).

**sealed** builds a suite-1 envelope from its prefix, nonce and plaintext as one bytes
object; compiled, AES-GCM encrypts straight into it. It writes only the new object, which
no other thread can see until it returns, so it takes no lock.

**HitSink** is how a cache hit reaches an observer: :class:`EventSink` builds the
OperationEvent and calls the observer's ``observe``; the audit writer and the metrics
registry have sinks of their own that record a hit without building it.

**Mutexed** is the base of every object the compiled hot path shares between threads
(Budget, the counters, kmsguard.histogram.Histogram, kmsguard.audit.frames.Frames): one
lock per object, taken with ``_hold`` and released with ``_free`` around each step that
changes its fields, compiled or not, so the code is correct without the GIL (free-threaded
CPython). Compiled with Cython when the package is built (``fastpath.pxd``), the lock is
a one-byte spin lock (kmsguard/locks.pxd) held for a few C statements; imported as plain
Python (no compiler at install time, or ``KMSGUARD_PURE=1``), it is a threading.Lock.
:data:`COMPILED` says which.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

try:  # Cython's decorators (OperationEvent's); no-ops where Cython is not installed
    import cython  # type: ignore[import-not-found]
except ImportError:  # the plain build where Cython is not installed: the same classes, as Python
    from types import SimpleNamespace

    cython = SimpleNamespace(freelist=lambda n: lambda cls: cls, no_gc=lambda cls: cls, cclass=lambda cls: cls)

#: True when this module runs compiled (see the module docstring).
COMPILED = not __file__.endswith(".py")

_NO_LIMIT = 2**62
# Whether _clock() reads time.monotonic's clock: as plain Python it is time.monotonic; compiled,
# CLOCK_MONOTONIC, which time.monotonic reads on Linux.
_SAME_CLOCK = not COMPILED or sys.platform.startswith("linux")
#: From this plaintext size the envelope is sealed with :func:`sealed`: below it, one
#: AES-GCM call and a join cost less than setting up the view.
SEAL_INTO_FROM = 16384
# Compiled, _into is C from fastpath.pxd (encrypt_into the returned object); interpreted,
# a join, which plain Python cannot avoid for an immutable result. Set through globals()
# because Cython would compile a def of the same name.
globals()["_into"] = lambda aead, prefix, nonce, plaintext, aad: b"".join(
    (prefix, nonce, aead.encrypt(nonce, plaintext, aad))
)


def _plain_hold(owner: Any) -> None:
    owner._mutex.acquire()


def _plain_free(owner: Any) -> None:
    owner._mutex.release()


def _plain_new_mutex(owner: Any) -> None:
    owner._mutex = threading.Lock()


#: A dictionary lookup, None when absent: compiled, one that owns its result before another
#: thread can drop it (kmsguard/locks.pxd); plain Python's dict.get already does.
_plain_lookup = dict.get

# Compiled, these are C functions from fastpath.pxd (the spin lock, the lookup);
# interpreted, these stand-ins. Set through globals() because Cython would compile a def of the same name.
globals().update(
    _hold=_plain_hold, _free=_plain_free, _new_mutex=_plain_new_mutex, _lookup=_plain_lookup, _clock=time.monotonic
)


class Mutexed:
    """An object with a lock of its own (see the module docstring).

    A subclass's ``__init__`` calls its module's ``_new_mutex(self)`` (these stand-ins, or
    the C ones): the module's own, so that a subclass run as plain Python over a compiled
    base (as the tests do) still gets its threading.Lock.
    """


class _Counters(Mutexed):
    """The process' use ticks and request numbers."""

    def __init__(self) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.tick = 0
        self.requests = 0


_counters = _Counters()


def next_tick() -> int:
    """The next use tick: larger than every tick handed out before in this process."""
    counters = _counters
    _hold(counters)  # type: ignore[name-defined]  # noqa: F821
    counters.tick += 1
    tick = counters.tick
    _free(counters)  # type: ignore[name-defined]  # noqa: F821
    return tick


def next_request() -> int:
    """The process' next request number (kmsguard.operation.request_id_of), for full operations and hits alike."""
    counters = _counters
    _hold(counters)  # type: ignore[name-defined]  # noqa: F821
    counters.requests += 1
    number = counters.requests
    _free(counters)  # type: ignore[name-defined]  # noqa: F821
    return number


def sealed(aead: Any, prefix: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``prefix || nonce || AES-GCM(aead, nonce, plaintext, aad)`` as one new bytes object.

    Compiled, the ciphertext is written into the returned object itself: a megabyte
    message costs one buffer, not a ciphertext buffer copied behind the header (on fresh
    pages every call, which cost more than the encryption).
    """
    return _into(aead, prefix, nonce, plaintext, aad)  # type: ignore[name-defined, no-any-return]  # noqa: F821


class Budget(Mutexed):
    """How much longer, and for how many more messages and bytes, one data key may be used.

    ``aead`` is the key's AESGCM object; :meth:`claim` hands it out with each use and
    :meth:`retire` forgets it. ``hits`` counts claims (the fetching caller's first use is
    not one); ``last_used`` is the tick of the last use. ``monotonic``: ``clock`` is
    time.monotonic, which a hit reads as C (and once, for its own timing and the claim).
    """

    def __init__(
        self,
        aead: Any,
        clock: Callable[[], float],
        expires: float,
        max_messages: int = _NO_LIMIT,
        max_bytes: int = _NO_LIMIT,
        first_size: int = 0,
    ) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self.aead = aead
        self.clock = clock
        self.expires = expires
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 1  # the first message is the fetching caller's own
        self.nbytes = first_size
        self.hits = 0
        self.live = True
        self.last_used = next_tick()
        self.monotonic = clock is time.monotonic and _SAME_CLOCK

    def claim(self, size: int) -> Any:
        """One use for a message of ``size`` bytes: the AESGCM object, or None if spent, expired or retired."""
        # The clock is read before the lock: nothing that calls Python is done holding it.
        return self.claim_at(size, _clock() if self.monotonic else self.clock())  # type: ignore[name-defined]  # noqa: F821

    def claim_at(self, size: int, now: float) -> Any:
        """:meth:`claim`, at ``now`` read from time.monotonic's clock by the caller (who times the
        operation with the same reading); a Budget on another clock reads its own."""
        if not self.monotonic:
            now = self.clock()
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        aead = self._take(size, now)
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return aead

    def _take(self, size: int, now: float) -> Any:
        if not self.live or now >= self.expires or self.messages >= self.max_messages:
            return None
        if self.nbytes + size > self.max_bytes:
            return None
        self.messages += 1
        self.nbytes += size
        self.hits += 1
        self.last_used = next_tick()
        return self.aead

    def used(self) -> int:
        """The tick of the last use (read under the lock, as a use writes it)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        tick = self.last_used
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return tick

    def retire(self) -> None:
        """No more uses, by anyone; the key object goes with the last operation using it."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        self.live = False
        self.aead = None  # under the lock, as claim reads it (freeing the key object runs no Python)
        _free(self)  # type: ignore[name-defined]  # noqa: F821


@cython.freelist(16)
@cython.no_gc
@cython.cclass
class OperationEvent:
    """One finished operation, as every observer receives it. Never changed once made.

    ``kind`` (a kmsguard.operation.EventKind) is what all operations of one kind share, and
    is shared by them: its fields are read through this event's properties. The event's
    own fields are ``started_at`` (epoch seconds), ``duration`` (seconds), ``size``
    (plaintext bytes), ``request`` (the request number: the process' own, or the front-end
    request's inside kmsguard.operation.serving; 0 when that request has the caller's own
    id) and ``caller_id`` (that caller's id, else None); ``request_id`` is the audit
    record's request id, made from those two. It holds names, counts and the context
    (never secret, it is in every envelope's header); never plaintext, ciphertext or keys.

    Compiled, one is made per observed cache hit, so it is cheap to make: taken from a
    free list, and not tracked by the cycle collector (it cannot be in a cycle: it
    holds an EventKind, made before it, and a str).
    """

    def __init__(
        self, kind: Any, started_at: float, duration: float, size: int, request: int, caller_id: str | None = None
    ) -> None:
        self.kind = kind
        self.started_at = started_at
        self.duration = duration
        self.size = size
        self.request = request
        self.caller_id = caller_id

    @property
    def operation(self) -> str:
        """``encrypt``, ``decrypt``, ``rewrap`` (or an admin operation such as ``keys.rotate``)."""
        return self.kind.operation  # type: ignore[no-any-return]

    @property
    def classification(self) -> str | None:
        """The classification, once the policy accepted it; None when the operation failed before."""
        return self.kind.classification  # type: ignore[no-any-return]

    @property
    def principal(self) -> str:
        return self.kind.principal  # type: ignore[no-any-return]

    @property
    def outcome(self) -> str:
        """``ok`` or ``error``."""
        return self.kind.outcome  # type: ignore[no-any-return]

    @property
    def error_code(self) -> str | None:
        """The error's stable code (kmsguard.errors) when ``outcome`` is ``error``."""
        return self.kind.error_code  # type: ignore[no-any-return]

    @property
    def cache_hit(self) -> bool | None:
        """True: served from the data-key cache; False: a miss; None: no cache took part."""
        return self.kind.cache_hit  # type: ignore[no-any-return]

    @property
    def kms_calls(self) -> int:
        """Key-service calls the operation made (retries are counted by the AWS layer)."""
        return self.kind.kms_calls  # type: ignore[no-any-return]

    @property
    def key_refs(self) -> tuple[str, ...]:
        return self.kind.key_refs  # type: ignore[no-any-return]

    @property
    def regions(self) -> tuple[str, ...]:
        return self.kind.regions  # type: ignore[no-any-return]

    @property
    def context(self) -> Any:
        """The checked encryption context (a read-only mapping)."""
        return self.kind.context

    @property
    def strict(self) -> bool:
        """Whether Guard refuses this operation when an observer raises (the policy's strict audit)."""
        return self.kind.strict  # type: ignore[no-any-return]

    @property
    def request_id(self) -> str:
        """The caller's own id, or the one kmsguard.operation.request_id_of makes of ``request``."""
        if self.caller_id is not None:
            return self.caller_id
        from kmsguard.operation import request_id_of

        return request_id_of(self.request)

    def __repr__(self) -> str:
        return f"OperationEvent({self.kind!r}, size={self.size}, duration={self.duration!r})"


class HitSink(Mutexed):
    """How cache hits reach one observer (the lanes of kmsguard.plans call ``record`` per hit).

    A subclass compiled with this module (the audit writer's, the metrics registry's)
    is called as C. The base records nothing. A sink is called from every thread at once:
    a field that a hit reads and something else replaces is read and replaced under the
    sink's own lock (Mutexed; the subclass's ``__init__`` makes it).
    """

    def record(self, kind: Any, started: float, duration: float, size: int, request: int, caller_id: Any) -> None:
        """One hit of ``kind`` (an EventKind): started at ``started`` (epoch seconds), took
        ``duration`` s, ``size`` bytes, request number ``request`` (0 when ``caller_id``, the
        caller's own request id, is not None; see OperationEvent)."""


class EventSink(HitSink):
    """Hits as OperationEvents to an observer's ``observe`` (any observer without a sink of its own).

    What ``observe`` raises on a hit is ``report``'s: a hit is never strict (Guard serves
    strict operations on the full route), so its result stands.
    """

    def __init__(self, observe: Callable[[OperationEvent], None], report: Callable[[BaseException], None]) -> None:
        self.observe = observe
        self.report = report

    def record(self, kind: Any, started: float, duration: float, size: int, request: int, caller_id: Any) -> None:
        # Made without __init__: compiled, the fields are stored as C numbers, never boxed.
        event = OperationEvent.__new__(OperationEvent)
        event.kind = kind
        event.started_at = started
        event.duration = duration
        event.size = size
        event.request = request
        event.caller_id = caller_id
        try:
            self.observe(event)
        except Exception as exc:
            self.report(exc)
