"""The per-message work of a cache hit: what Guard does when every decision is already made.

With a data key in the cache, an encrypt or decrypt of a small message is AES-GCM plus
Python around it, and for 1 KiB AES-GCM itself (``cryptography``'s AESGCM) costs about
a microsecond. Guard makes each decision once — the plan (policy, context validation,
encoded header), the cache entry (its limits), the key commitment check — and keeps the
result here as a *lane*, so that the next message with the same classification and
context (or the same envelope header) costs a dictionary lookup, one claim on the
entry's :class:`Budget`, a nonce and the AES-GCM call:

* an :class:`EncryptLane` per (classification, context items): the output prefix
  (header, wrapped keys, commitment), the associated-data prefix and the Budget of the
  cached data key;
* a :class:`DecryptLane` per envelope prefix (header through commitment, exactly what
  :class:`kmsguard.plans.DecryptPlans` memoizes): the header's context and the
  classification's required keys (to check the caller's context), where the nonce and
  body start, and the Budget of the unwrapped key, bound only after the slow path
  opened an envelope with that prefix (so the commitment matched).

A lane never decides anything the slow path would not: whenever a lane is missing, its
Budget is spent or retired, or the input is anything but the plain case (not bytes, a
context that does not match, a text envelope), it returns None and Guard takes the
full path, which raises the right error or binds a new lane.

**Budget** is the reuse budget of one cached data key, shared by the cache
(``CachingKeyring``) and the lanes, so the cache's limits hold on both paths. Its
:meth:`Budget.claim` checks and counts one use in one step. This module is compiled
with Cython when the package is built (``fastpath.pxd`` gives the C types), and then a
claim is C code that never releases the GIL: atomic without a lock. Imported as plain
Python (no compiler at install time), it takes a lock instead; :data:`COMPILED` says
which. Retiring a Budget drops its AESGCM object, so a lane that outlives its cache
entry holds no key.

**Observed hits.** With observers (audit, metrics) that take hits in compact form
(:class:`HitSink`), a lane serves an operation only once the full path has taught it
that operation's kind (kmsguard.operation.HitKind: principal, classification, keys,
context), then reports each hit to the sinks with its start, duration and size; an
operation of a kind it does not know, or a strict one, takes the full path and is
observed in full.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from cryptography.exceptions import InvalidTag

from kmsguard import nonces
from kmsguard.errors import InvalidCiphertext

#: True when this module runs compiled (a claim is atomic under the GIL, see Budget).
COMPILED = not __file__.endswith(".py")

TAG_SIZE = 16
#: AESGCM refuses 2^31 bytes or more; bigger messages take the slow path, which says so.
MAX_PLAINTEXT = 2**31 - 1 - TAG_SIZE
#: Lanes kept per kind before starting over (a re-bind costs one slow-path operation).
MAX_LANES = 4096
#: Distinct envelope prefix lengths probed on decrypt (one per header shape in use).
MAX_PREFIX_LENGTHS = 8
_NO_LIMIT = 2**62
#: HitKinds a lane keeps (principals, and callers' contexts on decrypt); beyond, the full path.
MAX_KINDS_PER_LANE = 64
_COPY_BELOW = 16384

_tick = 0  # a use counter shared by every Budget: its value at a Budget's last use orders the LRU
_nonce = nonces.nonce
_wall = time.time
# Compiled, the lanes' clock (CLOCK_MONOTONIC, which perf_counter reads on Linux) and
# their read of a context variable are C functions from fastpath.pxd; interpreted, these
# stand-ins. Set through globals() because Cython would compile a def of the same name.
globals()["_clock"] = time.perf_counter
globals()["_value_of"] = ContextVar.get
_join = b"".join
#: What a header lacks a key as; equal to nothing a caller can pass.
_ABSENT = object()
_requests = 0
_request_lock = threading.Lock()


def next_request() -> int:
    """The process' next request number (kmsguard.operation.request_id_of), for the full
    path and the hit frames alike. Compiled, a C counter that needs no lock (as Budget._take)."""
    global _requests
    if COMPILED:
        _requests += 1
        return _requests
    with _request_lock:
        _requests += 1
        return _requests


class Budget:
    """How much longer, and for how many more messages and bytes, one data key may be used.

    ``aead`` is the key's AESGCM object; :meth:`claim` hands it out with each use and
    :meth:`retire` forgets it. ``hits`` counts claims (the cache's first use is not one).
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
        global _tick
        self.aead = aead
        self.clock = clock
        self.expires = expires
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 1  # the first message is the fetching caller's own
        self.nbytes = first_size
        self.hits = 0
        self.live = True
        _tick += 1
        self.last_used = _tick
        self._lock = threading.Lock()

    def claim(self, size: int) -> Any:
        """One use for a message of ``size`` bytes: the AESGCM object, or None if spent, expired or retired."""
        now = self.clock()  # before the atomic part: a Python call may switch threads
        if COMPILED:
            return self._take(size, now)
        with self._lock:
            return self._take(size, now)

    def _take(self, size: int, now: float) -> Any:
        global _tick
        if not self.live or now >= self.expires or self.messages >= self.max_messages:
            return None
        if self.nbytes + size > self.max_bytes:
            return None
        self.messages += 1
        self.nbytes += size
        self.hits += 1
        _tick += 1
        self.last_used = _tick
        return self.aead

    def retire(self) -> None:
        """No more uses, by anyone; the key object goes with the last operation using it."""
        self.live = False
        self.aead = None


class EncryptLane:
    """Sealing under one cached data key for one (classification, context).

    ``kinds``: the HitKind per principal, for recording hits (see :meth:`Lanes.seal`);
    ``last``: the last (principal, HitKind) found, one tuple so that it is read whole.
    """

    def __init__(self, budget: Budget, out_prefix: bytes, aad_prefix: bytes) -> None:
        self.budget = budget
        self.out_prefix = out_prefix
        self.aad_prefix = aad_prefix
        self.kinds: dict[object, object] = {}
        self.last: tuple[object, object] = (_ABSENT, None)


class DecryptLane:
    """Opening envelopes with one prefix under the cached data key they name.

    ``kinds``: the HitKind per (principal, caller's context items).
    """

    def __init__(
        self,
        budget: Budget,
        context: Mapping[str, str],
        required: tuple[str, ...],
        aad_prefix: bytes,
        prefix_len: int,
        body_start: int,
    ) -> None:
        self.budget = budget
        self.context = context
        self.required = required
        self.aad_prefix = aad_prefix
        self.prefix_len = prefix_len
        self.body_start = body_start
        self.kinds: dict[object, object] = {}


def bind_kind(lane: EncryptLane | DecryptLane, key: object, kind: object) -> None:
    """Remember ``kind`` for later hits on ``lane`` (a bounded number per lane)."""
    if len(lane.kinds) < MAX_KINDS_PER_LANE:
        lane.kinds[key] = kind
        if isinstance(lane, EncryptLane):
            lane.last = (_ABSENT, None)


class HitSink:
    """Where an observer takes cache hits in compact form (kmsguard.operation.HitKind).

    The audit writer and the metrics registry subclass it (compiled, they are called
    from :class:`Lanes` as C, with no Python call in between).
    """

    def record(self, kind: Any, started: float, duration: float, size: int) -> None:
        """One hit of ``kind``: started at ``started`` (epoch seconds), took ``duration`` s, ``size`` bytes.

        The base records nothing."""


class Lanes:
    """One Guard's lanes. Dictionaries only: every read and replace is atomic under the GIL.

    With ``observed`` set (Guard's observers all take hits, see
    kmsguard.operation.HitObserver), a lane serves only operations of a kind it has a
    HitKind for — per principal: the ``acting`` context variable's, else ``principal``
    — and reports each to ``sinks``; any other operation takes the full path, which
    observes it in full.
    """

    def __init__(
        self,
        observed: bool = False,
        sinks: tuple[HitSink, ...] = (),
        principal: str = "",
        acting: ContextVar[str | None] | None = None,
    ) -> None:
        self.encrypt: dict[object, EncryptLane] = {}
        self.decrypt: dict[bytes, DecryptLane] = {}
        self.lengths: list[int] = []
        self.observed = observed
        self.sinks = sinks
        self.principal = principal
        self._acting = acting
        self._synced_at = -2.0  # _clock() time of the last wall-clock reading (see _record)
        self._wall_offset = 0.0

    def seal(self, plaintext: Any, classification: Any, context: Any) -> bytes | None:
        """The envelope of ``plaintext``, or None: take the slow path."""
        lane = self._encrypt_lane(plaintext, classification, context)
        if lane is None:
            return None
        if not self.observed:
            return self._seal(lane, plaintext)
        principal = self._principal()
        last = lane.last
        if last[0] is principal:
            kind = last[1]
        else:
            kind = lane.kinds.get(principal)
            if kind is None:
                return None
            lane.last = (principal, kind)
        t0 = _clock()  # type: ignore[name-defined]  # noqa: F821
        out = self._seal(lane, plaintext)
        if out is not None:
            t1 = _clock()  # type: ignore[name-defined]  # noqa: F821
            self._record(kind, t0, t1 - t0, len(plaintext))
        return out

    def open(self, raw: bytes, context: Any) -> bytes | None:
        """The plaintext of binary envelope ``raw``, or None: take the slow path.

        A body that fails authentication under a bound lane raises InvalidCiphertext,
        as the slow path would: the prefix (header and commitment) names the key.
        """
        lane = self._decrypt_lane(raw, context)
        if lane is None:
            return None
        if not self.observed:
            return self._open(lane, raw)
        kind = lane.kinds.get((self._principal(), tuple(context.items()) if context else ()))
        if kind is None:
            return None
        t0 = _clock()  # type: ignore[name-defined]  # noqa: F821
        out = self._open(lane, raw)
        if out is not None:
            t1 = _clock()  # type: ignore[name-defined]  # noqa: F821
            self._record(kind, t0, t1 - t0, len(out))
        return out

    def bind_encrypt(self, key: object, lane: EncryptLane) -> None:
        if len(self.encrypt) >= MAX_LANES:
            self.encrypt.clear()
        self.encrypt[key] = lane

    def bind_decrypt(self, prefix: bytes, lane: DecryptLane) -> None:
        if len(self.decrypt) >= MAX_LANES:
            self.decrypt.clear()
        if len(prefix) not in self.lengths:
            if len(self.lengths) >= MAX_PREFIX_LENGTHS:
                return
            self.lengths.append(len(prefix))
        self.decrypt[prefix] = lane

    # ------------------------------------------------------------------ internals

    def _encrypt_lane(self, plaintext: Any, classification: Any, context: Any) -> EncryptLane | None:
        if not self.encrypt or type(plaintext) is not bytes or len(plaintext) > MAX_PLAINTEXT:
            return None  # no lane yet (a cache that is off never binds one): skip making the key
        try:
            return self.encrypt.get((classification, tuple(context.items()) if context else ()))
        except (AttributeError, TypeError):
            return None

    def _seal(self, lane: EncryptLane, plaintext: bytes) -> bytes | None:
        aead = lane.budget.claim(len(plaintext))
        if aead is None:
            return None
        nonce = _nonce()
        return _join((lane.out_prefix, nonce, aead.encrypt(nonce, plaintext, lane.aad_prefix + nonce)))

    def _decrypt_lane(self, raw: bytes, context: Any) -> DecryptLane | None:
        """The lane bound to ``raw``'s prefix, if the caller's context is exactly what it accepts."""
        lane: DecryptLane | None = None
        for n in self.lengths:
            lane = self.decrypt.get(raw[:n])
            if lane is not None:
                break
        if lane is None or len(raw) < lane.body_start + TAG_SIZE:
            return None
        try:
            if context:
                header = lane.context
                for key, value in context.items():
                    if header.get(key, _ABSENT) != value:
                        return None
            for key in lane.required:
                if context is None or key not in context:
                    return None
        except (AttributeError, TypeError):
            return None
        return lane

    def _open(self, lane: DecryptLane, raw: bytes) -> bytes | None:
        aead = lane.budget.claim(0)
        if aead is None:
            return None
        start = lane.body_start
        nonce = raw[lane.prefix_len : start]
        # A small body is cheaper to copy than to wrap in a memoryview; a large one is not.
        body = raw[start:] if len(raw) - start <= _COPY_BELOW else memoryview(raw)[start:]
        try:
            return aead.decrypt(nonce, body, lane.aad_prefix + nonce)  # type: ignore[no-any-return]
        except InvalidTag:
            raise InvalidCiphertext() from None

    def _principal(self) -> Any:
        acting = self._acting
        return (_value_of(acting) if acting is not None else None) or self.principal  # type: ignore[name-defined]  # noqa: F821

    def _record(self, kind: object, t0: float, duration: float, size: int) -> None:
        """Report a hit that started at ``t0`` (the lanes' monotonic clock) to every sink, with its wall-clock start.

        The wall clock is read once a second, not per hit: between readings a start time
        is the last reading plus the monotonic time since, off by the clocks' drift
        over at most a second (microseconds), which an audit timestamp can afford.
        """
        if t0 - self._synced_at > 1.0:
            self._synced_at = t0
            # Both clocks read now: against t0, the offset would carry this hit's duration
            # (and any time the thread was descheduled) into every start for a second.
            self._wall_offset = _wall() - _clock()  # type: ignore[name-defined]  # noqa: F821
        started = t0 + self._wall_offset
        for sink in self.sinks:
            sink.record(kind, started, duration, size)
