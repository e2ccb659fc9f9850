"""Plans: what Guard decides once per (classification, context) and per envelope prefix, and the route of a hit.

With a data key in the cache, the cost of an operation on a small message is AES-GCM
plus whatever Python does around it. So Guard does not re-validate the context,
re-apply the policy, re-encode the header or re-parse the same header for every
message: it asks the operation's plan, which holds those results.

* an :class:`EncryptPlan` per (classification, context items): the policy, the checked
  context (a snapshot), the key request and the encoded header;
* a :class:`DecryptPlan` per envelope prefix (header, wrapped keys and commitment, which
  all envelopes sealed under one data key with one context share): the parsed header,
  the policy, the key request and the associated-data prefix.

When the data-key cache lends the plan a key (kmsguard.keyrings.base.KeyLender), the
plan keeps it as its :class:`Lane`: the key's Budget (kmsguard.fastpath) and, for
encrypt, the envelope prefix that names the key. The next message with the same plan
then costs a dictionary lookup, one claim on the Budget, a nonce and the AES-GCM call
(:meth:`Plans.seal`, :meth:`Plans.open`). A decrypt plan gets its lane only after an
envelope with its prefix opened under the key (so the commitment matched).

The fast route never decides anything the full one would not: whenever a plan or its
lane is missing, the Budget is spent or retired, or the input is anything but the plain
case (not bytes, a context that does not match, a text envelope), it returns None and
Guard takes the full route, which raises the right error or lends the plan a new key.

Plans hold no data and no key material beyond the Budget's AESGCM object, which
retiring the Budget drops. Only successful work is kept, so every error is raised
afresh. Each table holds at most ``max_plans`` plans and gives up the least recently
used one at a time (kmsguard.lru).

**Observed hits.** With observers, a lane serves an operation only once the full route
has taught it that operation's kind (kmsguard.operation.EventKind: principal,
classification, keys, context), then reports each hit to every observer's HitSink
(kmsguard.fastpath) with its start, duration, size and request number; an operation of a
kind it does not know, or a strict one, takes the full route and is observed in full.
A hit finds its kind with one dictionary lookup by principal (decrypt: then the caller's
context compared pair by pair with the few seen), and reads the clock once before the
claim (which uses that reading too) and once after.

Compiled with Cython when the package is built (``plans.pxd``), like kmsguard.fastpath.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag

from kmsguard import envelope, nonces
from kmsguard.datakey import DataKey
from kmsguard.errors import (
    ContextMismatch,
    ContextRequired,
    InvalidCiphertext,
    InvalidInput,
    KmsGuardError,
    UnknownClassification,
)
from kmsguard.fastpath import (
    SEAL_INTO_FROM,
    Budget,
    HitSink,
    Mutexed,
    _plain_free,
    _plain_hold,
    _plain_lookup,
    _plain_new_mutex,
    next_request,
    next_tick,
    sealed,
)
from kmsguard.keyrings.base import KeyRequest
from kmsguard.lru import LruIndex
from kmsguard.policy import FIELD_CONTEXT_KEY, SELFTEST_CONTEXT_KEY, ClassPolicy, Policy

#: True when this module runs compiled.
COMPILED = not __file__.endswith(".py")

#: Plans each table (encrypt, decrypt) keeps by default before giving up the least recently used.
DEFAULT_MAX_PLANS = 16_384
#: EventKinds a lane keeps (principals, and callers' contexts on decrypt); beyond, the full route.
MAX_KINDS_PER_LANE = 64
#: Context keys under this prefix are kmsguard's own (see KeyRequest.bound_context).
RESERVED_CONTEXT_PREFIX = "kmsguard:"

_TAG_SIZE = envelope.TAG_SIZE
_NONCE_SIZE = envelope.NONCE_SIZE
_COMMITMENT_SIZE = envelope.COMMITMENT_SIZE
_MAX_PLAINTEXT = envelope.MAX_PLAINTEXT
_COPY_BELOW = 16384
_INTO_FROM = SEAL_INTO_FROM
#: What a header lacks a key as; equal to nothing a caller can pass (None included).
_ABSENT = object()
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
_nonce = nonces.nonce
_wall = time.time
_join = b"".join
# Compiled, the clock (time.monotonic's: CLOCK_MONOTONIC on Linux), the read of a
# context variable, the locks (kmsguard.fastpath.Mutexed), the dictionary lookup and the
# whole-double reads and stores of Plans' clock offset are C functions from plans.pxd and
# fastpath.pxd; interpreted, these stand-ins. Set through globals() because Cython would
# compile a def of the same name.
globals().update(
    _clock=time.monotonic,
    _value_of=ContextVar.get,
    _hold=_plain_hold,
    _free=_plain_free,
    _new_mutex=_plain_new_mutex,
    _lookup=_plain_lookup,
    _synced_at=attrgetter("_synced_at"),
    _wall_offset=attrgetter("_wall_offset"),
    _sync=lambda plans, at, offset: plans.__dict__.update(_synced_at=at, _wall_offset=offset),
)
#: Serialises bind_kind (the full route's), so a lane's kinds stay within MAX_KINDS_PER_LANE.
_binding = threading.Lock()


class _ReservedKey(str):
    """A reserved context key that only kmsguard's own code holds (see FIELD_KEY).

    It equals only itself, never the plain string a caller could pass, so a plan or lane
    memoized for a context holding it can never be found with a caller's context.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return other is self

    def __ne__(self, other: object) -> bool:
        return other is not self

    __hash__ = str.__hash__  # the C slot: memo lookups hash it without a Python call


