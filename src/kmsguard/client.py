"""Python clients of the HTTP service: the methods and errors of Guard, over HTTP.

``RemoteGuard(url, token)`` has Guard's methods (``encrypt``, ``decrypt``,
``encrypt_text``, ``decrypt_text``, ``encrypt_many``, ``decrypt_many``, ``rewrap``,
``inspect``, ``protect``, ``unprotect``, ``mask``) and raises Guard's exceptions: the
service's ``{"error": {"code"...}}`` is raised as the kmsguard error of that code
(InvalidCiphertext, ContextMismatch, AccessDenied...), so code written against Guard
runs against the service unchanged.
``mask`` runs in the client's own process: it needs no key, so the record need not travel.
``AsyncRemoteGuard`` is the same for asyncio. Both hold an httpx connection pool; close
them (or use them as context managers) when done.

Retries: 429, 502 and 503 answers and connection failures are retried with full-jitter
backoff (kmsguard.backoff), waiting at least what ``Retry-After`` says (seconds or an
HTTP date, both of which RFC 9110 allows), until ``deadline`` seconds after the call
began. A wait that would end past the deadline is not started: the answer in hand is
raised at once, as the kmsguard error its body names (a service that could not be
reached at all, or whose gateway answered 502, 503 or 504 for it without a kmsguard
error body: :class:`ServiceUnreachable`). Every operation is safe to repeat: an encrypt
retried after a lost answer makes a second, equally valid token.

``transport`` (as httpx's own clients take it) replaces the network: an
``httpx.MockTransport`` in tests, or a transport with its own TLS, proxy or socket
settings.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import json
import random
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, overload

import httpx

from kmsguard import envelope, errors
from kmsguard import fields as _fields
from kmsguard.batch import DEFAULT_CONCURRENCY, Result
from kmsguard.errors import InvalidInput, KmsGuardError
from kmsguard.guard import Context, EnvelopeInfo, EnvelopeInput, text_of, utf8_of

#: Items per batch request (the service's default ``max_batch_items``).
BATCH_SIZE = 1000
_RETRY_STATUSES = frozenset({429, 502, 503})
#: Answers a gateway in front of the service gives when the service did not answer it.
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_BACKOFF_BASE, _BACKOFF_CAP = 0.05, 2.0


class ServiceUnreachable(KmsGuardError):
    """No answer from the service (connection refused, reset, timed out) until the deadline."""

    code = "SERVICE_UNREACHABLE"
    http_status = 503
    retryable = True
    default_message = "the kmsguard service could not be reached"


class RemoteError(KmsGuardError):
    """An error code of the service that no kmsguard exception class has (NOT_FOUND, INTERNAL_ERROR...)."""

    def __init__(self, code: str, message: str, status: int, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = status
        self.retryable = retryable


def _classes() -> dict[str, type[KmsGuardError]]:
    out: dict[str, type[KmsGuardError]] = {ServiceUnreachable.code: ServiceUnreachable}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, KmsGuardError) and cls is not KmsGuardError:
            out[cls.code] = cls
    return out


_BY_CODE = _classes()


def error_of(detail: Any, status: int) -> KmsGuardError:
    """The kmsguard exception for one ``{"code", "message", "retryable"}`` of the service."""
    if not isinstance(detail, Mapping):
        if status in _GATEWAY_STATUSES:
            return ServiceUnreachable(f"the kmsguard service could not be reached (HTTP {status})")
        return RemoteError("INVALID_RESPONSE", f"the service answered {status} without an error body", status, False)
    code, message = str(detail.get("code", "")), str(detail.get("message", ""))
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code or "UNKNOWN", message, status, bool(detail.get("retryable", False)))
    return cls(message or None)


def _again(outcome: httpx.Response | httpx.TransportError, retry: int, until: float) -> float | None:
    """Seconds to wait before attempt ``retry + 1``, or None: the answer stands. ServiceUnreachable
    when the service has not answered at all and the deadline leaves no room for another try."""
    if isinstance(outcome, httpx.TransportError):
        delay = _wait(retry, 0.0, until)
        if delay is None:
            raise _unreachable(outcome) from None
        return delay
    if outcome.status_code in _RETRY_STATUSES:
        return _wait(retry, _retry_after(outcome), until)
    return None


def _raise_for(response: httpx.Response | httpx.TransportError) -> Any:
    """The JSON of a 2xx answer; the matching kmsguard error for anything else."""
    assert isinstance(response, httpx.Response)  # _again raised for a transport error
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.is_success and isinstance(doc, dict):
        return doc
    raise error_of(doc.get("error") if isinstance(doc, dict) else None, response.status_code)


def _retry_after(response: httpx.Response) -> float:
    """Seconds ``Retry-After`` asks to wait: a number of seconds or an HTTP date (RFC 9110
    section 10.2.3); 0 when absent, unreadable or in the past."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is read as such
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return seconds if seconds > 0.0 else 0.0  # NaN too


