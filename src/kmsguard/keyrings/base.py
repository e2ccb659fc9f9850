"""The Keyring protocol: where data keys come from and go back to.

A keyring sees data keys, never application data. Every backend (local key file, AWS
KMS, several regions, a cache in front of any of them) implements the same four calls,
so they compose: ``CachingKeyring(MultiRegionKeyring([AwsKmsKeyring(...), ...]))``.

``KeyRequest`` carries what the policy decided for one operation: the classification,
the key to use for it, and the context that the key service must bind (the
classification itself is always bound; which caller context keys go along is the
policy's choice). Keyrings must bind that context to every wrap and check it on every
unwrap, as KMS does with EncryptionContext.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kmsguard.datakey import DataKey, WrappedKey
from kmsguard.fastpath import Budget

#: The encryption-context key under which the classification is bound.
CLASSIFICATION_CONTEXT_KEY = "kmsguard:classification"


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """One operation's key choice: classification, key id, and the context to bind."""

    classification: str
    key_id: str
    context: Mapping[str, str] = field(default_factory=dict)
    #: A hashable identity: two requests with equal partitions may share a data key.
    partition: tuple[str, str, tuple[tuple[str, str], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once, as the request is made: caches look it up per message.
        partition = (self.classification, self.key_id, tuple(sorted(self.context.items())))
        object.__setattr__(self, "partition", partition)

    def bound_context(self) -> dict[str, str]:
        """The context a key service binds: the caller's chosen pairs plus the classification."""
        return {**self.context, CLASSIFICATION_CONTEXT_KEY: self.classification}


@runtime_checkable
class Keyring(Protocol):
    """Generate, wrap, unwrap and rewrap data keys.

    Errors are kmsguard errors only (KEY_DISABLED, KEY_NOT_FOUND, ...); an entry that
    does not open under any key this keyring holds raises ``InvalidCiphertext``.
    """

    def generate(self, request: KeyRequest) -> DataKey:
        """A fresh 32-byte data key, wrapped under ``request.key_id``."""
        ...

    def wrap(self, data_key: DataKey, request: KeyRequest) -> DataKey:
        """The data key with one more wrapped copy under ``request.key_id``."""
        ...

    def unwrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> DataKey:
        """Open the first entry this keyring can; the result carries all ``wrapped``."""
        ...

    def rewrap(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> tuple[WrappedKey, ...]:
        """New wrapped copies of the same data key under ``request.key_id``'s current key.

        AWS KMS does this with ReEncrypt, so the data key never leaves the service.
        """
        ...


#: A data key and, when a cache lends it, the Budget that counts its reuse (else None).
Loan = tuple[DataKey, Budget | None]


@runtime_checkable
class KeyLender(Keyring, Protocol):
    """A keyring that lends cached data keys (``CachingKeyring``).

    Besides the data key, a loan carries the key's :class:`~kmsguard.fastpath.Budget`
    (None when the key is not cached: reuse off, a message too big to share a key,
    a classification without cache limits). Guard's plan keeps that Budget and claims
    later uses from it directly (kmsguard.plans); the lender's limits hold on both
    paths because the Budget enforces them.
    """

    #: The keyring the cache sits in front of (key management reaches it through here).
    inner: Keyring

    def lend(self, request: KeyRequest, size: int) -> Loan:
        """A data key to seal one message of ``size`` bytes (counted against ``max_bytes``)."""
        ...

    def lend_unwrapped(self, wrapped: Sequence[WrappedKey], request: KeyRequest) -> Loan:
        """The data key of ``wrapped``, as :meth:`Keyring.unwrap`."""
        ...

    def clear(self) -> None:
        """Retire every cached key."""
        ...


def backend_of(keyring: Keyring) -> Keyring:
    """The keyring behind any caches in front of it (where key management happens)."""
    while isinstance(keyring, KeyLender):
        keyring = keyring.inner
    return keyring