#: What kmsguard.fields passes to bind a field's path under ``kmsguard:field``; the header
#: holds the plain key. check_context accepts this object and refuses the plain string.
FIELD_KEY: str = _ReservedKey(FIELD_CONTEXT_KEY)


def check_context(context: Any) -> Mapping[str, str]:
    """Check the caller's context (None or a mapping of str to str) before any key service sees it.

    Keys under ``kmsguard:`` are reserved (the classification is bound under one), but for
    ``kmsguard:selftest`` (see SELFTEST_CONTEXT_KEY), which only marks test traffic; and
    text that is not encodable as UTF-8 (lone surrogates) is refused here rather than
    deep inside a keyring. Returns the context, or a copy in plain ``str`` if any key or
    value is an instance of a subclass.
    """
    if context is None:
        return _NO_CONTEXT
    if type(context) is not dict and not isinstance(context, Mapping):
        raise InvalidInput("context must be a mapping of str to str")
    exact = True
    for key, value in context.items():
        if type(key) is not str or type(value) is not str:
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidInput("context keys and values must be strings")
            exact = False
        if key.startswith(RESERVED_CONTEXT_PREFIX) and key is not FIELD_KEY and key != SELFTEST_CONTEXT_KEY:
            raise InvalidInput(f"context keys starting with {RESERVED_CONTEXT_PREFIX!r} are reserved")
        if not (key.isascii() and value.isascii()):
            try:
                key.encode("utf-8")
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput("encryption context must be valid Unicode text") from None
    if not exact:  # str subclasses (an enum member): their text, all an audit record can hold
        return {str.__str__(key): str.__str__(value) for key, value in context.items()}
    return context


def context_error(plan: DecryptPlan, given: Any) -> KmsGuardError | None:
    """What decrypting under ``plan`` with the caller's context ``given`` must raise, or None.

    Every pair given must match the header, and the classification's required keys must
    be among them: a caller states why it decrypts payment data as it did when
    encrypting. A pair that matches a header pair is two strings, so types are checked
    only on a mismatch. ``given`` that is not a mapping raises AttributeError.
    """
    header = plan.context
    for key, value in given.items():
        if header.get(key, _ABSENT) != value:
            if not isinstance(key, str) or not isinstance(value, str):
                return InvalidInput("context keys and values must be strings")
            return ContextMismatch(f"context key {key!r} does not match the ciphertext")
    for key in plan.required:
        if key not in given:
            return _required(plan, given)
    return None