def _options(url: str, token: str, timeout: float, max_connections: int) -> dict[str, Any]:
    """What both clients give httpx: the base URL, the API key, the timeout and the pool's size."""
    return {
        "base_url": url.rstrip("/"),
        "headers": {"Authorization": f"Bearer {token}", "User-Agent": "kmsguard-client"},
        "timeout": timeout,
        "limits": httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    }


def _wait(retry: int, at_least: float, until: float) -> float | None:
    """Seconds to wait before retry ``retry``, or None when the next attempt would start past ``until``."""
    delay = max(at_least, random.random() * min(_BACKOFF_CAP, _BACKOFF_BASE * 2.0 ** min(retry - 1, 16)))  # noqa: S311
    if time.monotonic() + delay >= until:
        return None
    return delay


def _unreachable(exc: Exception) -> ServiceUnreachable:
    return ServiceUnreachable(f"the kmsguard service could not be reached ({type(exc).__name__})")


# ---------------------------------------------------------------------- the request bodies, shared


def _encrypt_body(plaintext: bytes, classification: str, context: Context) -> dict[str, Any]:
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise InvalidInput("plaintext must be bytes")
    body: dict[str, Any] = {"classification": classification, "plaintext_b64": base64.b64encode(plaintext).decode()}
    if context is not None:
        body["context"] = dict(context)
    return body


def _token_body(data: EnvelopeInput, context: Context) -> dict[str, Any]:
    body: dict[str, Any] = {"token": data if isinstance(data, str) else envelope.to_text(envelope.coerce(data))}
    if context is not None:
        body["context"] = dict(context)
    return body


def _plain(doc: Mapping[str, Any]) -> bytes:
    if doc.get("plaintext") is not None:
        return str(doc["plaintext"]).encode("utf-8")
    return base64.b64decode(str(doc.get("plaintext_b64", "")))


def _results(docs: Sequence[Any], value: Any) -> list[Result[bytes]]:
    out: list[Result[bytes]] = []
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("error") is not None:
            out.append(Result(error=error_of(doc["error"], 200)))
        else:
            out.append(Result(value=value(doc)))
    return out


def _info(doc: Mapping[str, Any]) -> EnvelopeInfo:
    return EnvelopeInfo(
        version=int(doc["version"]),
        suite=int(doc["suite"]),
        classification=str(doc["classification"]),
        context=dict(doc["context"]),
        keys=[dict(k) for k in doc["keys"]],
        size=int(doc["size"]),
        body_size=int(doc["body_size"]),
        segment_size=doc.get("segment_size"),
        segments=doc.get("segments"),
    )


_JSON = {"Content-Type": "application/json"}


