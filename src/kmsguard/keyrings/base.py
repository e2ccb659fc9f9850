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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kmsguard.datakey import DataKey, WrappedKey

#: The encryption-context key under which the classification is bound.
CLASSIFICATION_CONTEXT_KEY = "kmsguard:classification"


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """One operation's key choice: classification, key id, and the context to bind."""

    classification: str
    key_id: str
    context: Mapping[str, str] = field(default_factory=dict)
    _partition: tuple[str, str, tuple[tuple[str, str], ...]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    #: Scratch space for a cache in front of the keyring: the entry that last served this
    #: request (see CachingKeyring); never key material itself, never compared or shown.
    _memo: object = field(default=None, init=False, repr=False, compare=False)

    def bound_context(self) -> dict[str, str]:
        """The context a key service binds: the caller's chosen pairs plus the classification."""
        return {**self.context, CLASSIFICATION_CONTEXT_KEY: self.classification}

    def cache_partition(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """A hashable identity: two requests with equal partitions may share a data key.

        Computed once per request: Guard reuses requests, and caches look this up per message.
        """
        partition = self._partition
        if partition is None:
            partition = (self.classification, self.key_id, tuple(sorted(self.context.items())))
            object.__setattr__(self, "_partition", partition)
        return partition


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


def sized_generate(keyring: Keyring) -> Callable[[KeyRequest, int], DataKey]:
    """How Guard asks ``keyring`` for a data key to seal one message of a known size.

    A keyring that budgets bytes per data key (the cache's ``max_bytes``) has
    ``generate_for(request, size)``; for any other the size does not matter.
    """
    generate_for: Callable[[KeyRequest, int], DataKey] | None = getattr(keyring, "generate_for", None)
    if generate_for is not None:
        return generate_for
    return lambda request, _size: keyring.generate(request)
