"""Data keys: what a keyring hands to the envelope, and what the envelope derives from them.

This module sits below both ``envelope`` and ``keyrings`` so that neither has to import
the other: keyrings produce :class:`DataKey` objects, the envelope consumes them, and
only ``guard`` combines the two.

Suite 1 derives two values from the 32-byte data key (DEK)::

    enc_key    = HKDF-SHA256(DEK, salt=None, info=b"kmsguard v1 enc",    length=32)
    commitment = HKDF-SHA256(DEK, salt=None, info=b"kmsguard v1 commit", length=32)

They are derived once, when the DataKey is built, so a cached DEK costs nothing per
message beyond AES-GCM itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsguard.errors import DataKeyExhausted, InvalidInput

DEK_SIZE = 32
#: NIST SP 800-38D: with random 96-bit nonces a key must not seal more than 2^32 messages.
MAX_MESSAGES_PER_DEK = 2**32

_INFO_ENC = b"kmsguard v1 enc"
_INFO_COMMIT = b"kmsguard v1 commit"


def _hkdf(dek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(dek)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """One wrapped copy of a data key: who wrapped it, under which key, and the bytes.

    ``key_ref`` is a full key ARN for AWS KMS or ``local:<name>:v<version>`` for the
    local keyring (the region of an AWS key is read from its ARN).
    """

    provider: str
    key_ref: str
    wrapped: bytes

    def __repr__(self) -> str:
        return f"WrappedKey(provider={self.provider!r}, key_ref={self.key_ref!r}, wrapped=<{len(self.wrapped)} bytes>)"


class DataKey:
    """A plaintext data key, its wrapped copies, and the suite-1 keys derived from it.

    The plaintext never appears in ``repr`` or ``str``. ``use()`` counts the messages
    sealed through :class:`kmsguard.envelope.Sealer` and refuses past 2^32. A key the
    data-key cache lends is also used through its Budget (kmsguard.fastpath), which
    counts those uses against the classification's ``max_messages``, itself at most
    2^32 (CacheLimits refuses more); either way no DEK seals more than 2^32 messages.
    """

    __slots__ = ("_lock", "_plaintext", "_used", "aead", "commitment", "wrapped")

    def __init__(self, plaintext: bytes, wrapped: tuple[WrappedKey, ...]) -> None:
        if len(plaintext) != DEK_SIZE:
            raise InvalidInput("a data key must be 32 bytes")
        self._plaintext = bytes(plaintext)
        self.wrapped = tuple(wrapped)
        self.aead = AESGCM(_hkdf(plaintext, _INFO_ENC))
        self.commitment = _hkdf(plaintext, _INFO_COMMIT)
        self._lock = threading.Lock()  # the count is shared by every thread sealing under this key
        self._used = 0

    @property
    def plaintext(self) -> bytes:
        """The raw DEK, for keyrings that must wrap it. Never log it."""
        return self._plaintext

    def with_wrapped(self, wrapped: tuple[WrappedKey, ...]) -> DataKey:
        """The same key with another set of wrapped copies (after wrap/rewrap)."""
        return DataKey(self._plaintext, wrapped)

    def use(self) -> int:
        """Count one message sealed by a Sealer under this key; refuse past the AES-GCM limit."""
        with self._lock:
            self._used += 1
            n = self._used
        if n > MAX_MESSAGES_PER_DEK:
            raise DataKeyExhausted()
        return n

    def __repr__(self) -> str:
        refs = ", ".join(w.key_ref for w in self.wrapped)
        return f"DataKey(<redacted>, wrapped=[{refs}])"

    __str__ = __repr__
