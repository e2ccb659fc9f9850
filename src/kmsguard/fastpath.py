"""The per-message primitives of a cache hit: a data key's reuse Budget, the use tick, request numbers.

**Budget** is the reuse budget of one cached data key, shared by the cache
(``CachingKeyring``) and the plan it lends the key to (kmsguard.plans), so the cache's
limits (``max_age``, ``max_messages``, ``max_bytes``) hold on every path. Its
:meth:`Budget.claim` checks and counts one use in one step. Retiring a Budget drops its
AESGCM object, so a plan that outlives its cache entry holds no key.

**Ticks** order uses: :func:`next_tick` is a process-wide counter; a Budget records the
tick of its last use, and so does a plan, so that :class:`kmsguard.lru.LruIndex` can
find the least recently used without any hit touching it.

**HitSink** is where an observer (audit, metrics) takes cache hits in compact form.

**sealed** builds a suite-1 envelope from its prefix, nonce and plaintext as one bytes
object; compiled, AES-GCM encrypts straight into it.

This module is compiled with Cython when the package is built (``fastpath.pxd`` gives
the C types): then a claim, a tick and a request number are C code that never releases
the GIL. Imported as plain Python (no compiler at install time), each takes a lock
instead; :data:`COMPILED` says which.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: True when this module runs compiled (see the module docstring).
COMPILED = not __file__.endswith(".py")

_NO_LIMIT = 2**62
#: From this plaintext size the envelope is sealed with :func:`sealed`: below it, one
#: AES-GCM call and a join cost less than setting up the view.
SEAL_INTO_FROM = 16384
# Compiled, _into is C from fastpath.pxd (encrypt_into the returned object); interpreted,
# a join, which plain Python cannot avoid for an immutable result. Set through globals()
# because Cython would compile a def of the same name.
globals()["_into"] = lambda aead, prefix, nonce, plaintext, aad: b"".join(
    (prefix, nonce, aead.encrypt(nonce, plaintext, aad))
)
_tick = 0
_requests = 0
_counter_lock = threading.Lock()


def next_tick() -> int:
    """The next use tick: larger than every tick handed out before in this process."""
    global _tick
    if COMPILED:
        _tick += 1
        return _tick
    with _counter_lock:
        _tick += 1
        return _tick


def next_request() -> int:
    """The process' next request number (kmsguard.operation.request_id_of), for full operations and hits alike."""
    global _requests
    if COMPILED:
        _requests += 1
        return _requests
    with _counter_lock:
        _requests += 1
        return _requests


def sealed(aead: Any, prefix: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``prefix || nonce || AES-GCM(aead, nonce, plaintext, aad)`` as one new bytes object.

    Compiled, the ciphertext is written into the returned object itself: a megabyte
    message costs one buffer, not a ciphertext buffer copied behind the header (on fresh
    pages every call, which cost more than the encryption).
    """
    return _into(aead, prefix, nonce, plaintext, aad)  # type: ignore[name-defined, no-any-return]  # noqa: F821


class Budget:
    """How much longer, and for how many more messages and bytes, one data key may be used.

    ``aead`` is the key's AESGCM object; :meth:`claim` hands it out with each use and
    :meth:`retire` forgets it. ``hits`` counts claims (the fetching caller's first use is
    not one); ``last_used`` is the tick of the last use.
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
        self._lock = threading.Lock()

    def claim(self, size: int) -> Any:
        """One use for a message of ``size`` bytes: the AESGCM object, or None if spent, expired or retired."""
        now = self.clock()  # before the atomic part: a Python call may switch threads
        if COMPILED:
            return self._take(size, now)
        with self._lock:
            return self._take(size, now)

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

    def retire(self) -> None:
        """No more uses, by anyone; the key object goes with the last operation using it."""
        self.live = False
        self.aead = None


class HitSink:
    """Where an observer takes cache hits in compact form (kmsguard.operation.HitKind).

    The audit writer and the metrics registry subclass it (compiled, they are called
    from kmsguard.plans as C, with no Python call in between).
    """

    def record(self, kind: Any, started: float, duration: float, size: int) -> None:
        """One hit of ``kind``: started at ``started`` (epoch seconds), took ``duration`` s, ``size`` bytes.

        The base records nothing."""