def _required(plan: DecryptPlan, given: Mapping[str, str]) -> ContextRequired:
    # The attribute read first: Cython 3.3 compiles a comprehension over ``plan.required``
    # (plan a module-level def's argument) into a read of a NULL pointer.
    required = plan.required
    missing = [key for key in required if key not in given]
    return ContextRequired(
        f"classification {plan.policy.name!r} requires context keys at decrypt: {', '.join(missing)}"
    )


class Lane:
    """A cached data key lent to one plan: its Budget, and for encrypt the prefixes naming it.

    Never changed once made, except ``kinds``, which only grows (up to MAX_KINDS_PER_LANE
    EventKinds, under bind_kind's lock; a hit reads it with one dictionary lookup that
    owns its result): for an encrypt lane, the EventKind per principal; for a decrypt
    lane, per principal, the (caller's context items, EventKind) pairs seen, one tuple
    replaced whole. A plan swaps its lane under its lock, so a reader sees one whole lane.
    """

    def __init__(
        self, budget: Budget, key_refs: tuple[str, ...], out_prefix: bytes = b"", aad_prefix: bytes = b""
    ) -> None:
        self.budget = budget
        self.key_refs = key_refs
        self.out_prefix = out_prefix
        self.aad_prefix = aad_prefix
        self.kinds: dict[object, Any] = {}
        self.bound = 0


