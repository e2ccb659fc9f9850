"""What Guard works out once and reuses: per (classification, context) and per envelope header.

With a data-key cache, the per-message cost of an operation is AES-GCM plus whatever
Python does around it, and for a 1 KiB message AES-GCM takes about a microsecond. So
Guard does not re-validate the context, re-apply the policy, re-encode the header or
re-parse the same header for every message; it memoizes those results here:

* an :class:`EncryptPlan` per (classification, context items): the policy, the key
  request (whose cache partition is computed once) and the encoded header;
* a :class:`DecryptPlan` per envelope prefix (header, wrapped keys and commitment, which
  all envelopes sealed under one data key with one context share): the parsed header,
  the policy and key request for it, and the associated-data prefix.

Plans hold no key material and no data: headers are public. Only successful work is
memoized, so every error is raised afresh. Both memos are bounded; when one fills up it
starts over, which costs a re-parse, never a wrong answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kmsguard import envelope
from kmsguard.datakey import WrappedKey
from kmsguard.errors import InvalidCiphertext, InvalidInput, UnknownClassification
from kmsguard.keyrings.base import KeyRequest
from kmsguard.policy import FIELD_CONTEXT_KEY, ClassPolicy, Policy

#: Plans each memo keeps before starting over.
MAX_PLANS = 4096
#: Distinct envelope prefix lengths the decrypt memo probes (one per header shape in use).
MAX_PREFIX_LENGTHS = 8
_MIN_TAIL = envelope.NONCE_SIZE + envelope.TAG_SIZE
#: Context keys under this prefix are kmsguard's own (see KeyRequest.bound_context).
RESERVED_CONTEXT_PREFIX = "kmsguard:"


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

    Keys under ``kmsguard:`` are reserved (the classification is bound under one), and
    text that is not encodable as UTF-8 (lone surrogates) is refused here rather than
    deep inside a keyring. Returns the context, or a copy in plain ``str`` if any key or
    value is an instance of a subclass.
    """
    if context is None:
        return {}
    if type(context) is not dict and not isinstance(context, Mapping):  # the ABC check costs ~0.1 us
        raise InvalidInput("context must be a mapping of str to str")
    exact = True
    for key, value in context.items():
        if type(key) is not str or type(value) is not str:
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidInput("context keys and values must be strings")
            exact = False
        if key.startswith(RESERVED_CONTEXT_PREFIX) and key is not FIELD_KEY:
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


@dataclass(frozen=True, slots=True)
class EncryptPlan:
    policy: ClassPolicy
    context: Mapping[str, str]
    request: KeyRequest
    header: bytes


@dataclass(frozen=True, slots=True)
class DecryptPlan:
    policy: ClassPolicy
    context: Mapping[str, str]
    wrapped: tuple[WrappedKey, ...]
    request: KeyRequest
    commitment: bytes
    #: Associated data up to the nonce: the header without the wrapped keys, plus the commitment.
    aad_prefix: bytes
    #: Bytes before the nonce (header, wrapped keys, commitment).
    prefix_len: int
    #: Where the body starts (after the nonce).
    body_start: int


class EncryptPlans:
    """Encrypt plans by (classification, context items)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._plans: dict[object, EncryptPlan] = {}

    def get(self, classification: str, context: Mapping[str, str] | None) -> EncryptPlan:
        try:
            key: tuple[Any, ...] | None = (classification, tuple(context.items()) if context else ())
            plan = self._plans.get(key)
        except (AttributeError, TypeError):  # not a mapping, or unhashable values: check_context says which
            key, plan = None, None
        if plan is None:
            plan = self._build(classification, check_context(context))
            if key is not None:
                if len(self._plans) >= MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _build(self, classification: str, context: Mapping[str, str]) -> EncryptPlan:
        cls = self._policy.get(classification)
        snapshot = dict(context)
        return EncryptPlan(
            policy=cls,
            context=snapshot,
            request=self._policy.request(cls, snapshot),
            header=envelope.encode_header(cls.name, snapshot),
        )


class DecryptPlans:
    """Decrypt plans by envelope prefix.

    A lookup slices the envelope at each prefix length seen so far (usually one or two)
    and probes a dict; a hit means the envelope's first ``prefix_len`` bytes equal those
    of an envelope already parsed, so parsing it again would give the same result.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._plans: dict[bytes, DecryptPlan] = {}
        self._lengths: list[int] = []

    def get(self, raw: bytes) -> DecryptPlan:
        size = len(raw)
        for n in self._lengths:
            plan = self._plans.get(raw[:n])
            if plan is not None and size - n >= _MIN_TAIL:
                return plan
        return self._build(raw)

    def _build(self, raw: bytes) -> DecryptPlan:
        env = envelope.parse(raw)
        try:
            cls = self._policy.get(env.classification)
        except UnknownClassification:  # naming no configured class is as bad as tampering
            raise InvalidCiphertext() from None
        prefix_len = env.body_offset - envelope.NONCE_SIZE
        plan = DecryptPlan(
            policy=cls,
            context=env.context,
            wrapped=env.wrapped_keys,
            request=self._policy.request(cls, env.context),
            commitment=env.commitment,
            aad_prefix=env.aad[: -envelope.NONCE_SIZE],
            prefix_len=prefix_len,
            body_start=env.body_offset,
        )
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        if prefix_len not in self._lengths:
            if len(self._lengths) >= MAX_PREFIX_LENGTHS:
                return plan
            self._lengths.append(prefix_len)
        self._plans[raw[:prefix_len]] = plan
        return plan
