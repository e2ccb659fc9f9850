"""Classifications and their rules: which key, which context is required, cache limits.

A classification is the user's word for a kind of data (``general``, ``pii``,
``payment``, or their own). The policy turns it into a :class:`KeyRequest` for the
keyring, and refuses an operation whose context breaks the rules before any key
service is called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from kmsguard.errors import ContextRequired, InvalidInput, UnknownClassification
from kmsguard.keyrings.base import KeyRequest

CLASSIFICATION_RE = re.compile(r"[a-z0-9_-]{1,32}")
DEFAULT_CLASSIFICATIONS = ("general", "pii", "payment")
#: The context key under which field-level protection binds a value's JSON path (see
#: kmsguard.fields). It is in the header, so a token moved to another path is refused,
#: and never sent to the key service, so a record's fields of one classification share a
#: data key.
FIELD_CONTEXT_KEY = "kmsguard:field"
#: The context key that marks an operation as a self-test's (``kmsguard selftest``, ``kmsguard
#: smoke``): the one ``kmsguard:`` key a caller may pass, so that audit records, metrics
#: dashboards and CloudTrail can leave test traffic out. It only marks; it grants nothing.
SELFTEST_CONTEXT_KEY = "kmsguard:selftest"


@dataclass(frozen=True)
class CacheLimits:
    """How long and how much one data key may be reused (see the caching keyring).

    Reuse trades KMS calls for exposure: a leaked data key opens every message sealed
    under it, so stricter classes reuse less. ``decrypt_ttl`` bounds how long an
    unwrapped key stays in memory for decrypts.
    """

    reuse: bool = True
    max_age: float = 300.0
    max_messages: int = 10_000
    max_bytes: int = 1 << 30
    decrypt_ttl: float = 300.0

    def __post_init__(self) -> None:
        if self.max_age <= 0 or self.decrypt_ttl < 0:
            raise InvalidInput("cache max_age must be positive and decrypt_ttl not negative")
        if not 1 <= self.max_messages <= 2**32:
            raise InvalidInput("cache max_messages must be between 1 and 2^32")
        if self.max_bytes < 1:
            raise InvalidInput("cache max_bytes must be positive")


DEFAULT_CACHE_LIMITS: Mapping[str, CacheLimits] = {
    "general": CacheLimits(max_age=300.0, max_messages=10_000, max_bytes=1 << 30),
    "pii": CacheLimits(max_age=120.0, max_messages=1_000, max_bytes=256 << 20, decrypt_ttl=120.0),
    "payment": CacheLimits(max_age=60.0, max_messages=100, max_bytes=64 << 20, decrypt_ttl=60.0),
}


@dataclass(frozen=True)
class ClassPolicy:
    """The rules of one classification.

    ``kms_context_keys`` names the context keys sent to the key service (and so shown in
    CloudTrail and bound to the wrapped key); ``None`` sends them all. The set must not
    change while ciphertexts made under it exist, since decrypt must bind the same pairs.
    """

    name: str
    key: str
    required_context: frozenset[str] = frozenset()
    kms_context_keys: frozenset[str] | None = None
    cache: CacheLimits = field(default_factory=CacheLimits)
    strict_audit: bool = False
    regions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not CLASSIFICATION_RE.fullmatch(self.name):
            raise InvalidInput("classification must be 1-32 characters of [a-z0-9_-]")
        if not self.key:
            raise InvalidInput(f"classification {self.name!r} has no key")


def default_class(name: str, key: str) -> ClassPolicy:
    """The rules a classification has where the configuration says nothing else.

    The one definition of the default policy: ``payment`` requires a ``purpose`` in the
    context and strict audit; each default classification has its own cache limits
    (:data:`DEFAULT_CACHE_LIMITS`), a user's own classification the general ones.
    """
    return ClassPolicy(
        name=name,
        key=key,
        required_context=frozenset({"purpose"}) if name == "payment" else frozenset(),
        cache=DEFAULT_CACHE_LIMITS.get(name, CacheLimits()),
        strict_audit=name == "payment",
    )


class Policy:
    """All classifications, looked up by name. Immutable once built."""

    def __init__(self, classes: Iterable[ClassPolicy]) -> None:
        self._classes = {c.name: c for c in classes}

    @classmethod
    def defaults(cls, key_for: Mapping[str, str]) -> Policy:
        """``general``, ``pii`` and ``payment`` with the default rules; ``key_for`` names keys."""
        return cls(default_class(name, key_for[name]) for name in DEFAULT_CLASSIFICATIONS)

    def names(self) -> list[str]:
        return list(self._classes)

    def __iter__(self) -> Iterator[ClassPolicy]:
        return iter(self._classes.values())

    def get(self, name: str) -> ClassPolicy:
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise UnknownClassification(
                f"unknown classification {name!r}; known: {', '.join(self._classes)}"
                if isinstance(name, str) and CLASSIFICATION_RE.fullmatch(name)
                else "unknown classification"
            ) from None

    def with_class(self, policy: ClassPolicy) -> Policy:
        return Policy([*(c for c in self._classes.values() if c.name != policy.name), policy])

    def with_key(self, name: str, key: str) -> Policy:
        return self.with_class(replace(self.get(name), key=key))

    def request(self, cls: ClassPolicy, context: Mapping[str, str]) -> KeyRequest:
        """Check the required context and build the key service request for it."""
        missing = cls.required_context.difference(context)
        if missing:
            raise ContextRequired(f"classification {cls.name!r} requires context keys: {', '.join(sorted(missing))}")
        if cls.kms_context_keys is None:
            bound = {k: v for k, v in context.items() if k != FIELD_CONTEXT_KEY}
        else:
            bound = {k: v for k, v in context.items() if k in cls.kms_context_keys and k != FIELD_CONTEXT_KEY}
        return KeyRequest(cls.name, cls.key, bound)