def _encoded(body: Mapping[str, Any]) -> bytes:
    """The request's JSON; INVALID_INPUT (as Guard raises) for a record JSON cannot carry."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError):
        raise InvalidInput("the record holds a value that is not JSON") from None


def _protect_body(
    record: Any, fields: Mapping[str, Any] | None, context: Context, missing: str, detect: bool, keep: Sequence[str]
) -> dict[str, Any]:
    body: dict[str, Any] = {"record": record, "missing": missing, "detect": detect, "keep": list(keep)}
    if fields is not None:
        body["fields"] = {path: spec if isinstance(spec, str) else dict(spec) for path, spec in fields.items()}
    if context is not None:
        body["context"] = dict(context)
    return body


def _unprotect_body(record: Any, context: Context, paths: Sequence[str] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"record": record}
    if context is not None:
        body["context"] = dict(context)
    if paths is not None:
        body["paths"] = list(paths)
    return body


def _chunks(n: int) -> list[range]:
    return [range(i, min(i + BATCH_SIZE, n)) for i in range(0, n, BATCH_SIZE)]


def _encrypt_items(
    items: Sequence[bytes], classification: str, context: Context, contexts: Sequence[Context] | None
) -> list[dict[str, Any]]:
    if contexts is not None and len(contexts) != len(items):
        raise InvalidInput("contexts must have one entry per item")
    return [_encrypt_body(x, classification, context if contexts is None else contexts[i]) for i, x in enumerate(items)]


# ---------------------------------------------------------------------- blocking client


class RemoteGuard:
    """Guard's methods against a kmsguard service at ``url`` with API key ``token``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        deadline: float = 30.0,
        max_connections: int = 32,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.deadline = deadline
        self._http = httpx.Client(transport=transport, **_options(url, token, timeout, max_connections))

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        content = _encoded(body)
        until = time.monotonic() + self.deadline
        for retry in itertools.count(1):
            try:
                outcome: httpx.Response | httpx.TransportError = self._http.post(path, content=content, headers=_JSON)
            except httpx.TransportError as exc:
                outcome = exc
            delay = _again(outcome, retry, until)
            if delay is None:
                return _raise_for(outcome)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def encrypt(self, plaintext: bytes, classification: str, context: Context = None) -> bytes:
        return envelope.coerce(self._post("/v1/encrypt", _encrypt_body(plaintext, classification, context))["token"])

    def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        return _plain(self._post("/v1/decrypt", _token_body(data, context)))

    def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        if not isinstance(text, str):
            raise InvalidInput("encrypt_text takes a str")
        return str(self._post("/v1/encrypt", _encrypt_body(utf8_of(text), classification, context))["token"])

    def decrypt_text(self, token: str, context: Context = None) -> str:
        return text_of(self.decrypt(token, context))

    def encrypt_many(
        self,
        items: Sequence[bytes],
        classification: str,
        context: Context = None,
        contexts: Sequence[Context] | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> list[Result[bytes]]:
        """One Result per item, in order (``max_concurrency`` is the service's business, and ignored)."""
        bodies = _encrypt_items(items, classification, context, contexts)
        out: list[Result[bytes]] = []
        for part in _chunks(len(bodies)):
            doc = self._post("/v1/encrypt/batch", {"items": [bodies[i] for i in part]})
            out.extend(_results(doc["results"], lambda d: envelope.coerce(d["token"])))
        return out

    def decrypt_many(
        self, envelopes: Sequence[EnvelopeInput], context: Context = None, max_concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[Result[bytes]]:
        bodies = [_token_body(e, context) for e in envelopes]
        out: list[Result[bytes]] = []
        for part in _chunks(len(bodies)):
            doc = self._post("/v1/decrypt/batch", {"items": [bodies[i] for i in part]})
            out.extend(_results(doc["results"], _plain))
        return out

    @overload
    def rewrap(self, data: str, context: Context = None) -> str: ...
    @overload
    def rewrap(self, data: bytes | bytearray | memoryview, context: Context = None) -> bytes: ...
    def rewrap(self, data: EnvelopeInput, context: Context = None) -> bytes | str:
        token = str(self._post("/v1/rewrap", _token_body(data, context))["token"])
        return token if isinstance(data, str) else envelope.coerce(token)

    def rewrap_text(self, token: str, context: Context = None) -> str:
        return self.rewrap(token, context)

    def inspect(self, data: EnvelopeInput) -> EnvelopeInfo:
        return _info(self._post("/v1/inspect", {"token": _token_body(data, None)["token"]}))

    def protect(
        self,
        record: Any,
        fields: Mapping[str, Any] | None = None,
        context: Context = None,
        *,
        missing: str = "error",
        detect: bool = False,
        keep: Sequence[str] = (),
    ) -> Any:
        return self._post("/v1/protect", _protect_body(record, fields, context, missing, detect, keep))["record"]

    def unprotect(self, record: Any, context: Context = None, *, paths: Sequence[str] | None = None) -> Any:
        return self._post("/v1/unprotect", _unprotect_body(record, context, paths))["record"]

    def mask(self, record: Any, fields: Sequence[str], rules: Mapping[str, Any] | None = None) -> Any:
        """Masked here, not by the service: masking uses no key, and the record need not travel."""
        return _fields.mask(record, fields, rules)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- asyncio client


class AsyncRemoteGuard:
    """:class:`RemoteGuard` for asyncio: the same methods as coroutines, the same errors."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        deadline: float = 30.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.deadline = deadline
        self._http = httpx.AsyncClient(transport=transport, **_options(url, token, timeout, max_connections))

    async def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        content = _encoded(body)
        until = time.monotonic() + self.deadline
        for retry in itertools.count(1):
            try:
                outcome: httpx.Response | httpx.TransportError = await self._http.post(
                    path, content=content, headers=_JSON
                )
            except httpx.TransportError as exc:
                outcome = exc
            delay = _again(outcome, retry, until)
            if delay is None:
                return _raise_for(outcome)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def encrypt(self, plaintext: bytes, classification: str, context: Context = None) -> bytes:
        doc = await self._post("/v1/encrypt", _encrypt_body(plaintext, classification, context))
        return envelope.coerce(doc["token"])

    async def decrypt(self, data: EnvelopeInput, context: Context = None) -> bytes:
        return _plain(await self._post("/v1/decrypt", _token_body(data, context)))

    async def encrypt_text(self, text: str, classification: str, context: Context = None) -> str:
        if not isinstance(text, str):
            raise InvalidInput("encrypt_text takes a str")
        doc = await self._post("/v1/encrypt", _encrypt_body(utf8_of(text), classification, context))
        return str(doc["token"])

    async def decrypt_text(self, token: str, context: Context = None) -> str:
        return text_of(await self.decrypt(token, context))

    async def encrypt_many(
        self,
        items: Sequence[bytes],
        classification: str,
        context: Context = None,
        contexts: Sequence[Context] | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> list[Result[bytes]]:
        bodies = _encrypt_items(items, classification, context, contexts)
        out: list[Result[bytes]] = []
        for part in _chunks(len(bodies)):
            doc = await self._post("/v1/encrypt/batch", {"items": [bodies[i] for i in part]})
            out.extend(_results(doc["results"], lambda d: envelope.coerce(d["token"])))
        return out

    async def decrypt_many(
        self, envelopes: Sequence[EnvelopeInput], context: Context = None, max_concurrency: int = DEFAULT_CONCURRENCY
    ) -> list[Result[bytes]]:
        bodies = [_token_body(e, context) for e in envelopes]
        out: list[Result[bytes]] = []
        for part in _chunks(len(bodies)):
            doc = await self._post("/v1/decrypt/batch", {"items": [bodies[i] for i in part]})
            out.extend(_results(doc["results"], _plain))
        return out

    async def rewrap(self, data: EnvelopeInput, context: Context = None) -> bytes | str:
        token = str((await self._post("/v1/rewrap", _token_body(data, context)))["token"])
        return token if isinstance(data, str) else envelope.coerce(token)

    async def inspect(self, data: EnvelopeInput) -> EnvelopeInfo:
        return _info(await self._post("/v1/inspect", {"token": _token_body(data, None)["token"]}))

    async def protect(
        self,
        record: Any,
        fields: Mapping[str, Any] | None = None,
        context: Context = None,
        *,
        missing: str = "error",
        detect: bool = False,
        keep: Sequence[str] = (),
    ) -> Any:
        doc = await self._post("/v1/protect", _protect_body(record, fields, context, missing, detect, keep))
        return doc["record"]

    async def unprotect(self, record: Any, context: Context = None, *, paths: Sequence[str] | None = None) -> Any:
        return (await self._post("/v1/unprotect", _unprotect_body(record, context, paths)))["record"]

    async def mask(self, record: Any, fields: Sequence[str], rules: Mapping[str, Any] | None = None) -> Any:
        """Masked here, as RemoteGuard.mask."""
        return _fields.mask(record, fields, rules)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRemoteGuard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
