"""Every error kmsguard raises, each with a stable code, an HTTP status and a retryable flag.

Callers (the CLI, a user's own retry loop) branch on ``code`` and ``retryable``, never on
message text, so messages are free to be helpful. ``http_status`` is the status an HTTP
front end answers the error with (4xx: the caller's input; 5xx: configuration or the key
service), so that every front end maps an error the same way. They are
never allowed to carry plaintext, a data key, a ciphertext body or a secret: every
message is written here or built from names (settings, classifications, key
references), never from data.
"""

from __future__ import annotations


class KmsGuardError(Exception):
    """Base of every kmsguard error."""

    code: str = "KMSGUARD_ERROR"
    http_status: int = 500
    retryable: bool = False
    default_message: str = "kmsguard error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.default_message

    def to_dict(self) -> dict[str, object]:
        """The error as JSON: the CLI's --jsonl output, and the body an HTTP front end sends with ``http_status``."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class InvalidCiphertext(KmsGuardError):
    """Any malformed, truncated, tampered or wrong-key input.

    Deliberately one error with one fixed message: telling a caller *which* check
    failed (length, tag, commitment, key) would hand an attacker an oracle.
    """

    code = "INVALID_CIPHERTEXT"
    http_status = 400
    default_message = "invalid ciphertext"

    def __init__(self, message: str | None = None) -> None:
        # The message is fixed on purpose; an argument is accepted and ignored so
        # that no caller can smuggle detail into it.
        super().__init__(self.default_message)


class ContextMismatch(KmsGuardError):
    """A context pair passed to decrypt does not match the envelope's header."""

    code = "CONTEXT_MISMATCH"
    http_status = 400
    default_message = "encryption context does not match"


class ContextRequired(KmsGuardError):
    """The classification's policy requires a context key the caller did not give."""

    code = "CONTEXT_REQUIRED"
    http_status = 400
    default_message = "a required encryption context key is missing"


class InvalidInput(KmsGuardError):
    """A caller-supplied argument is malformed (bad classification name, context too big...)."""

    code = "INVALID_INPUT"
    http_status = 400
    default_message = "invalid input"


class UnknownClassification(KmsGuardError):
    code = "UNKNOWN_CLASSIFICATION"
    http_status = 400
    default_message = "unknown classification"


class ConfigurationError(KmsGuardError):
    """A bad configuration file or value; the message names the setting."""

    code = "CONFIGURATION_ERROR"
    http_status = 500
    default_message = "invalid configuration"


class KeyringError(KmsGuardError):
    """The local key file is missing, unreadable, unsafe or cannot be opened."""

    code = "KEYRING_ERROR"
    http_status = 500
    default_message = "keyring error"


class DataKeyExhausted(KmsGuardError):
    """A data key reached its lifetime message limit (2^32 for AES-GCM random nonces)."""

    code = "DATA_KEY_EXHAUSTED"
    http_status = 500
    retryable = True
    default_message = "data key reached its message limit"


# --- Errors a key management service (AWS KMS or the local keyring) can cause. ---


class KeyDisabled(KmsGuardError):
    code = "KEY_DISABLED"
    http_status = 503
    default_message = "the key is disabled"


class KeyNotFound(KmsGuardError):
    code = "KEY_NOT_FOUND"
    http_status = 404
    default_message = "the key was not found"


class AccessDenied(KmsGuardError):
    code = "ACCESS_DENIED"
    http_status = 403
    default_message = "access to the key was denied"


class RateLimited(KmsGuardError):
    code = "RATE_LIMITED"
    http_status = 429
    retryable = True
    default_message = "the key management service is throttling requests"


class KeyUnavailable(KmsGuardError):
    code = "KEY_UNAVAILABLE"
    http_status = 503
    retryable = True
    default_message = "the key is temporarily unavailable"


class InvalidKeyUsage(KmsGuardError):
    code = "INVALID_KEY_USAGE"
    http_status = 400
    default_message = "the key cannot be used for this operation"


class KmsServiceError(KmsGuardError):
    code = "KMS_SERVICE_ERROR"
    http_status = 502
    retryable = True
    default_message = "the key management service failed"


class KmsTimeout(KmsGuardError):
    code = "KMS_TIMEOUT"
    http_status = 504
    retryable = True
    default_message = "the key management service did not answer in time"


class CredentialsError(KmsGuardError):
    code = "CREDENTIALS_ERROR"
    http_status = 500
    default_message = "no usable credentials for the key management service"


class AllRegionsFailed(KmsGuardError):
    code = "ALL_REGIONS_FAILED"
    http_status = 503
    retryable = True
    default_message = "every configured region failed"


class AuditUnavailable(KmsGuardError):
    """Strict audit could not make the record durable, so the operation was refused."""

    code = "AUDIT_UNAVAILABLE"
    http_status = 503
    retryable = True
    default_message = "the audit record could not be made durable"


# --- Errors of the HTTP service (kmsguard.server) that its clients raise as well. ---


class Unauthenticated(KmsGuardError):
    """No API key, or one the service does not know (never found, or revoked)."""

    code = "UNAUTHENTICATED"
    http_status = 401
    default_message = "a valid API key is required (Authorization: Bearer <token>)"


class ApiKeysUnavailable(KmsGuardError):
    """The service could not check its API key store for longer than its revocation promise
    allows, so it refuses every key rather than honour one that may have been revoked."""

    code = "API_KEYS_UNAVAILABLE"
    http_status = 503
    retryable = True
    default_message = "the API key store cannot be reached, so no key can be checked"


class RequestTooLarge(KmsGuardError):
    """A request body over ``max_request_bytes``, or a batch over ``max_batch_items``."""

    code = "REQUEST_TOO_LARGE"
    http_status = 413
    default_message = "the request is too large"


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
]
