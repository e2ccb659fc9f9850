"""Every KMS and transport failure turned into one kmsguard error.

The two tables below are the single source of truth; the table in docs/aws.md is
``error_table()`` and a test keeps the two equal, so they cannot drift. Messages are built from names
only — the API, the region, the key reference, the AWS error code and request id —
never from the service's free-text message, which kmsguard does not control.
"""

from __future__ import annotations

from botocore import exceptions as bx

from kmsguard.errors import (
    AccessDenied,
    CredentialsError,
    InvalidCiphertext,
    InvalidInput,
    InvalidKeyUsage,
    KeyDisabled,
    KeyNotFound,
    KeyUnavailable,
    KmsGuardError,
    KmsServiceError,
    KmsTimeout,
    RateLimited,
)


class DeadlineExceeded(Exception):
    """kmsguard's own per-operation deadline passed before (another) attempt could start."""


#: KMS error code -> (kmsguard error, why). Unknown codes map to KmsServiceError.
KMS_ERROR_CODES: dict[str, tuple[type[KmsGuardError], str]] = {
    "DisabledException": (KeyDisabled, "the key is disabled"),
    "KMSInvalidStateException": (KeyDisabled, "the key is not in a usable state (pending deletion or import)"),
    "KeyUnavailableException": (KeyUnavailable, "the key is temporarily unavailable"),
    "NotFoundException": (KeyNotFound, "the key or alias does not exist in this region"),
    "InvalidKeyUsageException": (InvalidKeyUsage, "the key's usage or spec does not allow this operation"),
    "IncorrectKeyException": (InvalidCiphertext, "the ciphertext was not made under this key"),
    "InvalidCiphertextException": (InvalidCiphertext, "the ciphertext or its encryption context is wrong"),
    "LimitExceededException": (RateLimited, "a KMS quota was exceeded"),
    "ThrottlingException": (RateLimited, "KMS throttled the request"),
    "AccessDeniedException": (AccessDenied, "the principal may not use this key"),
    "DependencyTimeoutException": (KmsTimeout, "KMS timed out inside the service"),
    "KMSInternalException": (KmsServiceError, "KMS failed internally"),
    "ServiceUnavailableException": (KmsServiceError, "KMS is unavailable"),
    "ValidationException": (InvalidInput, "KMS rejected the request as malformed"),
    "AlreadyExistsException": (InvalidInput, "an alias or key of that name already exists"),
    "InvalidArnException": (InvalidInput, "the key ARN is malformed"),
    "InvalidGrantTokenException": (InvalidInput, "a grant token is invalid"),
    "UnsupportedOperationException": (InvalidKeyUsage, "the key does not support this operation"),
    "UnrecognizedClientException": (CredentialsError, "KMS does not recognise the access key"),
    "InvalidSignatureException": (CredentialsError, "the request signature is invalid (wrong secret key?)"),
    "ExpiredTokenException": (CredentialsError, "the session credentials have expired"),
    "InvalidClientTokenId": (CredentialsError, "the access key does not exist"),
}

#: botocore exception class -> (kmsguard error, why); checked in order, so subclasses first.
TRANSPORT_ERRORS: tuple[tuple[type[Exception], type[KmsGuardError], str], ...] = (
    (DeadlineExceeded, KmsTimeout, "the operation deadline passed"),
    (bx.ConnectTimeoutError, KmsTimeout, "connecting to the endpoint timed out"),
    (bx.ReadTimeoutError, KmsTimeout, "the endpoint did not answer within the read timeout"),
    (bx.EndpointConnectionError, KmsServiceError, "could not connect to the endpoint"),
    (bx.ConnectionClosedError, KmsServiceError, "the endpoint closed the connection"),
    (bx.NoCredentialsError, CredentialsError, "no credentials found in the AWS credential chain"),
    (bx.PartialCredentialsError, CredentialsError, "the credentials are incomplete"),
    (bx.CredentialRetrievalError, CredentialsError, "the credential provider failed"),
    (bx.ProfileNotFound, CredentialsError, "the AWS profile does not exist"),
    (bx.SSOError, CredentialsError, "the SSO session is missing or expired; run 'aws sso login'"),
    (bx.ParamValidationError, InvalidInput, "the request parameters are invalid"),
)


def map_error(exc: BaseException, api: str, region: str, key_ref: str | None = None) -> KmsGuardError:
    """The kmsguard error for a botocore exception raised by KMS ``api`` in ``region``."""
    where = f"KMS {api} in {region}" + (f" for {key_ref}" if key_ref else "")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        request_id = exc.response.get("ResponseMetadata", {}).get("RequestId")
        cls, why = KMS_ERROR_CODES.get(code, (KmsServiceError, "KMS answered with an unexpected error"))
        if cls is InvalidCiphertext:
            return InvalidCiphertext()
        rid = f", request id {request_id}" if request_id else ""
        return cls(f"{where}: {why} ({code}{rid})")
    for exc_cls, cls, why in TRANSPORT_ERRORS:
        if isinstance(exc, exc_cls):
            if cls is InvalidInput and isinstance(exc, bx.ParamValidationError):
                return cls(f"{where}: {why}")
            return cls(f"{where}: {why} ({type(exc).__name__})")
    return KmsServiceError(f"{where}: unexpected failure ({type(exc).__name__})")


def error_table() -> str:
    """The mapping as a Markdown table (docs/aws.md embeds it; a test keeps the two equal)."""
    rows = ["| AWS error | kmsguard code | HTTP | retryable | meaning |", "| --- | --- | --- | --- | --- |"]
    entries = [(code, cls, why) for code, (cls, why) in KMS_ERROR_CODES.items()]
    entries += [(exc.__name__, cls, why) for exc, cls, why in TRANSPORT_ERRORS]
    entries.append(("any other error", KmsServiceError, "unexpected failure"))
    for name, cls, why in entries:
        retry = "yes" if cls.retryable else "no"
        rows.append(f"| `{name}` | `{cls.code}` | {cls.http_status} | {retry} | {why} |")
    return "\n".join(rows) + "\n"


def outcome_of(exc: BaseException | None) -> str:
    """A bounded label for metrics: ``ok`` or a kmsguard error code."""
    if exc is None:
        return "ok"
    return map_error(exc, "-", "-").code
