"""API v1: encrypt, decrypt, their batches, rewrap and inspect; and the echo baseline.

Each endpoint checks the caller's scope for the operation first, then (for an envelope)
for the envelope's classification, then runs the operation on the worker's AsyncGuard
as the API key's name (``operation.acting_as``), so the audit record names the key.
Batches answer JSON built here: their results are already in the documented shape, and
passing a thousand of them through the response model again (or the standard library's
json, as JSONResponse does) costs more than encrypting them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic_core import to_json

from kmsguard import envelope
from kmsguard.errors import InvalidInput, KmsGuardError, RequestTooLarge
from kmsguard.server.auth import Authorized, service_of
from kmsguard.server.models import (
    BatchResponse,
    DecryptBatchRequest,
    EncryptBatchRequest,
    EncryptRequest,
    InspectRequest,
    InspectResponse,
    PlaintextResponse,
    TokenRequest,
    TokenResponse,
    error_responses,
    json_body,
    parse,
)

router = APIRouter(prefix="/v1", responses=error_responses(400, 401, 403, 404, 413, 429, 500, 502, 503, 504))


def _plaintext(body: EncryptRequest) -> bytes:
    """The bytes to seal."""
    if (body.plaintext is None) == (body.plaintext_b64 is None):
        raise InvalidInput("plaintext: give exactly one of plaintext and plaintext_b64")
    if body.plaintext is not None:
        return body.plaintext.encode("utf-8")
    try:
        return base64.b64decode(body.plaintext_b64 or "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("plaintext_b64: not valid base64") from None


def _opened(plain: bytes) -> dict[str, str]:
    try:
        return {"plaintext": plain.decode("utf-8")}
    except UnicodeDecodeError:
        return {"plaintext_b64": base64.b64encode(plain).decode("ascii")}


def _error(exc: KmsGuardError) -> dict[str, Any]:
    return {"error": exc.to_dict()}


def _error_text(exc: KmsGuardError) -> bytes:
    return json.dumps(_error(exc)).encode("ascii")


@router.post("/encrypt", response_model=TokenResponse, summary="Encrypt one value")
async def encrypt(body: EncryptRequest, request: Request, who: Authorized) -> dict[str, str]:
    who.require("encrypt", body.classification)
    data = _plaintext(body)
    with who.acting():
        sealed = await service_of(request).aguard.encrypt(data, body.classification, body.context)
    return {"token": envelope.to_text(sealed)}


@router.post("/decrypt", response_model=PlaintextResponse, response_model_exclude_none=True, summary="Decrypt a token")
async def decrypt(body: TokenRequest, request: Request, who: Authorized) -> dict[str, str]:
    service = service_of(request)
    who.require("decrypt")
    raw = envelope.coerce(body.token)  # decoded once, for the access check and the decrypt
    # Guard's own: reading a header never calls KMS (no thread, no await).
    who.require("decrypt", service.guard.classification_of(raw))
    with who.acting():
        plain = await service.aguard.decrypt(raw, body.context)
    return _opened(plain)


@router.post("/encrypt/batch", response_model=BatchResponse, response_model_exclude_none=True, summary="Encrypt many",
             openapi_extra=json_body(EncryptBatchRequest))
async def encrypt_batch(request: Request, who: Authorized) -> Response:
    items = (await parse(request, EncryptBatchRequest)).items
    service = service_of(request)
    _check_size(len(items), service.server.max_batch_items)
    for classification in {item.classification for item in items}:
        who.require("encrypt", classification)
    results: list[bytes] = [b""] * len(items)
    # Per classification: the items' places, plaintexts and contexts.
    groups: dict[str, tuple[list[int], list[bytes], list[Mapping[str, str] | None]]] = {}
    for i, item in enumerate(items):
        try:
            data = _plaintext(item)
        except InvalidInput as exc:
            results[i] = _error_text(exc)
            continue
        places, plaintexts, contexts = groups.get(item.classification) or groups.setdefault(
            item.classification, ([], [], [])
        )
        places.append(i)
        plaintexts.append(data)
        contexts.append(item.context)
    text = envelope.to_text_bytes
    for classification, (places, plaintexts, contexts) in groups.items():
        with who.acting():
            done = await service.aguard.encrypt_many(plaintexts, classification, contexts=contexts)
        for i, result in zip(places, done, strict=True):
            error = result.error
            results[i] = _error_text(error) if error is not None else b'{"token":"' + text(result.get()) + b'"}'
    # Built as bytes: a token needs no escaping, and the tokens are nearly all of the answer.
    return Response(b'{"results":[' + b",".join(results) + b"]}", media_type="application/json")


@router.post("/decrypt/batch", response_model=BatchResponse, response_model_exclude_none=True, summary="Decrypt many",
             openapi_extra=json_body(DecryptBatchRequest))
async def decrypt_batch(request: Request, who: Authorized) -> Response:
    body = await parse(request, DecryptBatchRequest)
    service = service_of(request)
    _check_size(len(body.items), service.server.max_batch_items)
    who.require("decrypt")
    results: list[dict[str, Any] | None] = [None] * len(body.items)
    groups: dict[tuple[tuple[str, str], ...], tuple[list[int], list[bytes]]] = {}
    classes = set()
    for i, item in enumerate(body.items):
        try:
            raw = envelope.coerce(item.token)  # decoded once, for the access check and the decrypt
            classes.add(service.guard.classification_of(raw))
        except KmsGuardError as exc:
            results[i] = _error(exc)
            continue
        context = tuple(sorted(item.context.items())) if item.context else ()
        members, raws = groups.get(context) or groups.setdefault(context, ([], []))
        members.append(i)
        raws.append(raw)
    for classification in classes:
        who.require("decrypt", classification)
    for context, (members, raws) in groups.items():
        with who.acting():
            done = await service.aguard.decrypt_many(raws, dict(context))
        for i, result in zip(members, done, strict=True):
            results[i] = _opened(result.get()) if result.error is None else _error(result.error)
    return Response(to_json({"results": results}), media_type="application/json")


@router.post("/rewrap", response_model=TokenResponse, summary="Re-wrap a token's data key under the current key")
async def rewrap(body: TokenRequest, request: Request, who: Authorized) -> dict[str, Any]:
    service = service_of(request)
    who.require("rewrap")
    who.require("rewrap", (await service.aguard.inspect(body.token)).classification)
    with who.acting():
        token = await service.aguard.rewrap(body.token, body.context)
    return {"token": token}


@router.post("/inspect", response_model=InspectResponse, summary="A token's header (decrypts nothing)")
async def inspect(body: InspectRequest, request: Request, who: Authorized) -> dict[str, Any]:
    who.require("inspect")
    info = await service_of(request).aguard.inspect(body.token)
    who.require("inspect", info.classification)
    return info.to_dict()


@router.post("/echo", summary="Echo the plaintext back: the service's cost without kmsguard's (benchmarks)")
async def echo(body: EncryptRequest, who: Authorized) -> dict[str, str]:
    """Parses, authenticates and rate-limits exactly as ``/v1/encrypt`` does, then answers
    the plaintext as ``token`` without encrypting: ``python -m bench server`` measures
    ``/v1/encrypt`` against it. Any valid API key may call it."""
    return {"token": body.plaintext or body.plaintext_b64 or ""}


def _check_size(n: int, limit: int) -> None:
    if n > limit:
        raise RequestTooLarge(f"items: at most {limit} per batch")