class _Planned(Mutexed):
    """What both plans share: the lane, replaced by the full route while hits read it, and the
    tick of the last use; both read and written under the plan's lock."""

    def __init__(self) -> None:
        _new_mutex(self)  # type: ignore[name-defined]  # noqa: F821
        self._lane: Lane | None = None
        self._last_used = next_tick()

    def use(self, tick: int) -> Lane | None:
        """The lane (or None), recording a use at ``tick``: one step under the lock."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        lane = self._lane
        self._last_used = tick
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return lane

    def used(self) -> int:
        """The tick of the last use (what the plan table's LruIndex orders by)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        tick = self._last_used
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return tick

    @property
    def lane(self) -> Lane | None:
        """The lane now (None before the cache lent this plan a key)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        lane = self._lane
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        return lane

    def install(self, lane: Lane) -> Lane:
        """Make ``lane`` the one the next messages take (the one it replaces is let go)."""
        _hold(self)  # type: ignore[name-defined]  # noqa: F821
        old = self._lane  # dropped after the lock is let go
        self._lane = lane
        _free(self)  # type: ignore[name-defined]  # noqa: F821
        del old
        return lane


class EncryptPlan(_Planned):
    """Everything decided once for sealing under one classification and context."""

    def __init__(self, policy: ClassPolicy, context: Mapping[str, str], request: KeyRequest, header: bytes) -> None:
        _Planned.__init__(self)
        self.policy = policy
        self.context = context
        self.request = request
        self.header = header

    def seal(self, lane: Lane, aead: Any, plaintext: bytes) -> bytes:
        """``plaintext`` sealed with ``aead``, the key ``lane`` names (claimed from its Budget).

        A large message is encrypted into the envelope itself, not into a buffer copied
        behind the header: at megabytes the copy (on fresh pages each call) would cost
        more than AES-GCM.
        """
        nonce = _nonce()
        if len(plaintext) >= _INTO_FROM:
            return sealed(aead, lane.out_prefix, nonce, plaintext, lane.aad_prefix + nonce)
        return _join((lane.out_prefix, nonce, aead.encrypt(nonce, plaintext, lane.aad_prefix + nonce)))

    def lend(self, budget: Budget, data_key: DataKey) -> Lane:
        """Keep ``data_key`` (whose reuse ``budget`` counts) for the next messages of this plan."""
        sealer = envelope.Sealer(data_key, header=self.header)
        return self.install(
            Lane(budget, tuple(w.key_ref for w in data_key.wrapped), sealer.out_prefix, sealer.aad_prefix)
        )


class DecryptPlan(_Planned):
    """Everything decided once for opening envelopes that share one prefix (header through commitment)."""

    def __init__(self, policy: ClassPolicy, env: envelope.Envelope, request: KeyRequest) -> None:
        _Planned.__init__(self)
        self.policy = policy
        self.context = env.context
        self.required = tuple(sorted(policy.required_context))
        self.wrapped = env.wrapped_keys
        self.request = request
        self.commitment = env.commitment
        #: Associated data up to the nonce: the header without the wrapped keys, plus the commitment.
        self.aad_prefix = env.aad[:-_NONCE_SIZE]
        #: Bytes before the nonce (header, wrapped keys, commitment).
        self.prefix_len = env.body_offset - _NONCE_SIZE
        #: Where the body starts (after the nonce).
        self.body_start = env.body_offset

    def open(self, aead: Any, raw: bytes) -> bytes:
        """The body of ``raw`` opened with ``aead``, the key this plan's commitment names."""
        start = self.body_start
        nonce = raw[self.prefix_len : start]
        # A small body is cheaper to copy than to wrap in a memoryview; a large one is not.
        body = raw[start:] if len(raw) - start <= _COPY_BELOW else memoryview(raw)[start:]
        try:
            return aead.decrypt(nonce, body, self.aad_prefix + nonce)  # type: ignore[no-any-return]
        except InvalidTag:
            raise InvalidCiphertext() from None

    def open_with(self, data_key: DataKey, raw: bytes) -> bytes:
        """The body of ``raw`` opened with ``data_key``, once its commitment is checked (constant time)."""
        nonce = raw[self.prefix_len : self.body_start]
        body = memoryview(raw)[self.body_start :]
        return envelope.open_body(data_key, self.commitment, nonce, body, self.aad_prefix + nonce)

    def lend(self, budget: Budget) -> Lane:
        """Keep the key (whose reuse ``budget`` counts) that just opened an envelope of this plan."""
        return self.install(Lane(budget, tuple(w.key_ref for w in self.wrapped)))


def bind_kind(lane: Lane, principal: object, kind: object, items: tuple[Any, ...] | None = None) -> None:
    """Remember ``kind`` for later hits on ``lane`` by ``principal`` (a bounded number per lane):
    on a decrypt lane (``items`` given), for the caller's context ``items`` only.

    A kind bound again replaces the one before. Each store into ``kinds`` is one dictionary
    store of a finished value, so a hit on another thread finds the old value or the new.
    """
    with _binding:
        if lane.bound >= MAX_KINDS_PER_LANE:
            return
        if items is None:
            if principal not in lane.kinds:
                lane.bound += 1
            lane.kinds[principal] = kind
            return
        pairs = lane.kinds.get(principal, ())
        kept = tuple(pair for pair in pairs if pair[0] != items)
        if len(kept) == len(pairs):
            lane.bound += 1
        lane.kinds[principal] = (*kept, (items, kind))


def _same_items(given: Any, items: Any) -> bool:
    """Whether ``tuple(given.items()) == items``, without building the tuple (``given`` a mapping)."""
    if len(given) != len(items):
        return False
    for i, (key, value) in enumerate(given.items()):
        pair = items[i]
        if pair[0] != key or pair[1] != value:
            return False
    return True


def _last_used(plan: Any) -> int:
    return plan.used()  # type: ignore[no-any-return]


class Plans:
    """One Guard's plans: encrypt plans by (classification, context items), decrypt plans by prefix.

    Lookups read dictionaries without a lock (compiled, with a lookup that owns its result,
    kmsguard/locks.pxd); adding a plan (and giving up the least recently used) takes
    ``_lock``; a plan's lane and last use are read and changed under the plan's own lock.
    With ``observed`` set (Guard has observers), a lane serves only operations of a kind it
    has an EventKind for -- per principal: the ``acting`` context variable's, else
    ``principal`` -- and reports each to ``sinks``
    (one per observer that records hits, see kmsguard.operation.hit_sink) under the
    request the ``served`` context variable names (see _record).
    """

    def __init__(
        self,
        policy: Policy,
        max_plans: int = DEFAULT_MAX_PLANS,
        observed: bool = False,
        sinks: tuple[HitSink, ...] = (),
        principal: str = "",
        acting: ContextVar[str | None] | None = None,
        served: ContextVar[int | str | None] | None = None,
    ) -> None:
        self._policy = policy
        self.encrypt: LruIndex[object, EncryptPlan] = LruIndex(max_plans, _last_used)
        self.decrypt: LruIndex[bytes, DecryptPlan] = LruIndex(max_plans, _last_used)
        self._encrypt = self.encrypt.items
        self._decrypt = self.decrypt.items
        self._lock = threading.Lock()
        self.observed = observed
        self.sinks = sinks
        self.principal = principal
        self._acting = acting
        self._served = served
        self._synced_at = -2.0  # _clock() time of the last wall-clock reading (see _record)
        self._wall_offset = 0.0

    # ------------------------------------------------------------------ the full route

    def encrypt_plan(self, classification: str, context: Any) -> EncryptPlan:
        """The plan for ``classification`` and ``context``: kept, or made now (raising what the policy refuses)."""
        try:
            key: object = (classification, tuple(context.items()) if context else ())
            plan = self._encrypt.get(key)
        except (AttributeError, TypeError):  # not a mapping, or unhashable values: check_context says which
            key, plan = None, None
        if plan is not None:
            plan.use(next_tick())
            return plan
        cls = self._policy.get(classification)
        snapshot = dict(check_context(context))
        plan = EncryptPlan(
            cls, snapshot, self._policy.request(cls, snapshot), envelope.encode_header(cls.name, snapshot)
        )
        if key is not None:
            with self._lock:
                self.encrypt.put(key, plan)
        return plan

    def decrypt_plan(self, raw: bytes) -> DecryptPlan:
        """The plan for binary envelope ``raw``'s prefix: kept, or parsed now (raising InvalidCiphertext)."""
        n = _prefix_len(raw)
        if n > 0:
            plan = self._decrypt.get(raw[:n])
            if plan is not None:
                plan.use(next_tick())
                return plan
        env = envelope.parse(raw)
        try:
            cls = self._policy.get(env.classification)
        except UnknownClassification:  # naming no configured class is as bad as tampering
            raise InvalidCiphertext() from None
        plan = DecryptPlan(cls, env, self._policy.request(cls, env.context))
        with self._lock:
            self.decrypt.put(raw[: plan.prefix_len], plan)
        return plan

    # ------------------------------------------------------------------ the fast route

    def seal(self, plaintext: Any, classification: Any, context: Any) -> bytes | None:
        """The envelope of ``plaintext`` through its plan's lane, or None: take the full route."""
        if type(plaintext) is not bytes or len(plaintext) > _MAX_PLAINTEXT:
            return None
        try:
            found = _lookup(self._encrypt, (classification, tuple(context.items()) if context else ()))  # type: ignore[name-defined]  # noqa: F821
        except (AttributeError, TypeError):
            return None
        if found is None:
            return None
        plan: EncryptPlan = found
        lane = plan.use(next_tick())
        if lane is None:
            return None
        if not self.observed:
            aead = lane.budget.claim(len(plaintext))
            return None if aead is None else plan.seal(lane, aead, plaintext)
        kind = _lookup(lane.kinds, self._principal())  # type: ignore[name-defined]  # noqa: F821
        if kind is None:
            return None
        t0 = _clock()  # type: ignore[name-defined]  # noqa: F821
        aead = lane.budget.claim_at(len(plaintext), t0)  # one clock reading for the claim and the timing
        if aead is None:
            return None
        out = plan.seal(lane, aead, plaintext)
        t1 = _clock()  # type: ignore[name-defined]  # noqa: F821
        self._record(kind, t0, t1 - t0, len(plaintext))
        return out

    def open(self, raw: Any, context: Any) -> bytes | None:
        """The plaintext of binary envelope ``raw`` through its plan's lane, or None: take the full route.

        A body that fails authentication under a lane raises InvalidCiphertext, as the full
        route would: the prefix (header and commitment) names the key.
        """
        if type(raw) is not bytes:
            return None
        n = _prefix_len(raw)
        if n < 0:
            return None
        found = _lookup(self._decrypt, raw[:n])  # type: ignore[name-defined]  # noqa: F821
        if found is None:
            return None
        plan: DecryptPlan = found
        given = _NO_CONTEXT if context is None else context
        try:
            if context_error(plan, given) is not None:
                return None
        except (AttributeError, TypeError):
            return None
        lane = plan.use(next_tick())
        if lane is None:
            return None
        if not self.observed:
            aead = lane.budget.claim(0)
            return None if aead is None else plan.open(aead, raw)
        # The kind by principal, then by the caller's context items, compared pair by pair
        # with each seen (usually one): no key is built per hit.
        pairs = _lookup(lane.kinds, self._principal())  # type: ignore[name-defined]  # noqa: F821
        if pairs is None:
            return None
        kind = None
        for pair in pairs:
            if _same_items(given, pair[0]):
                kind = pair[1]
                break
        if kind is None:
            return None
        t0 = _clock()  # type: ignore[name-defined]  # noqa: F821
        aead = lane.budget.claim_at(0, t0)
        if aead is None:
            return None
        out = plan.open(aead, raw)
        t1 = _clock()  # type: ignore[name-defined]  # noqa: F821
        self._record(kind, t0, t1 - t0, len(out))
        return out

    # ------------------------------------------------------------------ internals

    def _principal(self) -> Any:
        acting = self._acting
        return (_value_of(acting) if acting is not None else None) or self.principal  # type: ignore[name-defined]  # noqa: F821

    def _record(self, kind: object, t0: float, duration: float, size: int) -> None:
        """Report a hit that started at ``t0`` (the monotonic clock) to every sink, with its wall-clock
        start and its request: read once from ``served`` (kmsguard.operation.request) for
        every sink alike -- the front-end request's number, or 0 and the caller's own id --
        or, outside a served request, a number of its own.

        The wall clock is read once a second, not per hit: between readings a start time
        is the last reading plus the monotonic time since, off by the clocks' drift
        over at most a second, which an audit timestamp can afford.
        """
        if t0 - _synced_at(self) > 1.0:  # type: ignore[name-defined]  # noqa: F821
            # Both clocks read now: against t0, the offset would carry this hit's duration
            # (and any time the thread was descheduled) into every start for a second.
            _sync(self, t0, _wall() - _clock())  # type: ignore[name-defined]  # noqa: F821
        started = t0 + _wall_offset(self)  # type: ignore[name-defined]  # noqa: F821
        served = _value_of(self._served) if self._served is not None else None  # type: ignore[name-defined]  # noqa: F821
        caller_id = None
        if served is None:
            request = next_request()
        elif isinstance(served, str):
            request = 0
            caller_id = served
        else:
            request = served
        for sink in self.sinks:
            sink.record(kind, started, duration, size, request, caller_id)


def _prefix_len(raw: bytes) -> int:
    """How many bytes of envelope ``raw`` come before its nonce, read from its length fields; -1 if
    they do not add up (the full route's parse then says why).

    Only the lengths are read, not checked: a plan is found only under a prefix that parsed
    before, and equal prefixes give equal lengths.
    """
    end = len(raw)
    if end < 5:
        return -1
    pos = 5 + raw[4]  # magic, version, suite; classification
    if pos + 2 > end:
        return -1
    count = raw[pos] << 8 | raw[pos + 1]
    pos += 2
    for _i in range(2 * count):  # a key and a value per pair, each u16 length + bytes
        if pos + 2 > end:
            return -1
        pos += 2 + (raw[pos] << 8 | raw[pos + 1])
    if pos >= end:
        return -1
    keys = raw[pos]
    pos += 1
    for _i in range(keys):  # u8 provider, u16 key reference, u16 wrapped key
        if pos >= end:
            return -1
        pos += 1 + raw[pos]
        if pos + 2 > end:
            return -1
        pos += 2 + (raw[pos] << 8 | raw[pos + 1])
        if pos + 2 > end:
            return -1
        pos += 2 + (raw[pos] << 8 | raw[pos + 1])
    pos += _COMMITMENT_SIZE
    if pos + _NONCE_SIZE + _TAG_SIZE > end:
        return -1
    return pos
