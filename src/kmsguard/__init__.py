"""kmsguard: envelope encryption for general, personal and payment data.

Hold one :class:`Guard`; it encrypts under AWS KMS or the embedded local keyring::

    from kmsguard import Guard
    guard = Guard.from_env()
    token = guard.encrypt_text("4111 1111 1111 1111", "payment", {"purpose": "refund"})
    guard.decrypt_text(token, {"purpose": "refund"})
"""

from typing import TYPE_CHECKING

from kmsguard import pure

if pure.requested():  # before anything imports the compiled modules (see kmsguard.pure)
    pure.install()

from kmsguard.errors import (
    AccessDenied,
    AllRegionsFailed,
    ApiKeysUnavailable,
    AuditUnavailable,
    ConfigurationError,
    ContextMismatch,
    ContextRequired,
    CredentialsError,
    DataKeyExhausted,
    InvalidCiphertext,
    InvalidInput,
    InvalidKeyUsage,
    KeyDisabled,
    KeyNotFound,
    KeyringError,
    KeyUnavailable,
    KmsGuardError,
    KmsServiceError,
    KmsTimeout,
    RateLimited,
    RequestTooLarge,
    Unauthenticated,
    UnknownClassification,
)

if TYPE_CHECKING:
    from kmsguard.guard import EnvelopeInfo, Guard

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AllRegionsFailed",
    "ApiKeysUnavailable",
    "AuditUnavailable",
    "ConfigurationError",
    "ContextMismatch",
    "ContextRequired",
    "CredentialsError",
    "DataKeyExhausted",
    "EnvelopeInfo",
    "Guard",
    "InvalidCiphertext",
    "InvalidInput",
    "InvalidKeyUsage",
    "KeyDisabled",
    "KeyNotFound",
    "KeyUnavailable",
    "KeyringError",
    "KmsGuardError",
    "KmsServiceError",
    "KmsTimeout",
    "RateLimited",
    "RequestTooLarge",
    "Unauthenticated",
    "UnknownClassification",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``Guard`` and ``EnvelopeInfo``, imported on first use: a process that needs no Guard (the
    audit deliverer, ``kmsguard audit verify``) does not load the encryption stack."""
    if name in ("Guard", "EnvelopeInfo"):
        from kmsguard import guard

        return getattr(guard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
